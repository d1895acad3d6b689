"""Residual blocks: g(x) = act(f(x) + shortcut(x)).

`ResidualBlock` is the protocol every block follows, so the network builder, YAML configs and plugins can
treat all blocks alike: a subclass builds and computes only its residual branch f; the base class owns the
shortcut, stochastic depth and the activation after the sum, and drops the shortcut of a plain network.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from resnet_lit.models.layers import ActLayer, DropPath, NormLayer, SqueezeExcite, make_act
from resnet_lit.models.shortcuts import ShortcutFactory, build_shortcut
from resnet_lit.registry import Registry

BLOCKS: Registry[type[ResidualBlock]] = Registry("block", "resnet_lit.blocks")
register_block = BLOCKS.register  # class decorator, so YAML can say `block: name`


class ResidualBlock(nn.Module):
    """Base class of residual blocks.

    A subclass sets `expansion`, calls `super().__init__(in_channels, channels, stride, **kwargs)` with the
    protocol arguments it does not use itself, builds its layers, and implements `residual(x)` and
    `zero_init_last()`. Extra keyword parameters of its `__init__` are its options, set from a config by
    `net.block_args`.

    Class attributes:
        expansion: output channels = `channels * expansion`.
        post_activation: True (the original ResNet) applies `act_layer` after the sum; False returns
            f(x) + shortcut(x) unchanged, as pre-activation blocks need.

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
        residual: False builds the block of a plain network: no shortcut module and no sum, g(x) = act(f(x)).
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
        residual: bool = True,
    ) -> None:
        super().__init__()
        if not residual and drop_path > 0:
            raise ValueError(f"drop_path={drop_path} needs residual=True: a block without a shortcut cannot be dropped")
        self.in_channels = in_channels
        self.out_channels = channels * self.expansion
        self.stride = stride
        self.shortcut: nn.Module | None = (
            build_shortcut(shortcut, in_channels, self.out_channels, stride, norm_layer) if residual else None
        )
        self.drop_path = DropPath(drop_path)
        self.act = make_act(act_layer) if self.post_activation else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch f(x)."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual()")

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.residual(x), x)

    def merge(self, branch: Tensor, shortcut_input: Tensor) -> Tensor:
        """act(drop_path(branch) + shortcut(shortcut_input)), or act(branch) in a plain network (no shortcut)."""
        if self.shortcut is None:
            return self.act(branch)
        return self.act(self.drop_path(branch) + self.shortcut(shortcut_input))

    def zero_init_last(self) -> None:
        """Make f(x) start at zero, so the block starts as its shortcut (Goyal et al., 2017).

        `ResNet(zero_init_residual=True)` calls it on every block; a block supporting that overrides it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no `bn_last` fallback any more: override zero_init_last() to zero the "
            "last layer of its residual branch, or set zero_init_residual=False"
        )


def zero_norm_weight(block: nn.Module, norm: nn.Module) -> None:
    """Zero the affine weight of `norm`, the last layer of `block`'s residual branch."""
    if getattr(norm, "weight", None) is None:
        raise NotImplementedError(
            f"{type(block).__name__}: zero_init_residual needs a norm layer with an affine weight last in the "
            f"residual branch, got {type(norm).__name__}; use another norm or zero_init_residual=False"
        )
    nn.init.zeros_(norm.weight)


def require_ungrouped(name: str, groups: int, width_per_group: int, instead: str) -> None:
    """Refuse the ResNeXt/Wide-ResNet settings in block `name`, whose convolutions take neither; name `instead`."""
    if groups != 1 or width_per_group != 64:
        raise ValueError(
            f"block {name!r} supports only groups=1 and width_per_group=64, got groups={groups}, "
            f"width_per_group={width_per_group}; use block {instead!r} for ResNeXt/Wide-ResNet"
        )


def bottleneck_width(channels: int, groups: int, width_per_group: int) -> int:
    """Channels of a bottleneck's grouped 3x3 convolution: ResNeXt's `groups` x `width_per_group` scaled widths."""
    return int(channels * (width_per_group / 64.0)) * groups


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1, width_per_group: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
        require_ungrouped("basic", groups, width_per_group, instead="bottleneck")
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(channels)
        self.act1 = make_act(act_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(channels)

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))

    def zero_init_last(self) -> None:
        zero_norm_weight(self, self.bn2)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand; stride on the 3x3 as in torchvision (v1.5)."""

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1, width_per_group: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
        width = bottleneck_width(channels, groups, width_per_group)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = make_act(act_layer)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = make_act(act_layer)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=False)
        self.bn3 = norm_layer(self.out_channels)

    def residual(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def zero_init_last(self) -> None:
        zero_norm_weight(self, self.bn3)


class SqueezeExciteMixin:
    """Gates a block's residual branch with squeeze-and-excitation; list it before the block class.

    Args:
        reduction: the SE bottleneck is `out_channels // reduction` wide (at least 8).
    """

    out_channels: int

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, reduction: int = 16, **kwargs: Any) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)  # type: ignore[call-arg]
        self.se = SqueezeExcite(self.out_channels, reduction)

    def residual(self, x: Tensor) -> Tensor:
        return self.se(super().residual(x))  # type: ignore[misc]


class SEBasicBlock(SqueezeExciteMixin, BasicBlock):
    """BasicBlock with squeeze-and-excitation gating of the residual branch."""


class SEBottleneck(SqueezeExciteMixin, Bottleneck):
    """Bottleneck with squeeze-and-excitation gating of the residual branch (SE-ResNet-50)."""


BLOCKS.builtin("basic")(BasicBlock)
BLOCKS.builtin("bottleneck")(Bottleneck)
BLOCKS.builtin("se_basic")(SEBasicBlock)
BLOCKS.builtin("se_bottleneck")(SEBottleneck)
