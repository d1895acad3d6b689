"""`RankStateCheckpoint`: every rank's random and running-metric states in each checkpoint, for exact resumes.

Lightning checkpoints leave out the RNGs and hold only rank 0's copy of anything else.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

from resnet_lit.fault_tolerance.distributed import gather_objects

CHECKPOINT_KEY = "resnet_lit_rank_states"


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU, current CUDA device), numpy and python RNG states, as weights-only-loadable data.

    Lightning's own collector is private and keeps numpy's state as an array, which `weights_only` loading refuses.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": (
            str(np_name),
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _metrics(pl_module: pl.LightningModule) -> dict[str, Metric]:
    return {name: module for name, module in pl_module.named_modules() if isinstance(module, Metric)}


def capture_metric_states(pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """Accumulated states of every torchmetrics ``Metric`` in the module (this rank's share), on CPU."""

    def to_cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone()
        if isinstance(value, list):
            return [to_cpu(v) for v in value]
        return value

    return {
        name: {"states": {attr: to_cpu(value) for attr, value in metric.metric_state.items()}}
        for name, metric in _metrics(pl_module).items()
    }


def restore_metric_states(pl_module: pl.LightningModule, states: dict[str, dict[str, Any]]) -> None:
    """Inverse of :func:`capture_metric_states`, onto the metrics' devices.

    `reset()` first drops any cached result. The update count restarts at 0 (torchmetrics has no public
    setter); it only weighs mean-reduced states, and the module's metrics sum theirs.
    """
    metrics = _metrics(pl_module)
    for name, saved in states.items():
        metric = metrics.get(name)
        if metric is None:
            continue
        metric.reset()
        device = metric.device
        for attr, value in saved["states"].items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif isinstance(value, list):
                value = [v.to(device) for v in value]
            setattr(metric, attr, value)


class RankStateCheckpoint(Callback):
    """Saves every rank's RNG states and running metric states in each checkpoint; restores them on resume.

    Without them a resumed run draws other dropout / drop-path masks and mixup coefficients than the
    uninterrupted run, and loses the epoch's partial training accuracy. Writing a checkpoint gathers the
    states of all ranks (Lightning calls the checkpoint hooks on every rank). A run resumed on a different
    number of processes starts its random streams afresh (with a warning): exact continuation needs the same
    world size.

    The states are restored right before the first training batch (or epoch start) of the resumed run, not
    when the checkpoint is loaded: restoring, building dataloaders and sanity checks may draw random numbers
    that the uninterrupted run never drew. (For the same reason the resnet-lit DataModules give their
    DataLoaders a private generator.)
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        local = {"rng": capture_rng_state(), "metrics": capture_metric_states(pl_module)}
        ranks = gather_objects(trainer, local)
        checkpoint[CHECKPOINT_KEY] = {"world_size": trainer.world_size, "ranks": ranks}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        self._pending = None
        if saved is None:
            return
        if saved["world_size"] != trainer.world_size:
            warnings.warn(
                f"the checkpoint holds random states of {saved['world_size']} processes but this run has "
                f"{trainer.world_size}: random streams (dropout, drop-path, mixup) restart instead of continuing "
                "exactly",
                stacklevel=2,
            )
            return
        self._pending = saved["ranks"][trainer.global_rank]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called when a resumed run starts a fresh epoch (the checkpoint was taken at an epoch end), not when
        # it continues one: restore the RNG before anything of the new epoch draws from it.
        if self._pending is not None:
            restore_rng_state(self._pending["rng"])
            self._pending["rng"] = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        if self._pending["rng"] is not None:
            restore_rng_state(self._pending["rng"])
        if batch_idx > 0:
            # Resumed mid-epoch (Lightning continues the batch index): the epoch's running metrics continue
            # too. From an epoch-end checkpoint they start afresh, as they do after an epoch end.
            restore_metric_states(pl_module, self._pending["metrics"])
        self._pending = None
