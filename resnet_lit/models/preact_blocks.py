"""Pre-activation residual blocks (He et al. 2016b, "Identity Mappings in Deep Residual Networks").

Each block computes g(x) = f(x) + shortcut(x) with norm -> act -> conv ordering inside f and nothing after the
sum, so the identity path runs unchanged through the whole network. Such a network pairs with a bare-convolution
stem (`preact_cifar`, `preact_imagenet`) and ends with a norm and activation, which `ResNet` puts in the
classifier head because the blocks say `post_activation = False`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from resnet_lit.models.blocks import BLOCKS, ResidualBlock, bottleneck_width, require_ungrouped
from resnet_lit.models.layers import ActLayer, NormLayer, make_act


class PreActBlock(ResidualBlock):
    """Base of the pre-activation blocks: the block's first norm and activation (`bn1`, `act1`) come first.

    Where the block projects its shortcut (its shape changes), the projection takes the pre-activated input, so
    the residual branch and the shortcut share `bn1`/`act1`, as in the paper's code; an identity shortcut
    carries x itself. A subclass builds the rest of the branch and implements `residual_after_preact(x)` on the
    pre-activated input; `residual(x)` is then the whole branch f of the block input.
    """

    post_activation = False

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
        self.bn1 = norm_layer(in_channels)
        # Not in place: with norm "identity" its input is the block input, which an identity shortcut still needs.
        self.act1 = act_layer()

    def preactivate(self, x: Tensor) -> Tensor:
        """The shared first norm and activation."""
        return self.act1(self.bn1(x))

    def residual_after_preact(self, x: Tensor) -> Tensor:
        """The residual branch after `preactivate`."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual_after_preact()")

    def residual(self, x: Tensor) -> Tensor:
        return self.residual_after_preact(self.preactivate(x))

    def forward(self, x: Tensor) -> Tensor:
        pre = self.preactivate(x)
        projects = self.shortcut is not None and not isinstance(self.shortcut, nn.Identity)
        return self.merge(self.residual_after_preact(pre), pre if projects else x)


class PreActBasicBlock(PreActBlock):
    """BN-ReLU-3x3 conv twice (pre-activation ResNet-18/34/110)."""

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1, width_per_group: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
        require_ungrouped("preact_basic", groups, width_per_group, instead="preact_bottleneck")
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(channels)
        self.act2 = make_act(act_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def residual_after_preact(self, x: Tensor) -> Tensor:
        return self.conv2(self.act2(self.bn2(self.conv1(x))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # no norm follows the last convolution of a pre-activation branch


class PreActBottleneck(PreActBlock):
    """BN-ReLU-1x1 reduce, BN-ReLU-3x3 (strided, grouped), BN-ReLU-1x1 expand (pre-activation ResNet-50/164/1001).

    The stride is on the 3x3, as in torchvision's and timm's bottlenecks; the paper's code strides the first 1x1.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1, width_per_group: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
        width = bottleneck_width(channels, groups, width_per_group)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = make_act(act_layer)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = norm_layer(width)
        self.act3 = make_act(act_layer)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=False)

    def residual_after_preact(self, x: Tensor) -> Tensor:
        out = self.act2(self.bn2(self.conv1(x)))
        out = self.act3(self.bn3(self.conv2(out)))
        return self.conv3(out)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)  # no norm follows the last convolution of a pre-activation branch


BLOCKS.builtin("preact_basic")(PreActBasicBlock)
BLOCKS.builtin("preact_bottleneck")(PreActBottleneck)
