"""Shortcut (skip) connections: identity where shapes match, otherwise a projection chosen by name.

Each factory takes `(in_channels, out_channels, stride, norm_layer)` and returns the module that maps
the block input to the block output shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lit.models.layers import NormLayer
from resnet_lit.registry import Registry

ShortcutFactory = Callable[[int, int, int, NormLayer], nn.Module]

SHORTCUTS: Registry[ShortcutFactory] = Registry("shortcut", "resnet_lit.shortcuts")
register_shortcut = SHORTCUTS.register


class PadShortcut(nn.Module):
    """He et al. option A: subsample spatially and zero-pad the new channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"shortcut 'identity_pad' cannot reduce channels ({in_channels} -> {out_channels}); "
                "use 'conv_bn', 'conv' or 'avgpool_conv_bn'"
            )
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # Pad order is (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class ProjectionShortcut(nn.Module):
    """A strided 1x1 convolution, optionally after average pooling (ResNet-D) and before a norm.

    The convolution has a bias only without a norm, unless `bias` says otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm_layer: NormLayer | None,
        avg_pool: bool = False,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            if avg_pool and stride > 1
            else nn.Identity()
        )
        conv_stride = 1 if avg_pool else stride
        bias = norm_layer is None if bias is None else bias
        self.conv = nn.Conv2d(in_channels, out_channels, 1, conv_stride, bias=bias)
        self.bn = norm_layer(out_channels) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.pool(x)))


@SHORTCUTS.builtin("identity_pad")
def identity_pad(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """Parameter-free option A of He et al. (2016), used by the CIFAR ResNets."""
    return PadShortcut(in_channels, out_channels, stride)


@SHORTCUTS.builtin("conv")
def conv(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """A 1x1 convolution with bias and no norm, as in the d2l.ai ResNet."""
    return ProjectionShortcut(in_channels, out_channels, stride, None)


@SHORTCUTS.builtin("conv_nobias")
def conv_nobias(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """A bias-free 1x1 convolution and no norm: the projection of the pre-activation ResNets (He et al. 2016b)."""
    return ProjectionShortcut(in_channels, out_channels, stride, None, bias=False)


@SHORTCUTS.builtin("conv_bn")
def conv_bn(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """Option B of He et al.: a strided 1x1 convolution and a norm (torchvision's `downsample`)."""
    return ProjectionShortcut(in_channels, out_channels, stride, norm_layer)


@SHORTCUTS.builtin("avgpool_conv_bn")
def avgpool_conv_bn(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """ResNet-D: average-pool to downsample, then a stride-1 1x1 convolution and a norm."""
    return ProjectionShortcut(in_channels, out_channels, stride, norm_layer, avg_pool=True)


def build_shortcut(
    kind: str | ShortcutFactory, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer
) -> nn.Module:
    """Identity when the shape is unchanged, else the projection named by `kind`."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return SHORTCUTS.resolve(kind)(in_channels, out_channels, stride, norm_layer)
