"""`DeployableClassifier`: the network as it ships, taking float images in [0, 1] and returning logits, with the
data config's normalisation inside, so a deployer never has to know the training mean and std."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resnet_lit.data.normalize import per_channel


class DeployableClassifier(nn.Module):
    """``net((images - mean) / std)`` for float32 ``[N, C, H, W]`` images in [0, 1].

    The subtraction and division are those of the training data path (:class:`~resnet_lit.data.normalize.Normalizer`),
    in the same order, so the exported model sees what the network saw in validation.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], in_channels: int) -> None:
        super().__init__()
        self.net = net
        mean = per_channel("mean", tuple(float(m) for m in mean), in_channels)
        std = per_channel("std", tuple(float(s) for s in std), in_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images - self.mean) / self.std)
