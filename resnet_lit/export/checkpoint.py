"""The checkpoint `resnet-lit export --ckpt_path` ships: a file, ``last`` (the newest ``last*.ckpt`` of the run's
checkpoint folder) or ``best`` (the best checkpoint that folder's ``last.ckpt`` records), loaded weights-only with its
digest checked, into the module the CLI built from its hyperparameters."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule

from resnet_lit.cli_checkpoint import checkpoint_file
from resnet_lit.export.errors import ExportError
from resnet_lit.fault_tolerance.checkpoint_io import check_checkpoint_fits, read_checkpoint


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: str, weights_only: bool = True) -> str | None:
    """The local file that ``ckpt_path`` names (None: no checkpoint, export the network as configured)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "best":
        last = checkpoint_file("last", checkpoint_dir)
        if last is None:
            raise ExportError(f"--ckpt_path best: no last.ckpt in {checkpoint_dir} records a best checkpoint")
        best = _best_model_path(read_checkpoint(last, map_location="cpu", weights_only=weights_only,
                                                what="--ckpt_path best: last checkpoint"))  # fmt: skip
        if not best:
            raise ExportError(f"--ckpt_path best: {last} records no best checkpoint (is checkpoint.monitor set?)")
        return best
    path = checkpoint_file(ckpt_path, checkpoint_dir)
    if path is None:
        raise ExportError(f"--ckpt_path {ckpt_path}: no such checkpoint (looked in {checkpoint_dir})")
    return path


def load_weights(module: LightningModule, path: str, weights_only: bool = True) -> None:
    """Load the checkpoint ``path`` into ``module`` strictly (its EMA weights included), as ``validate`` does."""
    checkpoint = read_checkpoint(path, map_location="cpu", weights_only=weights_only, what="--ckpt_path")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"--ckpt_path {path!r} is not a Lightning checkpoint (no state_dict)")
    module.on_load_checkpoint(checkpoint)  # aligns the EMA entries with the module's, as a resume does
    check_checkpoint_fits(module, checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)


def run_dir_of(path: str | None, default_root_dir: str) -> str:
    """The run folder of a checkpoint ``D/checkpoints/x.ckpt`` (D), else the configured ``default_root_dir``."""
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(folder) == "checkpoints":
            return os.path.dirname(folder)
    return default_root_dir


def _best_model_path(checkpoint: Any) -> str | None:
    callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    for key, state in callbacks.items():
        if "Checkpoint" in str(key) and isinstance(state, dict) and state.get("best_model_path"):
            return str(state["best_model_path"])
    return None
