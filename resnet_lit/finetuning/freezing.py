"""Stage freezing for fine-tuning: `model.freeze_stages` K and `model.unfreeze_at_epoch` N.

The stem and the first K stages of a resnet_lit `ResNet` keep their weights, and their BatchNorm layers stay in
eval mode (normalising with the loaded running statistics, which therefore do not move), until epoch N; from
then on they train at whatever learning rate the schedule gives at that point.

The frozen parameters keep `requires_grad=True`, and their gradients are dropped (`grad = None`) just before
each optimizer step instead: under DDP a parameter that does not require a gradient when the model is wrapped
is never registered with DDP, so once unfrozen its gradient would not be averaged over the processes and the
ranks would drift apart silently. Keeping them in the optimizer's parameter groups all along also means no new
groups at N: the schedule already holds their learning rate. A parameter without a gradient is skipped by every
torch optimizer (no weight decay, no momentum) and by gradient clipping, which runs after
`on_before_optimizer_step` (and that hook runs after fp16 unscaling).

The cost: the backward pass still runs through the frozen stages, and DDP still all-reduces their gradients, so
a frozen step is about as expensive as an unfrozen one; freezing buys stable features, not speed.

The state follows the epoch (`trainer.current_epoch` at train start and at every epoch start), so a resume
before N stays frozen and a resume at or after N starts unfrozen, as the uninterrupted run did.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_lit.errors import ResNetLitError
from resnet_lit.models.resnet import ResNet


def check_freezing(net: nn.Module, freeze_stages: int, unfreeze_at_epoch: int | None, arch: str) -> None:
    """Raise a one-line ResNetLitError, naming the key, when the freezing options cannot apply to `net`."""
    if unfreeze_at_epoch is not None and freeze_stages == 0:
        raise ResNetLitError(
            f"model.unfreeze_at_epoch ({unfreeze_at_epoch}) needs model.freeze_stages of 1 or more, but nothing is "
            f"frozen (model.freeze_stages: 0); set model.freeze_stages or model.unfreeze_at_epoch: null"
        )
    if freeze_stages == 0:
        return
    if not isinstance(net, ResNet):
        raise ResNetLitError(
            f"model.freeze_stages needs a resnet_lit ResNet (stem, stages, head), but model.arch {arch!r} builds a "
            f"{type(net).__name__}; set model.freeze_stages: 0"
        )
    if freeze_stages > len(net.stages):
        raise ResNetLitError(
            f"model.freeze_stages is {freeze_stages} but model.arch {arch!r} has {len(net.stages)} stages; freeze "
            f"at most {len(net.stages)} (the head always trains)"
        )


class StageFreezer:
    """Keeps the stem and the first `freeze_stages` stages of `net` frozen before epoch `unfreeze_at_epoch`
    (None: the whole run). Inactive (`frozen` False) until the first `start_epoch`.

    The LightningModule calls `start_epoch` at train start and at every epoch start, `keep_norms_in_eval` after
    every `train()`, and `drop_gradients` in `on_before_optimizer_step`.
    """

    def __init__(self, net: nn.Module, freeze_stages: int, unfreeze_at_epoch: int | None, arch: str) -> None:
        check_freezing(net, freeze_stages, unfreeze_at_epoch, arch)
        self.freeze_stages = freeze_stages
        self.unfreeze_at_epoch = unfreeze_at_epoch
        parts: list[nn.Module] = [net.stem, *net.stages[:freeze_stages]] if freeze_stages else []
        self.parameters: list[nn.Parameter] = [p for part in parts for p in part.parameters()]
        self.norms: list[_BatchNorm] = [m for part in parts for m in part.modules() if isinstance(m, _BatchNorm)]
        self.frozen = False

    def frozen_at(self, epoch: int) -> bool:
        """Whether the stem and the first stages are frozen during `epoch`."""
        return self.freeze_stages > 0 and (self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch)

    def start_epoch(self, epoch: int, training: bool) -> None:
        """Freeze or unfreeze for `epoch` (logged once per change) and set the frozen part's BatchNorm modes:
        eval while frozen, else the module's mode `training` (Lightning restores the modes it captured before
        validation, so a layer kept in eval mode would stay there unless put back)."""
        frozen = self.frozen_at(epoch)
        if frozen != self.frozen:
            rank_zero_info(self._describe(frozen, epoch))
        self.frozen = frozen
        for norm in self.norms:
            norm.train(training and not frozen)

    def keep_norms_in_eval(self) -> None:
        """While frozen, put the frozen part's BatchNorm layers back into eval mode (after a `train()`)."""
        if self.frozen:
            for norm in self.norms:
                norm.eval()

    def drop_gradients(self) -> None:
        """While frozen, drop the frozen parameters' gradients, so that the optimizer step leaves them alone."""
        if self.frozen:
            for param in self.parameters:
                param.grad = None

    def _describe(self, frozen: bool, epoch: int) -> str:
        part = f"the stem and the first {self.freeze_stages} stage(s)"
        if not frozen:
            return f"resnet-lit: epoch {epoch}: {part} train from now on (model.unfreeze_at_epoch: {epoch})"
        until = "for the whole run" if self.unfreeze_at_epoch is None else f"until epoch {self.unfreeze_at_epoch}"
        return (
            f"resnet-lit: {part} are frozen {until} (model.freeze_stages: {self.freeze_stages}): their weights are "
            f"kept and their BatchNorm layers stay in eval mode"
        )
