"""`AtomicCheckpointIO`, the CheckpointIO of every resnet-lit Trainer, and readable architecture mismatches
when checkpoint weights are loaded into a network."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpoint_files import (
    TEMP_SUFFIX,
    CheckpointReadError,
    CheckpointWriteError,
    atomic_torch_save,
    check_checkpoint_file,
    read_checkpoint,
    read_safetensors,
)
from resnet_lit.fault_tolerance.nonfinite import RESUME_ADVICE, NonFiniteStateError, first_nonfinite_tensor
from resnet_lit.models.pretrained import is_named_source, resolve_named_source
from resnet_lit.models.timm_weights import is_external_layout, translate_state_dict, unwrap_state_dict

__all__ = [
    "TEMP_SUFFIX",
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "atomic_torch_save",
    "check_checkpoint_file",
    "check_checkpoint_fits",
    "check_finite_state",
    "load_network_weights",
    "read_checkpoint",
]


def check_finite_state(checkpoint: Mapping[str, Any], path: str) -> None:
    """Raise :class:`NonFiniteStateError` if the model or optimizer state of ``checkpoint`` is not finite."""
    bad = first_nonfinite_tensor(checkpoint)
    if bad is None:
        return
    key, kind = bad
    raise NonFiniteStateError(
        f"refusing to write checkpoint {path}: {key} holds {kind}, the training state is no longer finite; "
        f"the previous checkpoints in {os.path.dirname(os.path.abspath(path))} are kept. Fix the cause "
        f"(learning rate, warmup, data) and {RESUME_ADVICE}"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with same-folder temp file + fsync + ``os.replace`` writes for local paths,
    a digest inside every file, and checked ``weights_only=True`` loading unless told otherwise. Remote URLs
    (``s3://`` ...) use Lightning's path.

    Lightning's own atomic save writes its temporary file in the system temp folder and moves it over the
    target. When that folder and the checkpoint folder are on different filesystems (a local ``/tmp`` and
    NFS/Lustre, the usual cluster layout) the move is a copy that overwrites ``last.ckpt`` in place, without
    fsync: a kill or node failure during it leaves a truncated ``last.ckpt``. Here ``last.ckpt`` is always
    either the previous or the new complete checkpoint.

    Saving refuses (:class:`NonFiniteStateError`, nothing written) a checkpoint whose weights, buffers or
    optimizer state are not finite. Loading verifies the stored digest (:func:`read_checkpoint`).

    The resnet-lit CLI uses it unless a CheckpointIO plugin is configured.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        check_finite_state(checkpoint, str(path))
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        weights_only = True if weights_only is None else weights_only
        if get_protocol(str(path)) != "file":
            return super().load_checkpoint(path, map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


class CheckpointMismatchError(ResNetLitError, RuntimeError):
    """A checkpoint's weights do not fit the model (the message lists the keys and shapes that differ), or
    the `model.init_from` / `model.reinit_head` settings are unusable."""


def state_dict_mismatch(
    model_state: Mapping[str, Any], checkpoint_state: Mapping[str, Any]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """``(missing, unexpected, shape mismatches)`` of loading ``checkpoint_state`` into ``model_state``.

    Shape mismatches are ``(key, checkpoint shape, model shape)``.
    """
    missing = sorted(k for k in model_state if k not in checkpoint_state)
    unexpected = sorted(k for k in checkpoint_state if k not in model_state)
    shapes = []
    for key in sorted(set(model_state) & set(checkpoint_state)):
        ours, theirs = model_state[key], checkpoint_state[key]
        if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor) and ours.shape != theirs.shape:
            shapes.append((key, tuple(theirs.shape), tuple(ours.shape)))
    return missing, unexpected, shapes


def describe_mismatch(
    missing: list[str],
    unexpected: list[str],
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    limit: int = 12,
) -> str:
    """A readable multi-line list of what differs (at most ``limit`` keys per kind)."""

    def listed(keys: list[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    lines = []
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatch(es) (checkpoint -> model):")
        lines.extend(f"    {key}: {list(ckpt)} -> {list(model)}" for key, ckpt, model in shapes[:limit])
        if len(shapes) > limit:
            lines.append(f"    ... ({len(shapes) - limit} more)")
    if missing:
        lines.append(f"  {len(missing)} key(s) of the model missing from the checkpoint: {listed(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} key(s) of the checkpoint not in the model: {listed(unexpected)}")
    return "\n".join(lines)


def classifier_head_prefix(net: nn.Module) -> str | None:
    """Name of the network's last ``nn.Linear`` (the classifier), e.g. ``head.fc``; None if it has none."""
    name = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


def load_network_weights(net: nn.Module, path: str, reinit_head: bool) -> str:
    """Load ``path`` into ``net``: a resnet-lit/Lightning checkpoint (its weight average of ``model.ema_decay``
    when it holds one), a plain state dict of the network, a torchvision- or timm-format ResNet state dict
    (``.pth``/``.pt``), a ``.safetensors`` file of any of these, or a named source
    ``torchvision:<arch>.<WEIGHTS>`` (see :mod:`resnet_lit.models.pretrained`).

    Foreign key names are translated to the zoo's (:func:`translate_state_dict`). With ``reinit_head`` the
    classifier head keeps its fresh initialisation, whatever its shape in the checkpoint (fine-tuning on other
    classes). Every other tensor must match in name and shape, else :class:`CheckpointMismatchError` lists the
    differences. Loads with ``weights_only=True`` and checks the file and its digest (:func:`read_checkpoint`).
    Returns a one-line report (for a named source, with the preprocessing its weights were trained with).
    """
    source = resolve_named_source(path) if is_named_source(path) else None
    file = source.path if source is not None else path
    if file.endswith(".safetensors"):
        loaded: Any = read_safetensors(file, what="model.init_from")
    else:
        loaded = read_checkpoint(file, map_location="cpu", weights_only=True, what="model.init_from")
    state = unwrap_state_dict(loaded)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"model.init_from: {path!r} holds neither a checkpoint nor a state dict")
    # A ResNetClassifier checkpoint: its weight average (model.ema_decay) when it has one, which is what was validated.
    prefix = "ema.net." if any(key.startswith("ema.net.") for key in state) else "net."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    own = net.state_dict()
    if not is_external_layout(own):  # a network of torchvision's own naming takes its files as they are
        state = translate_state_dict(state)
    head = classifier_head_prefix(net)
    head_keys = {key for key in own if head is not None and key.startswith(f"{head}.")}
    if reinit_head:
        compared_own = {k: v for k, v in own.items() if k not in head_keys}
        compared_ckpt = {k: v for k, v in state.items() if k not in head_keys}
    else:
        compared_own, compared_ckpt = own, state
    missing, unexpected, shapes = state_dict_mismatch(compared_own, compared_ckpt)
    if missing or unexpected or shapes:
        hint = ""
        if shapes and not missing and not unexpected and {key for key, _, _ in shapes} <= head_keys:
            hint = "\nOnly the classifier head differs: set model.reinit_head: true to train a new head."
        raise CheckpointMismatchError(
            f"model.init_from: the weights in {path!r} do not fit this network:\n"
            f"{describe_mismatch(missing, unexpected, shapes)}{hint}"
        )
    net.load_state_dict(compared_ckpt, strict=not reinit_head)
    report = f"resnet-lit: initialised {len(compared_ckpt)} tensors of the network from {path}"
    if prefix == "ema.net.":
        report += " (its weight average, model.ema_decay)"
    if source is not None:
        report += f" ({source.path}; trained with preprocessing: {source.describe_preprocessing()})"
    if reinit_head and head_keys:
        changes = []
        for key in sorted(head_keys):
            before = list(state[key].shape) if key in state else "absent"
            changes.append(f"{key} {before} -> {list(own[key].shape)}")
        report += f"; re-initialised the classification head because model.reinit_head is true ({', '.join(changes)})"
    return report


def check_checkpoint_fits(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` listing keys and shapes if ``checkpoint['state_dict']`` does not
    load into ``model`` strictly, with the architecture hyperparameters of both sides."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    missing, unexpected, shapes = state_dict_mismatch(model.state_dict(), state)
    if not (missing or unexpected or shapes):
        return
    keys = ("arch", "net", "num_classes", "in_channels")
    saved = checkpoint.get("hyper_parameters", {})
    ours = getattr(model, "hparams", {})
    theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in keys if k in saved)
    mine = ", ".join(f"{k}={ours.get(k)!r}" for k in keys if k in ours)
    raise CheckpointMismatchError(
        "the checkpoint does not fit this model's architecture:\n"
        f"{describe_mismatch(missing, unexpected, shapes)}\n"
        f"  checkpoint: {theirs or 'no hyperparameters'}\n  model:      {mine}\n"
        "Use the checkpoint's architecture, or start a new run that fine-tunes from it with "
        "model.init_from (and model.reinit_head: true for other classes)."
    )
