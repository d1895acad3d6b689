"""The non-finite loss policy (`model.nonfinite_loss: stop | skip`) as a Lightning callback, and the check that
keeps non-finite weights out of checkpoints.

A NaN/inf loss either ends training before any checkpoint holds the bad step ("stop"), or drops that step on
every rank ("skip") until too many recent steps were dropped. The callback reads the policy from the module's
hyperparameters, so the module only declares the option; the limits of "skip" are the callback's own
arguments (set them through `trainer.callbacks`). Gradient overflow under fp16 is no fault here: the loss is
finite and the GradScaler skips that step itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.distributed import any_rank, is_sync_step, max_over_ranks

NonFinitePolicy = Literal["stop", "skip"]
POLICIES: tuple[str, ...] = ("stop", "skip")
RESUME_ADVICE = "resume with --ckpt_path last --model.optimizer.init_args.lr <lower lr>"
CHECKED_STATE: tuple[str, ...] = ("state_dict", "optimizer_states")  # the checkpoint entries that must be finite


class NonFiniteLossError(ResNetLitError, RuntimeError):
    """Training met a NaN or infinite loss under ``stop``, or too many under ``skip``. The message says where
    and how to go on."""


class NonFiniteStateError(ResNetLitError):
    """A checkpoint was about to store a NaN or infinite weight, buffer or optimizer state; it was not written."""


class NonFiniteLossPolicy(Callback):
    """Applies the LightningModule's ``nonfinite_loss`` hyperparameter ("stop" when absent) to every training loss.

    ``stop``: each step records "was the loss finite" on the device, without a host sync or a collective; the
    records are checked after every logging step (``log_every_n_steps``; every 50 steps when step logging is
    off), at epoch and training end and before every checkpoint is written, and a bad one raises
    :class:`NonFiniteLossError` naming the step and the last good checkpoint. Training may thus run up to
    ``log_every_n_steps`` steps past a bad one before it stops; no checkpoint holds them.

    ``skip``: the ranks agree on every loss, which costs a host sync and a collective at every step (a step
    must be dropped before its optimizer step, on all ranks alike); a step that is non-finite anywhere is
    dropped everywhere: BatchNorm statistics are put back, its gradients (with accumulation: the whole
    accumulated step's) are discarded before the optimizer step, so the optimizer state does not move. The
    count is logged as ``train/nonfinite_skipped`` and kept in checkpoints. The learning-rate schedule still
    advances; under fp16 the GradScaler also sees the non-finite gradients and lowers its scale. When more than
    ``max_skip_fraction`` of the last ``window`` training batches were skipped, training stops with
    :class:`NonFiniteLossError`: a run that keeps producing NaNs is diverging, not hitting a bad batch.

    Args:
        max_skip_fraction: ``skip`` stops once more than this fraction of the last ``window`` batches were
            skipped (1.0: never).
        window: how many of the most recent training batches ``max_skip_fraction`` counts over.
    """

    def __init__(self, max_skip_fraction: float = 0.1, window: int = 100) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ResNetLitError(f"NonFiniteLossPolicy max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        if window < 1:
            raise ResNetLitError(f"NonFiniteLossPolicy window must be at least 1, got {window!r}")
        self.max_skip_fraction = max_skip_fraction
        self.window = window
        self.policy: NonFinitePolicy = "stop"
        self.skipped = 0
        self._recent: deque[int] = deque(maxlen=window)  # "skip": 1 per skipped batch of the last `window`
        self.last_saved_step: int | None = None  # global step of the last checkpoint written (or resumed from)
        self._batch_idx = 0
        self._drop_step = False
        self.step_dropped = False  # whether the last optimizer step's gradients were discarded ("skip")
        self._restore_buffers = False
        self._buffers: list[Tensor] = []
        self._snapshot: list[Tensor] = []
        self._flags: list[Tensor] = []  # "stop": one device flag per step since the last check
        self._where: list[tuple[int, int, int]] = []  # ... and its (step, epoch, batch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        policy = pl_module.hparams.get("nonfinite_loss", "stop")
        if policy not in POLICIES:
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if self.policy == "skip":
            self._remember_buffers(pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        if self.policy == "stop":
            self._flags.append(bad)
            self._where.append((trainer.global_step, trainer.current_epoch, self._batch_idx))
        else:
            dropped = any_rank(trainer, bad)  # collective: every rank drops the step, or none
            if dropped:
                self._skip(trainer, loss)
            self._recent.append(int(dropped))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restore_buffers:  # not before: the backward pass of BatchNorm reads the buffers it saved
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._snapshot)
            self._restore_buffers = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.step_dropped = self._drop_step  # read through `optimizer_step_dropped` after the step
        if self._drop_step:  # parameters without gradients are left alone by every torch optimizer
            optimizer.zero_grad(set_to_none=True)
            self._drop_step = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sync_step = is_sync_step(trainer, trainer.global_step)  # the logger syncs after these steps anyway
        if self.policy == "skip":
            if sync_step:
                pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
            self.check_skip_limit(trainer)
        elif sync_step:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)
        if self.skipped:
            rank_zero_info(
                f"resnet-lit: {self.skipped} training step(s) were skipped because of a non-finite loss "
                "(model.nonfinite_loss: skip); logged as train/nonfinite_skipped"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)  # never write a checkpoint after a non-finite loss ...
        self.check_state(trainer, checkpoint)  # ... nor one with non-finite weights, statistics or moments
        self.last_saved_step = trainer.global_step

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.last_saved_step = checkpoint.get("global_step")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "recent": list(self._recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self._recent = deque(state_dict.get("recent", []), maxlen=self.window)

    def check_skip_limit(self, trainer: pl.Trainer) -> None:
        """``skip``: raise :class:`NonFiniteLossError` once more than ``max_skip_fraction`` of the last ``window``
        batches were skipped. The ranks agree on every skip, so all of them stop at the same batch."""
        count = sum(self._recent)
        if count <= self.max_skip_fraction * self.window:
            return
        raise NonFiniteLossError(
            f"non-finite training loss in {count} of the last {self.window} training batches, more than the "
            f"limit of {self.max_skip_fraction:g} (model.nonfinite_loss: skip); training stopped at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}); "
            f"{self._last_checkpoint(trainer)}. Fix the cause (learning rate, warmup, data) and {RESUME_ADVICE}, "
            "or raise max_skip_fraction / window of the NonFiniteLossPolicy in trainer.callbacks"
        )

    def check(self, trainer: pl.Trainer) -> None:
        """``stop``: raise :class:`NonFiniteLossError` if any rank recorded a non-finite loss since the last
        check. Collective: every rank calls it at the same step."""
        if self.policy != "stop" or not self._flags:
            return
        flags, where = torch.stack(self._flags), self._where
        self._flags, self._where = [], []
        if not any_rank(trainer, flags.any()):
            return
        local_first = int(flags.nonzero()[0, 0]) if flags.any() else len(where)
        first = -max_over_ranks(trainer, -local_first)  # the earliest bad step over all ranks
        step, epoch, batch = where[first]
        local = "non-finite on this rank" if first == local_first else "non-finite on another rank"
        raise NonFiniteLossError(
            f"non-finite training loss at step {step} (epoch {epoch}, batch {batch}), {local}. "
            f"Training stopped; {self._last_checkpoint(trainer)}. Fix the cause (learning rate, warmup, data) and "
            f"{RESUME_ADVICE}, or set model.nonfinite_loss: skip to skip such steps"
        )

    def check_state(self, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
        """Raise :class:`NonFiniteStateError` on every rank if the model or optimizer state about to be saved is
        not finite on any rank (BatchNorm statistics differ between ranks). Collective."""
        bad = first_nonfinite_tensor(checkpoint)
        if not any_rank(trainer, bad is not None):
            return
        where = f"{bad[0]} holds {bad[1]}" if bad is not None else "the state of another rank is not finite"
        raise NonFiniteStateError(
            f"refusing to write a checkpoint at step {trainer.global_step}: {where}, the training state is no "
            f"longer finite; {self._last_checkpoint(trainer)}. Fix the cause (learning rate, warmup, data) and "
            f"{RESUME_ADVICE}"
        )

    def _remember_buffers(self, pl_module: pl.LightningModule) -> None:
        """Copy the buffers (BatchNorm statistics) that the forward pass is about to update."""
        buffers = list(pl_module.buffers())
        if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers, strict=True)):
            self._buffers = buffers
            self._snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot, buffers)

    def _skip(self, trainer: pl.Trainer, loss: Tensor) -> None:
        self._restore_buffers = bool(self._buffers)
        self._drop_step = True
        self.skipped += 1
        rank_zero_warn(
            f"resnet-lit: skipped training step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{self._batch_idx}): non-finite loss ({_describe(loss)}); {self.skipped} skipped so far"
        )

    def _last_checkpoint(self, trainer: pl.Trainer) -> str:
        """'last good checkpoint: <path> (step N)', or a note that none was written."""
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            if path:
                step = "" if self.last_saved_step is None else f" (step {self.last_saved_step})"
                return f"last good checkpoint: {path}{step}"
        return "no checkpoint was written before it"


def optimizer_step_dropped(trainer: pl.Trainer) -> bool:
    """Whether the `NonFiniteLossPolicy` among `trainer.callbacks` dropped the last optimizer step (its gradients
    were discarded, so the weights did not move); False without one. Decided on the host: no sync."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteLossPolicy):
            return callback.step_dropped
    return False


def _describe(loss: Tensor) -> str:
    value = loss.detach().float().item()
    return f"{value}" if not math.isfinite(value) else f"finite here ({value:.4g}), non-finite on another rank"


def first_nonfinite_tensor(checkpoint: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(key, "NaN" | "inf")`` of the first floating tensor of the model or optimizer state in ``checkpoint``
    that is not finite, or None. One host sync per device, whatever the number of tensors.

    Callback states are not checked: some hold infinities by design (``ModelCheckpoint``'s initial
    ``kth_value``, ``EarlyStopping``'s ``best_score``).
    """
    found = [(key, t) for name in CHECKED_STATE if name in checkpoint for key, t in _floating(checkpoint[name], name)]
    if not found:
        return None
    finite = [torch.isfinite(t).all() for _, t in found]
    by_device: dict[torch.device, list[int]] = {}
    for index, flag in enumerate(finite):
        by_device.setdefault(flag.device, []).append(index)
    bad: list[int] = []
    for indices in by_device.values():
        values = torch.stack([finite[i] for i in indices]).cpu().tolist()
        bad.extend(i for i, ok in zip(indices, values, strict=True) if not ok)
    if not bad:
        return None
    key, tensor = found[min(bad)]
    return key, "NaN" if bool(torch.isnan(tensor).any()) else "inf"


def _floating(value: Any, key: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        if (value.is_floating_point() or value.is_complex()) and value.device.type != "meta":
            yield key, value.detach()
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _floating(item, f"{key}[{name!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _floating(item, f"{key}[{index}]")
