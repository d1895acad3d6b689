"""Stems: the layers before the first residual stage, by name. Each records its total `stride`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from resnet_lit.models.layers import ActLayer, NormLayer, make_act
from resnet_lit.registry import Registry

StemFactory = Callable[[int, int, NormLayer, ActLayer], "Stem"]

STEMS: Registry[StemFactory] = Registry("stem", "resnet_lit.stems")
register_stem = STEMS.register


class Stem(nn.Sequential):
    """A sequential stem that knows how much it downsamples, for shape checks and `describe`."""

    def __init__(self, stride: int, **layers: nn.Module) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.stride = stride


def conv_norm_act(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, norm_layer: NormLayer, act_layer: ActLayer,
    suffix: str = "",
) -> dict[str, nn.Module]:  # fmt: skip
    """A bias-free "same"-padded convolution, a norm and an activation, named `conv`, `bn`, `act` plus `suffix`."""
    return {
        f"conv{suffix}": nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        f"bn{suffix}": norm_layer(out_channels),
        f"act{suffix}": make_act(act_layer),
    }


@STEMS.builtin("imagenet")
def imagenet_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """7x7 stride-2 convolution and 3x3 stride-2 max-pool: 4x downsampling (He et al., torchvision)."""
    return Stem(4, **conv_norm_act(in_channels, out_channels, 7, 2, norm_layer, act_layer), pool=nn.MaxPool2d(3, 2, 1))


@STEMS.builtin("cifar")
def cifar_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """A single 3x3 stride-1 convolution, no pooling: for 32x32 inputs (He et al. section 4.2)."""
    return Stem(1, **conv_norm_act(in_channels, out_channels, 3, 1, norm_layer, act_layer))


@STEMS.builtin("deep")
def deep_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """ResNet-C: three 3x3 convolutions (widths out/2, out/2, out) replace the 7x7, then max-pool."""
    mid = out_channels // 2
    return Stem(
        4,
        **conv_norm_act(in_channels, mid, 3, 2, norm_layer, act_layer, suffix="1"),
        **conv_norm_act(mid, mid, 3, 1, norm_layer, act_layer, suffix="2"),
        **conv_norm_act(mid, out_channels, 3, 1, norm_layer, act_layer, suffix="3"),
        pool=nn.MaxPool2d(3, 2, 1),
    )


@STEMS.builtin("preact_cifar")
def preact_cifar_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """A bare 3x3 stride-1 convolution: in a pre-activation network the first block normalises and activates its
    output (He et al. 2016b), so the stem has no norm or activation of its own."""
    return Stem(1, conv=nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False))


@STEMS.builtin("preact_imagenet")
def preact_imagenet_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """7x7 stride-2 convolution and 3x3 stride-2 max-pool with no norm or activation: the pre-activation
    ImageNet stem (timm's ResNetV2), 4x downsampling."""
    return Stem(4, conv=nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False), pool=nn.MaxPool2d(3, 2, 1))
