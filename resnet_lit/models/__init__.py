"""The residual network zoo: blocks, stems, shortcuts, the ResNet builder and named architectures.

`NetworkConfig` is imported on first use (PEP 562): its field types come from jsonargparse, which only the
training CLI needs, so building a model or listing the zoo starts without it.
"""

from typing import TYPE_CHECKING, Any

from resnet_lit.models.block_options import block_options
from resnet_lit.models.blocks import (
    BLOCKS,
    BasicBlock,
    Bottleneck,
    ResidualBlock,
    SEBasicBlock,
    SEBottleneck,
    SqueezeExciteMixin,
    register_block,
)
from resnet_lit.models.describe import format_summary, summarize
from resnet_lit.models.errors import ModelConfigError
from resnet_lit.models.features import ResNetFeatures
from resnet_lit.models.layers import ACT_LAYERS, NORM_LAYERS, DropPath, SqueezeExcite
from resnet_lit.models.pooling_blocks import ConvPoolBlock
from resnet_lit.models.preact_blocks import PreActBasicBlock, PreActBlock, PreActBottleneck
from resnet_lit.models.resnet import ClassifierHead, ResNet
from resnet_lit.models.shortcuts import SHORTCUTS, register_shortcut
from resnet_lit.models.stems import STEMS, Stem, register_stem
from resnet_lit.models.torchvision_weights import load_torchvision_weights
from resnet_lit.models.zoo import MODELS, build_resnet, create_model, list_models, register_model

if TYPE_CHECKING:
    from resnet_lit.models.config import NetworkConfig

__all__ = [
    "ACT_LAYERS", "BLOCKS", "MODELS", "NORM_LAYERS", "SHORTCUTS", "STEMS",
    "BasicBlock", "Bottleneck", "ClassifierHead", "ConvPoolBlock", "DropPath", "ModelConfigError", "NetworkConfig",
    "PreActBasicBlock", "PreActBlock", "PreActBottleneck", "ResNet", "ResNetFeatures",
    "ResidualBlock", "SEBasicBlock", "SEBottleneck", "SqueezeExcite", "SqueezeExciteMixin", "Stem",
    "block_options", "build_resnet", "create_model", "format_summary", "list_models", "load_torchvision_weights",
    "register_block", "register_model", "register_shortcut", "register_stem", "summarize",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "NetworkConfig":
        from resnet_lit.models.config import NetworkConfig

        return NetworkConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
