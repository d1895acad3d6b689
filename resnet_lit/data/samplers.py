"""The samplers the DataModules build themselves (``use_distributed_sampler=False``): a seeded, padded, resumable
shard for training and an in-order shard for evaluation that sees every sample exactly once over all ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .seeds import mix_seed, sample_seed


class ResumableTrainSampler(Sampler[tuple[int, int]]):
    """Seeded, sharded, padded training sampler that can resume mid-epoch.

    Every epoch draws its order (:meth:`epoch_order`, here ``torch.randperm(dataset_size)``) from a generator
    seeded with ``(seed, epoch)``, pads it by wrapping around to a multiple of ``num_replicas`` and gives rank ``r``
    the items ``r::num_replicas``. Items are ``(index, sample_seed)`` pairs; wrap datasets with
    :class:`~resnet_lit.data.datasets.SeededTransformDataset` to consume them. Subclasses change the order only
    (e.g. :class:`~resnet_lit.data.balanced.BalancedTrainSampler`), so sharding and resuming stay the same.

    The order holds *draws*: a dataset index plus ``k * dataset_size`` for the ``k``-th repeat of that sample in
    an epoch order that repeats samples, so each repeat gets its own augmentation seed
    ``sample_seed(seed, epoch, draw)``; here every draw is an index.

    Resuming: :meth:`resume` arms the *next* iteration to replay ``epoch`` starting after
    ``num_batches * batch_size`` items of this rank's permutation, i.e. exactly the tail of the uninterrupted
    epoch. The armed epoch wins over :meth:`set_epoch`; it is used once, and later iterations follow
    :meth:`set_epoch` as usual. The train loaders arm it from their restored position (see :mod:`.loaders`).

    ``len(sampler)`` is always the full per-rank epoch length, also in a resumed epoch, because Lightning
    keeps counting batch indices from the restored progress (it stops the epoch after ``len(loader)``
    batches in total, including the ones done before the checkpoint).
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._armed: tuple[int, int] | None = None  # (epoch, samples to skip) for the next iteration
        self.num_samples = math.ceil(dataset_size / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this at every epoch start)."""
        self.epoch = epoch

    def resume(self, epoch: int, num_batches: int, batch_size: int) -> None:
        """Make the next iteration yield ``epoch`` minus its first ``num_batches`` batches on this rank."""
        if epoch < 0 or num_batches < 0 or batch_size <= 0:
            raise ValueError(f"invalid resume: epoch={epoch}, num_batches={num_batches}, batch_size={batch_size}")
        self.epoch = epoch
        self._armed = (epoch, num_batches * batch_size)

    @property
    def next_epoch(self) -> int:
        """The epoch that the next iteration yields (an armed resume wins over :meth:`set_epoch`)."""
        return self._armed[0] if self._armed is not None else self.epoch

    @property
    def epoch_length(self) -> int:
        """Draws per epoch over all ranks: the dataset size padded to a multiple of ``num_replicas``."""
        return self.num_samples * self.num_replicas

    def epoch_order(self, epoch: int) -> list[int]:
        """The draws of ``epoch`` over all ranks, before padding and sharding: a pure function of the seed and
        ``epoch`` (and what a subclass was built from), so every rank and every resume computes the same order."""
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def epoch_draws(self, epoch: int) -> list[int]:
        """This rank's full list of draws for ``epoch`` (no skipping)."""
        order = self.epoch_order(epoch)
        total = self.epoch_length
        while len(order) < total:  # loop: padding may exceed the dataset size when it is tiny
            order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full list of dataset indices for ``epoch`` (no skipping)."""
        return [draw % self.dataset_size for draw in self.epoch_draws(epoch)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self._armed if self._armed is not None else (self.epoch, 0)
        self._armed = None
        for draw in self.epoch_draws(epoch)[skip:]:
            yield draw % self.dataset_size, sample_seed(self.seed, epoch, draw)

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(Sampler[int]):
    """In-order, unpadded shard of ``range(dataset_size)`` for evaluation and prediction.

    Rank ``r`` gets the contiguous block ``[r * n // R, (r + 1) * n // R)``; blocks may differ in size by one,
    and their union is every index exactly once, so gathered metrics equal single-process metrics.
    """

    def __init__(self, dataset_size: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.start = rank * dataset_size // num_replicas
        self.stop = (rank + 1) * dataset_size // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
