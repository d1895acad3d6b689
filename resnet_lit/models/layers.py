"""Small layers shared by stems, blocks and shortcuts: norm and activation lookup by name, DropPath, SE."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from resnet_lit.models.errors import ModelConfigError
from resnet_lit.registry import Registry

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[..., nn.Module]

NORM_LAYERS: Registry[NormLayer] = Registry("norm layer")
ACT_LAYERS: Registry[ActLayer] = Registry("activation")

NORM_LAYERS.builtin("batchnorm")(nn.BatchNorm2d)
NORM_LAYERS.builtin("syncbatchnorm")(nn.SyncBatchNorm)
NORM_LAYERS.builtin("groupnorm")(lambda channels: nn.GroupNorm(min(32, channels), channels))
NORM_LAYERS.builtin("instancenorm")(partial(nn.InstanceNorm2d, affine=True))
NORM_LAYERS.builtin("identity")(lambda channels: nn.Identity())

ACT_LAYERS.builtin("relu")(nn.ReLU)
ACT_LAYERS.builtin("silu")(nn.SiLU)
ACT_LAYERS.builtin("gelu")(lambda inplace=False: nn.GELU())
ACT_LAYERS.builtin("leaky_relu")(nn.LeakyReLU)
ACT_LAYERS.builtin("mish")(nn.Mish)


def resolve_norm(norm: str | NormLayer) -> NormLayer:
    """A norm-layer factory `channels -> nn.Module` from a name, dotted path or callable."""
    return NORM_LAYERS.resolve(norm)


def resolve_act(act: str | ActLayer) -> ActLayer:
    """An activation factory accepting `inplace=` from a name, dotted path or callable."""
    return ACT_LAYERS.resolve(act)


def make_act(act_layer: ActLayer) -> nn.Module:
    """Instantiate an activation in place where it supports it (ReLU-like), else plainly."""
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of whole samples with probability `p` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel gating (Hu et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 16, act_layer: ActLayer = nn.ReLU) -> None:
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1:
            raise ModelConfigError(f"squeeze-and-excitation reduction must be a positive integer, got {reduction!r}")
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = make_act(act_layer)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.fc2(self.act(self.fc1(scale)))
        return x * torch.sigmoid(scale)
