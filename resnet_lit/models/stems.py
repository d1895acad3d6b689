"""Stems: the layers before the first residual stage. Each records its total `stride`."""

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


@register_stem("imagenet")
def imagenet_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """7x7 stride-2 convolution and 3x3 stride-2 max-pool: 4x downsampling (He et al., torchvision)."""
    return Stem(
        4,
        conv=nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False),
        bn=norm_layer(out_channels),
        act=make_act(act_layer),
        pool=nn.MaxPool2d(3, 2, 1),
    )


@register_stem("cifar")
def cifar_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """A single 3x3 stride-1 convolution, no pooling: for 32x32 inputs (He et al. section 4.2)."""
    return Stem(
        1,
        conv=nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
        bn=norm_layer(out_channels),
        act=make_act(act_layer),
    )


@register_stem("deep")
def deep_stem(in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> Stem:
    """ResNet-C: three 3x3 convolutions (widths out/2, out/2, out) replace the 7x7, then max-pool."""
    mid = out_channels // 2
    return Stem(
        4,
        conv1=nn.Conv2d(in_channels, mid, 3, 2, 1, bias=False),
        bn1=norm_layer(mid),
        act1=make_act(act_layer),
        conv2=nn.Conv2d(mid, mid, 3, 1, 1, bias=False),
        bn2=norm_layer(mid),
        act2=make_act(act_layer),
        conv3=nn.Conv2d(mid, out_channels, 3, 1, 1, bias=False),
        bn3=norm_layer(out_channels),
        act3=make_act(act_layer),
        pool=nn.MaxPool2d(3, 2, 1),
    )
