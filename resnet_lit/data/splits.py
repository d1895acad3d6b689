"""The untransformed train/val/test splits a DataModule loads, and the seeded hold-out of a missing val split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from .errors import DataConfigError
from .seeds import mix_seed


@dataclass
class RawSplits:
    """Untransformed datasets yielding ``(PIL image or tensor, int target)``; ``None`` when a split is absent."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) ``(train, val)`` index split of ``range(size)``, each sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = round(size * val_fraction)
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5B1))  # own stream, independent of shuffling
    order = torch.randperm(size, generator=generator).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


def hold_out_val(splits: RawSplits, val_fraction: float, seed: int) -> RawSplits:
    """``splits`` with a missing val split carved out of train (``val_fraction`` of it, seeded); else unchanged."""
    if splits.val is not None or val_fraction == 0:
        return splits
    train_idx, val_idx = split_indices(len(splits.train), val_fraction, seed)  # type: ignore[arg-type]
    return RawSplits(Subset(splits.train, train_idx), Subset(splits.train, val_idx), splits.test)
