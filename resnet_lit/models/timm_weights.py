"""Translate torchvision- and timm-format ResNet state dicts into the zoo's naming.

timm's plain ResNets and SE-ResNets use torchvision's names (`conv1`, `bn1`, `layerN.i`, `downsample.0/1`,
`fc`; SE gates as `se.fc1/fc2`, as here). timm's ResNet-D (`resnet50d`) differs in two places:

=====================================  ==========================================
timm                                   resnet-lit
=====================================  ==========================================
``conv1.0`` / ``conv1.1``              ``stem.conv1`` / ``stem.bn1``
``conv1.3`` / ``conv1.4``              ``stem.conv2`` / ``stem.bn2``
``conv1.6`` / ``bn1``                  ``stem.conv3`` / ``stem.bn3``
``layerN.i.downsample.1`` / ``.2``     ``stages.N-1.i.shortcut.conv`` / ``.bn``
=====================================  ==========================================

(the ``downsample.0`` average pool has no parameters).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from resnet_lit.models.torchvision_weights import torchvision_key

_DEEP_STEM = {"conv1.0.": "stem.conv1.", "conv1.1.": "stem.bn1.", "conv1.3.": "stem.conv2.",
              "conv1.4.": "stem.bn2.", "conv1.6.": "stem.conv3.", "bn1.": "stem.bn3."}  # fmt: skip
_AVGPOOL_SHORTCUT = (
    (re.compile(r"\.downsample\.1\."), ".shortcut.conv."),
    (re.compile(r"\.downsample\.2\."), ".shortcut.bn."),
)
_WRAPPERS = ("state_dict", "model", "state_dict_ema")


def is_external_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` uses torchvision/timm names (``layer1.…``) rather than the zoo's (``stages.0.…``)."""
    return any(key.startswith("layer1.") for key in state)


def timm_key(key: str, deep_stem: bool, avgpool_shortcut: bool) -> str:
    """Translate one torchvision/timm parameter name; the flags say which ResNet-D parts the file has."""
    if deep_stem:
        for prefix, replacement in _DEEP_STEM.items():
            if key.startswith(prefix):
                return replacement + key[len(prefix) :]
    if avgpool_shortcut:
        for pattern, replacement in _AVGPOOL_SHORTCUT:
            key = pattern.sub(replacement, key, count=1)
    return torchvision_key(key)


def translate_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The zoo's names for a torchvision- or timm-format ResNet ``state``; other layouts are returned unchanged.

    A ``module.`` prefix (DDP) is dropped first.
    """
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    if not is_external_layout(state):
        return dict(state)
    deep_stem = any(key.startswith("conv1.0.") for key in state)
    avgpool_shortcut = any(".downsample.2." in key for key in state)
    return {timm_key(key, deep_stem, avgpool_shortcut): value for key, value in state.items()}


def unwrap_state_dict(loaded: object) -> object:
    """The state dict inside a training checkpoint of timm or torchvision (``state_dict``/``model`` entries)."""
    if isinstance(loaded, dict) and not all(isinstance(v, Tensor) for v in loaded.values()):
        for name in _WRAPPERS:
            if isinstance(loaded.get(name), dict):
                return loaded[name]
    return loaded
