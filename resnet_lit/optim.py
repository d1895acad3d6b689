"""Optimizer helpers: weight-decay parameter groups, learning-rate scaling and a warmup+cosine schedule."""

from __future__ import annotations

import bisect
import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from resnet_lit.errors import ResNetLitError
from resnet_lit.models.resnet import ResNet

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(
    module: nn.Module, exclude_norm_and_bias_from_weight_decay: bool, layer_decay: float | None = None
) -> list[dict]:
    """Parameters as optimizer groups; optionally a second group with `weight_decay=0` for norms and biases.

    Decaying norm scales and biases only shrinks them toward a degenerate network, so modern recipes
    (Goyal et al. 2017; timm; torchvision's v2 recipe) exempt them. With `layer_decay`, `module` must be a
    resnet_lit `ResNet`: every block (stem, each block of each stage, head) gets its own groups, each with an
    `lr_scale` of `layer_decay ** distance from the head` (see `layer_distances`); `apply_lr_scales` applies it.
    """
    if layer_decay is not None:
        groups = []
        for distance, block in layer_distances(module):
            for group in param_groups(block, exclude_norm_and_bias_from_weight_decay):
                if group["params"]:
                    groups.append({**group, "lr_scale": layer_decay**distance})
        return groups
    if not exclude_norm_and_bias_from_weight_decay:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_exempt = isinstance(submodule, _NORM_TYPES) or name.endswith("bias")
            (no_decay if is_exempt else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_distances(net: nn.Module) -> list[tuple[int, nn.Module]]:
    """`(distance from the head, block)` for the head (0), every block of every stage (the last one 1) and the
    stem (number of blocks + 1): layer-wise LR decay from the network's structure, so plugin blocks need no
    name matcher. `net` must be a resnet_lit `ResNet`."""
    if not isinstance(net, ResNet):
        raise ResNetLitError(
            f"model.layer_decay needs a resnet_lit ResNet (stem, stages, head), not a {type(net).__name__}"
        )
    blocks = [block for stage in net.stages for block in stage]
    layered = [(0, net.head)] + [(len(blocks) - index, block) for index, block in enumerate(blocks)]
    return [*layered, (len(blocks) + 1, net.stem)]


def check_layer_decay(net: nn.Module, layer_decay: float | None, arch: str) -> None:
    """Raise a one-line ResNetLitError, naming the value or `arch`, when `layer_decay` cannot apply to `net`."""
    if layer_decay is None:
        return
    if not 0.0 < layer_decay <= 1.0:
        raise ResNetLitError(f"model.layer_decay must be in (0, 1] (or null to turn it off), got {layer_decay}")
    if not isinstance(net, ResNet):
        raise ResNetLitError(
            f"model.layer_decay needs a resnet_lit ResNet (stem, stages, head), but model.arch {arch!r} builds a "
            f"{type(net).__name__}; set model.layer_decay: null"
        )


def apply_lr_scales(optimizer: Optimizer) -> None:
    """Multiply each group's lr by its `lr_scale` (set by `param_groups` for layer decay), once, when the
    optimizer is built: the scale stays in the group for the record, and schedulers then scale all alike."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)


def scale_learning_rate(optimizer: Optimizer, factor: float) -> None:
    """Multiply every group's learning rate (and `initial_lr`, if a scheduler already set it) by `factor`."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def restored_base_lrs(optimizer: Optimizer, schedulers: list[Any]) -> list[float]:
    """The base learning rate per group of a restored optimizer: its scheduler's, else the group's initial lr."""
    for scheduler in schedulers:
        base_lrs = getattr(scheduler, "base_lrs", None)
        if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups):
            return [float(lr) for lr in base_lrs]
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def rescale_restored_lr(
    optimizer: Optimizer, schedulers: list[Any], restored: list[float], configured: list[float]
) -> str | None:
    """Continue a restored schedule at a newly configured learning rate: scale each group's lr, `initial_lr`
    and the schedulers' `base_lrs` by configured / restored. Returns the line to log, or None when unchanged
    (then nothing is touched, so an unchanged config resumes bit for bit)."""
    if len(restored) != len(optimizer.param_groups) or len(configured) != len(restored):
        return None
    factors = [new / old if old and not math.isclose(new, old, rel_tol=1e-9) else 1.0
               for new, old in zip(configured, restored, strict=True)]  # fmt: skip
    if all(factor == 1.0 for factor in factors):
        return None
    for index, (group, factor) in enumerate(zip(optimizer.param_groups, factors, strict=True)):
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
        for scheduler in schedulers:
            for name in ("base_lrs", "_last_lr"):  # _last_lr: what get_last_lr() reports until the next step
                values = getattr(scheduler, name, None)
                if isinstance(values, list) and len(values) == len(factors):
                    values[index] *= factor
    return (
        f"resnet-lit: the configured learning rate {_format(configured)} differs from the checkpoint's "
        f"{_format(restored)}: the restored schedule continues scaled by {_format(factors)} "
        f"(lr now {_format([group['lr'] for group in optimizer.param_groups])})"
    )


def _format(values: list[float]) -> str:
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return f"{distinct[0]:g}"
    if len(values) > 6:  # e.g. layer decay's groups: the first ones (the head) and the last (the stem)
        return f"[{values[0]:g}, {values[1]:g}, ..., {values[-1]:g}] ({len(values)} groups)"
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


class WarmupCosineLR(LambdaLR):
    """Linear warmup from `warmup_start_factor` x lr to lr, then cosine decay to `min_lr_ratio` x lr.

    Stepped once per optimizer step. `total_steps=None` means "the whole run": the LightningModule
    fills it in from `trainer.estimated_stepping_batches` through `set_total_steps()`. Warmup and
    total may be given in steps (int) or, for warmup, as a fraction of the total (float < 1).

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: warmup length in steps, or a fraction of `total_steps` when below 1.
        total_steps: schedule length in steps; None to take the run length.
        min_lr_ratio: final learning rate as a fraction of the peak.
        warmup_start_factor: first-step learning rate as a fraction of the peak.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: float = 0.0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        warmup_start_factor: float = 0.01,
    ) -> None:
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0 or not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(
                f"WarmupCosineLR: need warmup_steps >= 0 and ratios in [0, 1], got warmup_steps={warmup_steps}, "
                f"min_lr_ratio={min_lr_ratio}, warmup_start_factor={warmup_start_factor}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_factor = warmup_start_factor
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule length once the run length is known (no-op when given explicitly).

        A fractional warmup only gets its length here, after the constructor already set the first learning
        rate: it is recomputed, so that the first optimizer step runs at `warmup_start_factor` x lr.
        """
        if self.total_steps is not None:
            return
        if total_steps < 0:
            raise ValueError(f"WarmupCosineLR: total_steps must not be negative, got {total_steps}")
        self.total_steps = int(total_steps)
        lrs = [base_lr * self._factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def _warmup_length(self) -> int:
        if self.warmup_steps < 1 and self.total_steps is not None:
            return int(self.warmup_steps * self.total_steps)
        return int(self.warmup_steps)

    def _factor(self, step: int) -> float:
        warmup = self._warmup_length()
        if step < warmup:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / warmup
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupMultiStepLR(LambdaLR):
    """A constant warmup at `warmup_factor` x lr for `warmup_steps` steps, then lr multiplied by `gamma` at each
    milestone: the schedule of He et al. (2016) for their deepest CIFAR networks (ResNet-110 and the 1001-layer
    pre-activation ResNet start at 0.01 for about 400 iterations, then 0.1, divided by 10 at 32k and 48k).

    Stepped once per optimizer step (or per epoch with `scheduler_interval: epoch`, milestones then in epochs).

    Args:
        optimizer: the wrapped optimizer.
        milestones: steps at which the lr is multiplied by `gamma`, increasing.
        gamma: the factor at each milestone.
        warmup_steps: steps at the reduced lr before the schedule starts (0: none).
        warmup_factor: the warmup's lr as a fraction of the configured lr.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: list[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_factor: float = 0.1,
    ) -> None:
        if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"WarmupMultiStepLR: milestones must be increasing and not negative, got {milestones}")
        if warmup_steps < 0 or not 0.0 < warmup_factor <= 1.0 or gamma <= 0:
            raise ValueError(
                f"WarmupMultiStepLR: need warmup_steps >= 0, warmup_factor in (0, 1] and gamma > 0, got "
                f"warmup_steps={warmup_steps}, warmup_factor={warmup_factor}, gamma={gamma}"
            )
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor
        return self.gamma ** bisect.bisect_right(self.milestones, step)
