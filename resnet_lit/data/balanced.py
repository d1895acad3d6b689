"""``balanced_sampling``: a training order in which every class is drawn equally often (±1) in each epoch.

The order is a pure function of the seed, the epoch and the training labels, so every rank draws the same order
and takes its shard of it, and a resumed run skips into exactly the order the uninterrupted run had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from .samplers import ResumableTrainSampler
from .seeds import mix_seed

LISTED_CLASSES = 10  # the balancing report names the classes up to this many, else gives the range of counts


class BalancedTrainSampler(ResumableTrainSampler):
    """A :class:`ResumableTrainSampler` whose epochs hold each class present in ``targets`` equally often.

    An epoch is as long as the unbalanced one (:attr:`epoch_length`, the dataset padded to a multiple of
    ``num_replicas``; drawn at that length, so the padding repeats nothing). Each of the ``C`` classes present
    gets ``length // C`` slots, and the ``length % C`` extra slots go to classes the seeded generator picks, so no
    class is always favoured. A class of ``s`` samples fills its ``q`` slots with ``q // s`` full passes over its
    samples plus a seeded random ``q % s`` of them, without replacement: a large class contributes another random
    subset every epoch, and a small class repeats each of its samples ``q // s`` or ``q // s + 1`` times. (Draws
    with replacement would do so only on average, repeating some samples far more often than others by chance.)
    Then the whole order is shuffled. All of it comes from one generator seeded with ``(seed, epoch)``.

    A sample's ``k``-th repeat in an epoch is the draw ``index + k * dataset_size``: its own augmentation seed.
    Classes without a training sample cannot be drawn: the epoch balances the classes present.
    """

    def __init__(self, targets: Sequence[int] | Tensor, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        labels = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        super().__init__(len(labels), num_replicas=num_replicas, rank=rank, seed=seed)
        if int(labels.min()) < 0:
            raise ValueError(f"balanced sampling needs class indices of 0 or more, got {int(labels.min())}")
        counts = torch.bincount(labels)
        self.classes: list[int] = torch.nonzero(counts).flatten().tolist()
        self.class_sizes: list[int] = counts[self.classes].tolist()
        # Each present class's dataset indices, in class order (argsort groups them; absent classes hold none).
        self._members = torch.split(torch.argsort(labels, stable=True), self.class_sizes)

    @property
    def slots_per_class(self) -> tuple[int, int]:
        """The fewest and most draws of a class in an epoch (equal when the classes divide the epoch)."""
        fewest, extra = divmod(self.epoch_length, len(self.classes))
        return fewest, fewest + (extra > 0)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        fewest, extra = divmod(self.epoch_length, len(self.classes))
        quotas = torch.full((len(self.classes),), fewest, dtype=torch.int64)
        quotas[torch.randperm(len(self.classes), generator=generator)[:extra]] += 1
        parts = []
        for members, quota in zip(self._members, quotas.tolist(), strict=True):
            passes, rest = divmod(quota, len(members))
            repeats = torch.arange(passes, dtype=torch.int64)[:, None] * self.dataset_size
            parts.append((members[None, :] + repeats).flatten())
            if rest:
                chosen = members[torch.randperm(len(members), generator=generator)[:rest]]
                parts.append(chosen + passes * self.dataset_size)
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=generator)].tolist()


def report_balance(sampler: BalancedTrainSampler, class_names: Sequence[str]) -> None:
    """Say (on rank 0) how many samples each class has and how many of them each epoch draws; warn about classes
    without a training sample, which the balanced epochs leave out."""
    names = [class_names[c] if c < len(class_names) else str(c) for c in sampler.classes]
    if len(names) <= LISTED_CLASSES:
        before = ", ".join(f"{name}: {size}" for name, size in zip(names, sampler.class_sizes, strict=True))
    else:
        before = f"{min(sampler.class_sizes)} to {max(sampler.class_sizes)} per class"
    fewest, most = sampler.slots_per_class
    after = str(fewest) if fewest == most else f"{fewest} or {most}"
    rank_zero_info(
        f"balanced_sampling: the training split holds {before} ({len(names)} classes); each epoch of "
        f"{sampler.epoch_length} draws {after} of every class"
    )
    present = set(sampler.classes)
    absent = [name for c, name in enumerate(class_names) if c not in present]
    if absent:
        listed = ", ".join(repr(name) for name in absent[:LISTED_CLASSES])
        more = f" and {len(absent) - LISTED_CLASSES} more" if len(absent) > LISTED_CLASSES else ""
        rank_zero_warn(
            f"balanced_sampling: no training sample of the class(es) {listed}{more}; each epoch balances the "
            f"{len(sampler.classes)} classes present and never draws these"
        )
