"""`GradientNormMonitor`: the gradient norm of each part of the network (stem, each stage, head), logged at the
logging steps."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.distributed import is_sync_step
from resnet_lit.finetuning.freezing import StageFreezer
from resnet_lit.models.gradient_flow import gradient_norms, part_parameters

PREFIX = "grad_norm/"


class GradientNormMonitor(Callback):
    """Logs `grad_norm/stem`, `grad_norm/stage1` ... `grad_norm/stageN`, `grad_norm/head` and `grad_norm/total`:
    the `norm_type`-norm of all gradients of that part, as gradient clipping measures it (so `total` is the
    number that `trainer.gradient_clip_val` is compared with).

    Measured in `on_before_optimizer_step`: the gradients of the global batch (after DDP's all-reduce, so the same
    on every rank and logged without a collective), summed over the accumulated batches, after fp16 unscaling and
    before clipping. Only at the steps after which Lightning writes the step logs (every
    `trainer.log_every_n_steps`, the steps at which `train/loss` is logged): the norms are computed there on the
    device and logged as tensors, which the logger converts anyway; the steps in between cost nothing, no host
    sync and no collective. With `trainer.log_every_n_steps: 0` nothing is logged.

    The network is the module's `net` (`ResNetClassifier`), else the module itself. Its parts are those of a
    resnet_lit `ResNet` (stem, stages, head, any extra top-level module by its name); a network without that
    layout is grouped by its top-level child modules, each by its attribute name (`grad_norm/<name>`; parameters
    of the network itself: `grad_norm/own`).
    Parameters without a gradient are left out, and so are the stages that `model.freeze_stages` keeps frozen
    (their gradients are computed but dropped before the optimizer step), so a frozen part is not logged.

    Args:
        norm_type: the p of the p-norm: 2.0 for the L2 norm, `.inf` (YAML's infinity) for the largest absolute
            gradient.
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        if not norm_type > 0:  # NaN too
            raise ResNetLitError(
                f"GradientNormMonitor norm_type must be a positive number or inf, got {norm_type}; use 2.0 for the "
                f"L2 norm"
            )
        self.norm_type = float(norm_type)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.log_every_n_steps == 0 or not is_sync_step(trainer, trainer.global_step + 1):
            return
        norms = part_gradient_norms(pl_module, self.norm_type)
        if norms:
            norms["total"] = torch.nn.utils.get_total_norm(list(norms.values()), self.norm_type)
            pl_module.log_dict({PREFIX + name: norm for name, norm in norms.items()}, on_step=True, on_epoch=False)


def part_gradient_norms(pl_module: pl.LightningModule, norm_type: float = 2.0) -> dict[str, Tensor]:
    """The gradient norm of each part of the module's network (see `GradientNormMonitor`), tensors on the
    gradients' device, leaving out the parameters whose gradients the module drops before the optimizer step."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, nn.Module):
        net = pl_module
    freezer = getattr(pl_module, "freezer", None)
    # The module drops the frozen gradients in its own on_before_optimizer_step, which runs after the callbacks'.
    dropped = {id(p) for p in freezer.parameters} if isinstance(freezer, StageFreezer) and freezer.frozen else ()
    return gradient_norms(part_parameters(net), norm_type, skip=dropped)
