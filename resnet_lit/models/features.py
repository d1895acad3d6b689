"""`ResNetFeatures`: a ResNet as a backbone, returning the feature maps of chosen stages (timm's `features_only`).

Detection and segmentation necks (FPN, U-Net decoders) take several feature maps and their channels and strides;
`create_model(name, features_only=True, out_indices=...)` builds one from any zoo architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from resnet_lit.models.resnet import ResNet, forward_trunk, resolve_feature_indices


class ResNetFeatures(nn.Module):
    """The stem and stages of `model` up to the deepest of `out_indices`, without the head; `forward(x)` returns
    the feature maps at `out_indices` (0 = stem output, i = output of stage i), in index order.

    It holds `model`'s own `stem` and `stages` modules (shared, not copied) under the same names, so its
    `state_dict` keys are the full network's minus `head.*` and the stages after the deepest index. Weights of a
    full checkpoint load with `load_state_dict(state, strict=False)` (its `missing_keys` should be empty), or load
    them into the ResNet before wrapping it. In a pre-activation network the stage outputs are the raw sums: the
    final norm and activation stay with the head.

    Args:
        model: the network to take the parts from.
        out_indices: None = every stage (1..N); an int n = the last n indices; or the indices (negative ones count
            from the end).

    Attributes:
        out_indices: the chosen indices, sorted.
        feature_info: `model.feature_info`'s entries for `out_indices` (`module`, `num_chs`, `reduction`).
    """

    grad_checkpointing = False  # see set_grad_checkpointing

    def __init__(self, model: ResNet, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        indices = resolve_feature_indices(out_indices, len(model.stages), key="out_indices")
        self.out_indices = tuple(indices)
        self.feature_info: list[dict[str, Any]] = [dict(model.feature_info[i]) for i in indices]
        self.stem = model.stem
        self.stages = nn.ModuleList(list(model.stages)[: indices[-1]])
        self.grad_checkpointing = model.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block while training, as `ResNet.set_grad_checkpointing` does."""
        self.grad_checkpointing = enable

    def channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [info["num_chs"] for info in self.feature_info]

    def reductions(self) -> list[int]:
        """Downsampling factor (input side / feature side) of each returned feature map."""
        return [info["reduction"] for info in self.feature_info]

    def forward(self, x: Tensor) -> list[Tensor]:
        return forward_trunk(self, x, keep=self.out_indices)[1]
