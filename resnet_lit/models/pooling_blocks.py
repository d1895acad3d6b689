"""The conv-pool residual block of the fast CIFAR networks: Page's ResNet-9 (DAWNBench 2018) and airbench.

These networks downsample by max-pooling a convolution computed at the input resolution instead of striding it,
and add a residual pair of 3x3 convolutions on the pooled features. As a `ResidualBlock` the layer is
g(x) = act(f(p(x)) + p(x)), with p = conv3x3 -> max-pool(stride) -> norm -> act (airbench's order: the norm
runs on the 4x smaller pooled map) and f = conv3x3 -> norm -> act -> conv3x3 -> norm (a basic block's branch).
The sum needs no projection: p already gives the block's output shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from resnet_lit.models.blocks import BLOCKS, ResidualBlock, require_ungrouped, zero_norm_weight
from resnet_lit.models.layers import ActLayer, DropPath, NormLayer, make_act


class ConvPoolBlock(ResidualBlock):
    """A conv-pool layer p (3x3 convolution to `channels`, max-pool by `stride`, norm, activation), then a residual
    pair of 3x3 convolutions: g(x) = act(f(p(x)) + p(x)).

    `net: {stem: cifar, stem_width: 64, block: conv_pool, layers: [1, 1, 1], widths: [128, 256, 512],
    strides: [2, 2, 2], block_args: [{}, {residual_branch: false}, {}]}` is Page's ResNet-9 (with an average-
    pooled head instead of his max-pooled, 0.125-scaled one).

    Args:
        residual_branch: False keeps only the conv-pool layer, g(x) = p(x) (the middle stage of ResNet-9): no
            residual pair, so `zero_init_last` has nothing to zero and `net.drop_path` nothing to drop (its rate
            for this block is ignored).
    """

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1, width_per_group: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU, residual: bool = True,
        drop_path: float = 0.0, residual_branch: bool = True, **kwargs: Any,
    ) -> None:  # fmt: skip
        # The base class would project the shortcut from in_channels at `stride`; here it adds p(x), which already
        # has the output shape: build it without one and put the identity in where there is a sum.
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, act_layer=act_layer,
                         residual=False, drop_path=0.0, **kwargs)  # fmt: skip
        require_ungrouped("conv_pool", groups, width_per_group, instead="bottleneck")
        self.conv = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(stride) if stride > 1 else nn.Identity()
        self.bn = norm_layer(channels)
        self.act0 = make_act(act_layer)
        self.has_branch = residual_branch
        if residual_branch:
            self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn1 = norm_layer(channels)
            self.act1 = make_act(act_layer)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn2 = norm_layer(channels)
            if residual:
                self.shortcut = nn.Identity()
                self.drop_path = DropPath(drop_path)
        else:
            self.act = nn.Identity()  # g(x) = p(x): p ends with its own activation

    def conv_pool(self, x: Tensor) -> Tensor:
        """p(x): the convolution at the input resolution, max-pooled, normalised and activated."""
        return self.act0(self.bn(self.pool(self.conv(x))))

    def residual(self, x: Tensor) -> Tensor:
        """f(p(x)), the residual pair on the block input's conv-pool; zeros without the pair (g(x) = p(x))."""
        pooled = self.conv_pool(x)
        return self.branch(pooled) if self.has_branch else torch.zeros_like(pooled)

    def branch(self, pooled: Tensor) -> Tensor:
        """f(p): conv-norm-act-conv-norm."""
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(pooled)))))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv_pool(x)
        if not self.has_branch:
            return pooled
        return self.merge(self.branch(pooled), pooled)

    def zero_init_last(self) -> None:
        """Zero the residual pair's last norm, so the block starts as p(x); nothing to do without the pair."""
        if self.has_branch:
            zero_norm_weight(self, self.bn2)


BLOCKS.builtin("conv_pool")(ConvPoolBlock)
