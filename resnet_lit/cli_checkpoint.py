"""What `--ckpt_path` contributes before the model is built: the file it names, a warning when that file is
unpickled without `weights_only`, and the saved hyperparameters that fill the model options nobody set.

Precedence of a model option: defaults < checkpoint < config files < command line.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from fsspec.utils import get_protocol
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from resnet_lit.fault_tolerance.checkpoint_io import CheckpointReadError, check_checkpoint_file

# Resolved by Lightning from the Trainer's state, never a file named on the command line.
LIGHTNING_CKPT_NAMES = ("best", "hpc")


class UnsafeCheckpointLoadWarning(UserWarning):
    """A checkpoint is loaded with `weights_only: false`, i.e. unpickled with arbitrary code execution."""


def checkpoint_file(ckpt_path: str | None, checkpoint_dir: str) -> str | None:
    """The local file `--ckpt_path` will load; None when nothing is loaded (no `last` checkpoint yet), or
    Lightning resolves the name (`best`, `hpc`, registries) or reads it (remote URLs).

    `last` is the newest `last*.ckpt` of `checkpoint_dir`, the file Lightning's own lookup picks.
    """
    registry = ckpt_path is not None and (ckpt_path.lower() == "registry" or ckpt_path.lower().startswith("registry:"))
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES or registry:
        return None
    if get_protocol(ckpt_path) != "file":
        return None
    if ckpt_path != "last":
        return ckpt_path
    if not os.path.isdir(checkpoint_dir):
        return None
    candidates = [
        os.path.join(checkpoint_dir, name)
        for name in os.listdir(checkpoint_dir)
        if name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST) and name.endswith(ModelCheckpoint.FILE_EXTENSION)
    ]
    candidates = [path for path in candidates if os.path.isfile(path)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def warn_unsafe_load(path: str) -> None:
    """Say, every time, that `path` is unpickled with arbitrary code execution (also when Python's warning
    filter has shown the same text before in this process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnsafeCheckpointLoadWarning)
        rank_zero_warn(
            f"resnet-lit: weights_only is false, so {path} is unpickled in full: a checkpoint file can run any "
            "code this way. Use it only for a file you trust (model.init_from always loads weights only).",
            category=UnsafeCheckpointLoadWarning,
        )


def saved_hyperparameters(path: str, weights_only: bool) -> dict[str, Any]:
    """The `hyper_parameters` of the checkpoint `path`. A missing, empty, truncated or foreign file fails here,
    in one line, before anything is built; the digest is verified when the run restores the file."""
    check_checkpoint_file(path, "--ckpt_path")
    try:
        checkpoint = _load_without_tensor_data(path, weights_only)
    except pickle.UnpicklingError as err:
        raise CheckpointReadError(
            f"refusing to load a checkpoint that needs arbitrary unpickling: --ckpt_path {path!r} "
            f"{refused_pickle(err)}; set weights_only: false only for a file you trust"
        ) from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointReadError(f"cannot read --ckpt_path {path!r}: {type(err).__name__}: {first}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def refused_pickle(err: pickle.UnpicklingError) -> str:
    """What `torch.load(weights_only=True)` refused in a file, in a few words (torch's message is a page)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return f"holds a {found.group(1)}, not only tensors and plain data"
    lines = str(err).strip().splitlines()
    return f"holds what weights-only loading refuses ({lines[0] if lines else type(err).__name__})"


def _load_without_tensor_data(path: str, weights_only: bool) -> Any:
    """`torch.load`, memory-mapping the tensors of a zip checkpoint instead of reading them."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # mmap needs the zip format; an old-style pickle is read whole
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def unset_hyperparameters(saved: Mapping[str, Any], model: Namespace, explicit: Namespace) -> dict[str, Any]:
    """The saved model options that no config file and no command-line argument set.

    `model` is the parsed `model` section (defaults included), `explicit` what config files and the command
    line set in it. Keys that are no option of the model (e.g. linked from the data: `num_classes`) are left
    out. `net` is merged field by field and returned whole, since a parsed `net` replaces the old one.
    """
    options = {key.split(".")[0] for key, _ in model.items()}
    fill = {key: value for key, value in saved.items() if key in options and key != "net" and key not in explicit}
    saved_net = saved.get("net")
    if "net" in options and isinstance(saved_net, Mapping) and not ("net" in explicit and explicit.net is None):
        added = {key: value for key, value in saved_net.items() if f"net.{key}" not in explicit}
        if added:
            current = model.get("net")
            current = current.as_dict() if isinstance(current, Namespace) else dict(current or {})
            fill["net"] = {**{k: v for k, v in current.items() if v is not None}, **added}
    return fill
