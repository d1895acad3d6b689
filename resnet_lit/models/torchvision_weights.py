"""Load torchvision ResNet/ResNeXt/Wide-ResNet state dicts into the zoo's networks, offline and strictly."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^conv1\.", "stem.conv."),
        (r"^bn1\.", "stem.bn."),
        (r"^layer(\d+)\.", "stages.{stage}."),
        (r"\.downsample\.0\.", ".shortcut.conv."),
        (r"\.downsample\.1\.", ".shortcut.bn."),
        (r"^fc\.", "head.fc."),
    )
)


def torchvision_key(key: str) -> str:
    """Translate one torchvision parameter name into this package's naming."""
    for pattern, replacement in _KEY_RULES:
        match = pattern.search(key)
        if match is None:
            continue
        if "{stage}" in replacement:
            replacement = replacement.format(stage=int(match.group(1)) - 1)
        key = pattern.sub(replacement, key, count=1)
    return key


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Copy a torchvision ResNet-family `state_dict` into `model` strictly and return the model.

    Raises ValueError naming every missing, unexpected or wrongly shaped key.
    """
    mapped = {torchvision_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise ValueError("torchvision state_dict does not match the model: " + "; ".join(parts))
    model.load_state_dict(mapped, strict=True)
    return model
