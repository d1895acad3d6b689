"""resnet-lit: config-driven ResNet-family image classifiers on PyTorch Lightning.

The public names are imported on first use (PEP 562), so `import resnet_lit` and the zoo (`create_model`,
`resnet-lit models`) start without Lightning: only `ResNetClassifier` brings it in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resnet_lit.models import (
        BasicBlock,
        Bottleneck,
        NetworkConfig,
        ResidualBlock,
        ResNet,
        create_model,
        list_models,
        load_torchvision_weights,
        register_block,
        register_model,
    )
    from resnet_lit.module import ResNetClassifier

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "NetworkConfig",
    "ResNet",
    "ResNetClassifier",
    "ResidualBlock",
    "__version__",
    "create_model",
    "list_models",
    "load_torchvision_weights",
    "register_block",
    "register_model",
]

# Public name -> the module that defines it; imported by `__getattr__` on first access.
_LAZY_NAMES = {
    **dict.fromkeys(
        (
            "BasicBlock",
            "Bottleneck",
            "NetworkConfig",
            "ResNet",
            "ResidualBlock",
            "create_model",
            "list_models",
            "load_torchvision_weights",
            "register_block",
            "register_model",
        ),
        "resnet_lit.models",
    ),
    "ResNetClassifier": "resnet_lit.module",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
