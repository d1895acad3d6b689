"""The loaders Lightning iterates: seeded DataLoaders, the device path's index loaders, and the resume position
that both train loaders carry through Lightning's stateful-dataloader protocol."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .samplers import EvalShardSampler, ResumableTrainSampler
from .seeds import mix_seed


class SeededDataLoader(DataLoader):
    """A DataLoader that never draws from the global torch RNG and seeds its workers deterministically.

    A plain DataLoader draws its workers' base seed from the global torch RNG each time an iterator is
    created, so a resumed run (which creates iterators at other moments) would continue with a different
    random stream. Here the base seed comes from a private generator reseeded from ``(seed, epoch)`` at
    every iterator, ``epoch`` being the sampler's upcoming epoch (0 for samplers without one); Lightning's
    worker_init_fn derives each worker's torch/numpy/python seeds from that base seed and the ranks.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self.seed = seed

    def __iter__(self) -> Any:
        self.generator.manual_seed(mix_seed(self.seed, getattr(self.sampler, "next_epoch", 0)))
        if self.num_workers and not isinstance(self.worker_init_fn, IgnoreSigint):
            self.worker_init_fn = IgnoreSigint(self.worker_init_fn)  # wraps Lightning's seeding, set by now
        return super().__iter__()


class IgnoreSigint:
    """A ``worker_init_fn`` that makes the worker ignore SIGINT, then runs ``init`` (Lightning's worker seeding).

    Ctrl-C reaches the whole process group: a worker that died of it would keep the main process from reaching
    the step where it saves a checkpoint (``resnet_lit.fault_tolerance.preemption``), which decides for all.
    """

    def __init__(self, init: Callable[[int], None] | None) -> None:
        self.init = init

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)


class ResumableLoader:
    """Mixin of the train loaders: their position in training, saved and restored by Lightning's fit loop.

    Lightning stores ``state_dict()`` of a train loader that has one in every checkpoint and, when it restarts
    an unfinished epoch, hands it back to ``load_state_dict()`` before the first batch is fetched (the DataModule
    keeps a copy for when Lightning does not, see :meth:`ImageDataModule.load_state_dict`). The position
    is the epoch of the running iteration and the batches it has yielded (Lightning fetches a loader with a
    length without look-ahead, so a checkpoint taken in ``on_train_batch_end`` counts exactly the trained
    batches); a finished epoch is saved as the start of the next one.

    Iteration is lazy: the epoch is read from the sampler when the first batch is drawn, after Lightning's
    ``set_epoch``, and a restored position applies only if it is of that epoch. So a resumed run draws exactly
    the batches the uninterrupted run had left, also when Lightning moves on to the next epoch instead. The
    state is the same on every rank (the shards are padded to equal length), so rank 0's checkpoint serves all.
    """

    sampler: ResumableTrainSampler
    batch_size: int
    _position: tuple[int, int] = (0, 0)  # (epoch, batches yielded) of the running or last iteration
    _restored: tuple[int, int] | None = None  # from load_state_dict, for the next iteration

    def _batches_from(self, epoch: int, batches_done: int) -> Iterator[Any]:
        """The batches of ``epoch`` after its first ``batches_done``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        epoch, restored = self.sampler.epoch, self._restored
        self._restored = None
        done = restored[1] if restored is not None and restored[0] == epoch else 0
        self._position = (epoch, done)
        for batch in self._batches_from(epoch, done):
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the next training batch comes from, and the batch size and world size that position is for."""
        epoch, done = self._position
        if done >= len(self):  # type: ignore[arg-type]
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration of the saved epoch skip the batches done before the checkpoint."""
        done = int(state_dict["batches_done"])
        saved = (state_dict.get("batch_size"), state_dict.get("world_size"))
        if done and saved != (self.batch_size, self.world_size):
            warnings.warn(
                f"resuming mid-epoch with batch_size/world_size {self.batch_size}/{self.world_size}, but the "
                f"checkpoint used {saved[0]}/{saved[1]}: the rest of this epoch will not match the uninterrupted run",
                stacklevel=2,
            )
        self._restored = (int(state_dict["epoch"]), done)

    @property
    def world_size(self) -> int:
        return self.sampler.num_replicas


class TrainDataLoader(ResumableLoader, SeededDataLoader):
    """The DataLoader path's train loader: batches of a :class:`ResumableTrainSampler`, resumable."""

    def _batches_from(self, epoch: int, batches_done: int) -> Iterator[Any]:
        self.sampler.resume(epoch, batches_done, self.batch_size)
        return SeededDataLoader.__iter__(self)


class IndexBatch(NamedTuple):
    """What a device-path loader yields: the dataset indices of a batch, their split, and the ``(seed, epoch)``
    their augmentation comes from; ``draws`` where the epoch repeats samples (see :class:`ResumableTrainSampler`),
    whose augmentation seeds come from the draws instead of the indices."""

    indices: Tensor
    split: str
    epoch: int = 0
    seed: int = 0
    draws: Tensor | None = None


class DeviceTrainLoader(ResumableLoader):
    """Training index batches of a :class:`ResumableTrainSampler` (Lightning calls ``sampler.set_epoch``).

    With ``device`` the epoch's index order is copied there once, so the batches are already on the training
    device and Lightning's per-step transfer has nothing to copy.
    """

    batch_sampler = None  # DataLoader attributes that Lightning inspects

    def __init__(
        self, sampler: ResumableTrainSampler, batch_size: int, drop_last: bool, device: torch.device | None = None
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches_from(self, epoch: int, batches_done: int) -> Iterator[IndexBatch]:
        order = self.sampler.epoch_draws(epoch)[batches_done * self.batch_size :]
        draws, size = torch.tensor(order, dtype=torch.int64), self.sampler.dataset_size
        repeated = draws.to(self.device) if order and max(order) >= size else None  # an epoch that repeats samples
        indices = (draws if repeated is None else draws % size).to(self.device)
        return _index_batches(indices, self.batch_size, self.drop_last, "train", epoch, self.sampler.seed, repeated)


class DeviceEvalLoader:
    """Evaluation index batches: this rank's in-order shard, the last batch possibly smaller."""

    batch_sampler = None

    def __init__(
        self, sampler: EvalShardSampler, batch_size: int, split: str, device: torch.device | None = None
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.split = split
        self.device = device

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[IndexBatch]:
        order = torch.arange(self.sampler.start, self.sampler.stop, dtype=torch.int64, device=self.device)
        yield from _index_batches(order, self.batch_size, False, self.split, 0, 0)


def _index_batches(
    order: Tensor, batch_size: int, drop_last: bool, split: str, epoch: int, seed: int, draws: Tensor | None = None
) -> Iterator[IndexBatch]:
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield IndexBatch(chunk, split, epoch, seed, None if draws is None else draws[start : start + batch_size])
