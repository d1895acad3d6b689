"""The data's normalisation compared with the preprocessing a named pretrained source was trained with.

A raw weights file carries no preprocessing, so the recipe or the user states `data.mean`/`data.std`; a named
source (`torchvision:<arch>.<WEIGHTS>`) does, and normalising the images otherwise silently costs accuracy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def normalisation_mismatch(
    source_name: str, source: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]
) -> str | None:
    """A warning naming both normalisations when the data's `mean`/`std` differ from the source's (to 1e-3),
    else None."""
    expected_mean, expected_std = list(source["mean"]), list(source["std"])
    if _close(mean, expected_mean) and _close(std, expected_std):
        return None
    return (
        f"resnet-lit: the data is normalised with mean {_rounded(mean)}, std {_rounded(std)}, but model.init_from "
        f"{source_name} was trained with mean {_rounded(expected_mean)}, std {_rounded(expected_std)}: set "
        f"data.init_args.mean/std to those values unless the difference is intended"
    )


def _close(values: Sequence[float], expected: Sequence[float]) -> bool:
    if len(values) != len(expected):
        return False
    return all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(values, expected, strict=True))


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]
