"""resnet-lit: config-driven ResNet-family image classifiers on PyTorch Lightning."""

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
