"""Residual blocks: g(x) = act(f(x) + shortcut(x)).

`ResidualBlock` is the protocol every block follows. A subclass builds only its residual branch f in
`__init__` and computes it in `residual()`; the base class owns the shortcut, stochastic depth and the
activation after the addition. All blocks share one constructor signature so the network builder,
the YAML config and plugins can treat them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from resnet_lit.models.layers import ActLayer, DropPath, NormLayer, SqueezeExcite, make_act
from resnet_lit.models.shortcuts import ShortcutFactory, build_shortcut
from resnet_lit.registry import Registry

BLOCKS: Registry[type[ResidualBlock]] = Registry("block", "resnet_lit.blocks")


def register_block(name: str | None = None) -> Callable[[type[ResidualBlock]], type[ResidualBlock]]:
    """Class decorator registering a `ResidualBlock` subclass so YAML can say `block: name`."""
    return BLOCKS.register(name, origin="user")


class ResidualBlock(nn.Module):
    """Base class of residual blocks.

    Subclasses set `expansion` (output channels = `channels * expansion`), build their layers after
    calling `super().__init__(...)`, implement `residual(x)` and, where the last layer is not a norm
    named `bn_last`, override `zero_init_last()`.

    Args:
        in_channels: channels of the block input.
        channels: the block's base width; the output has `channels * expansion` channels.
        stride: spatial stride of the block (1 or 2 in the standard networks).
        groups: convolution groups of the spatial convolution (ResNeXt cardinality).
        width_per_group: channels per group of the spatial convolution (64 means plain ResNet).
        shortcut: shortcut kind used when the shape changes ("conv_bn", "identity_pad", ...).
        norm_layer: factory `channels -> nn.Module`.
        act_layer: activation factory accepting `inplace=`.
        drop_path: stochastic-depth probability of this block.
    """

    expansion: ClassVar[int] = 1
    post_activation: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str | ShortcutFactory = "conv_bn",
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = channels * self.expansion
        self.stride = stride
        self.shortcut = build_shortcut(shortcut, in_channels, self.out_channels, stride, norm_layer)
        self.drop_path = DropPath(drop_path)
        self.act = make_act(act_layer) if self.post_activation else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch f(x)."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual()")

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop_path(self.residual(x)) + self.shortcut(x))

    def zero_init_last(self) -> None:
        """Make f(x) start at zero, so the block starts as its shortcut (Goyal et al., 2017)."""
        last = getattr(self, "bn_last", None)
        if last is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no `bn_last`; override zero_init_last() to support "
                "zero_init_residual"
            )
        if getattr(last, "weight", None) is None:
            raise NotImplementedError(
                f"{type(self).__name__}: zero_init_residual needs a norm layer with an affine weight as "
                f"`bn_last`, got {type(last).__name__}; use another norm or zero_init_residual=False"
            )
        nn.init.zeros_(last.weight)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str | ShortcutFactory = "conv_bn",
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels, channels, stride, groups=groups, width_per_group=width_per_group,
            shortcut=shortcut, norm_layer=norm_layer, act_layer=act_layer, drop_path=drop_path,
        )  # fmt: skip
        if groups != 1 or width_per_group != 64:
            raise ValueError(
                f"block 'basic' supports only groups=1 and width_per_group=64, got groups={groups}, "
                f"width_per_group={width_per_group}; use block 'bottleneck' for ResNeXt/Wide-ResNet"
            )
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(channels)
        self.act1 = make_act(act_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(channels)

    @property
    def bn_last(self) -> nn.Module:
        return self.bn2

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand; stride on the 3x3 as in torchvision (v1.5)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str | ShortcutFactory = "conv_bn",
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels, channels, stride, groups=groups, width_per_group=width_per_group,
            shortcut=shortcut, norm_layer=norm_layer, act_layer=act_layer, drop_path=drop_path,
        )  # fmt: skip
        width = int(channels * (width_per_group / 64.0)) * groups
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = make_act(act_layer)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = make_act(act_layer)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=False)
        self.bn3 = norm_layer(self.out_channels)

    @property
    def bn_last(self) -> nn.Module:
        return self.bn3

    def residual(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class SEBasicBlock(BasicBlock):
    """BasicBlock with squeeze-and-excitation gating of the residual branch."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)
        self.se = SqueezeExcite(self.out_channels)

    def residual(self, x: Tensor) -> Tensor:
        return self.se(super().residual(x))


class SEBottleneck(Bottleneck):
    """Bottleneck with squeeze-and-excitation gating of the residual branch (SE-ResNet-50)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)
        self.se = SqueezeExcite(self.out_channels)

    def residual(self, x: Tensor) -> Tensor:
        return self.se(super().residual(x))


BLOCKS.register("basic")(BasicBlock)
BLOCKS.register("bottleneck")(Bottleneck)
BLOCKS.register("se_basic")(SEBasicBlock)
BLOCKS.register("se_bottleneck")(SEBottleneck)
