"""Non-finite loss policy of `ResNetClassifier` (`model.nonfinite_loss: stop | skip`).

* ``stop`` (default): a NaN/inf loss ends training with :class:`NonFiniteLossError`, whose message names the
  step and epoch of the first bad loss and the last checkpoint written before it. To keep the training loop
  free of per-step host syncs, each step only records "was my loss finite" on the device; the record is
  checked every ``trainer.log_every_n_steps`` steps (when the logger syncs anyway), at epoch ends, at the end
  of training and before every checkpoint is written. So a bad step never reaches a checkpoint: the last one
  written is from before it, and resuming from it with ``--ckpt_path last`` is safe.
* ``skip``: the step is dropped on every rank, counted, logged as ``train/nonfinite_skipped`` and summarised
  at the end of training; the count is kept in checkpoints. Dropping means: BatchNorm running statistics are
  put back as they were before the forward; the training step returns a zero loss built from the parameters
  alone (Lightning forbids returning None under DDP, and DDP needs every rank to run a backward), whose zero
  gradients are then discarded before the optimizer step, so the optimizer (momentum, weight decay, Adam
  moments) does not move. With gradient accumulation the whole accumulated step is dropped. The learning-rate
  schedule still advances. Deciding before the optimizer step costs one host sync per step.

Decisions are collective: the ranks all-reduce their "non-finite" flags, so all stop or skip together and DDP
never waits for a rank that left.

Gradient overflow under fp16 mixed precision is not a fault here: the loss is finite, the precision
plugin's GradScaler skips that optimizer step and lowers its scale.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from resnet_lit.fault_tolerance.distributed import any_rank, max_over_ranks

NonFinitePolicy = Literal["stop", "skip"]


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss under the ``stop`` policy. The message says where and how to go on."""


class NonFiniteLossGuard:
    """Checks the loss of every training step and applies the policy; used by `ResNetClassifier`."""

    def __init__(self, policy: NonFinitePolicy = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self._buffers: list[Tensor] = []
        self._snapshot: list[Tensor] = []
        self._drop_next_step = False
        self._flags: list[Tensor] = []  # "stop": one device flag per step since the last check
        self._where: list[tuple[int, int, int]] = []  # ... and its (step, epoch, batch)

    def before_forward(self, net: nn.Module) -> None:
        """Under ``skip``, remember the buffers (BatchNorm statistics) that the forward pass updates."""
        if self.policy != "skip":
            return
        buffers = [b for b in net.buffers() if b is not None]
        if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers, strict=True)):
            self._buffers = buffers
            self._snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot, buffers)

    def after_loss(self, trainer: pl.Trainer, loss: Tensor, batch_idx: int) -> bool:
        """True when this step must be dropped (``skip``; collective, syncs). Under ``stop`` only records."""
        bad = ~torch.isfinite(loss.detach()).all()
        if self.policy == "stop":
            self._flags.append(bad)
            self._where.append((trainer.global_step, trainer.current_epoch, batch_idx))
            return False
        if not any_rank(trainer, bad):
            return False
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._snapshot)
        self.skipped += 1
        step, epoch = trainer.global_step, trainer.current_epoch
        rank_zero_warn(
            f"resnet-lit: skipped training step {step} (epoch {epoch}, batch {batch_idx}): non-finite loss "
            f"({_describe(loss)}); {self.skipped} skipped so far"
        )
        return True

    def check(self, trainer: pl.Trainer) -> None:
        """``stop``: raise :class:`NonFiniteLossError` if any rank recorded a non-finite loss since the last
        check. Collective: call it at the same step on all ranks."""
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
            f"Training stopped; {last_checkpoint(trainer)}. Fix the cause (learning rate, warmup, data) and "
            "resume with --ckpt_path last, or set model.nonfinite_loss: skip to skip such steps"
        )

    def skip_loss(self, module: nn.Module) -> Tensor:
        """The loss to return for a skipped step: zero, through every trainable parameter and nothing else."""
        self._drop_next_step = True
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call from `on_before_optimizer_step`: without gradients the optimizer leaves every parameter alone."""
        if self._drop_next_step:
            optimizer.zero_grad(set_to_none=True)
            self._drop_next_step = False

    def summarize(self) -> None:
        if self.skipped:
            rank_zero_info(
                f"resnet-lit: {self.skipped} training step(s) were skipped because of a non-finite loss "
                "(model.nonfinite_loss: skip); logged as train/nonfinite_skipped"
            )


def _describe(loss: Tensor) -> str:
    value = loss.detach().float().item()
    return f"{value}" if not math.isfinite(value) else f"finite here ({value:.4g}), non-finite on another rank"


def last_checkpoint(trainer: pl.Trainer) -> str:
    """'last good checkpoint: <path> (step N)', or a note that none was written."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            step = getattr(callback, "_last_global_step_saved", 0)
            return f"last good checkpoint: {path}" + (f" (step {step})" if step else "")
    return "no checkpoint was written before it"
