"""`python tests/sync_audit.py <resnet-lit arguments>`: the CLI, with a record of every host sync and collective
that each process makes during the training steps of a `fit`.

Recorded: `Tensor.item/tolist/cpu/numpy/__bool__`, `torch.unique` and every `torch.distributed` collective,
with their call sites, made in the main thread while the training loop runs a batch (Lightning's
`_TrainingEpochLoop.advance` and `on_advance_end`, validation excluded). Each call is filed under the global
step of its batch; a step is "logging" when Lightning writes step logs after it, "checkpoint" when a
checkpoint is saved during it, else "ordinary". Every process writes `$RESNET_LIT_SYNC_AUDIT/rank<R>.json`
at exit (R: the Trainer's global rank). Lightning's DDP launcher re-runs this script for the other ranks, so
they are audited too.

Known calls are marked `excluded` instead of counted, by their call sites: Lightning's per-batch SIGTERM
broadcast (a broadcast plus `.item()` in `_broadcast_sigterm_tensor`, no public setting turns it off),
`.item()` on CPU tensors in Lightning's conversion of progress-bar values (resnet-lit logs its progress-bar
loss as a CPU copy, so this costs no device sync), and CPU tensors read inside DataLoader iteration (samplers
and seeds of the host-side data loading, e.g. when an epoch's iterator is created).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import traceback
from typing import Any

import torch
import torch.distributed as dist

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__")
COLLECTIVES = (
    "all_reduce", "broadcast", "barrier", "monitored_barrier", "all_gather", "all_gather_into_tensor",
    "all_gather_object", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
    "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv",
    "isend", "irecv", "batch_isend_irecv",
)  # fmt: skip
STACK_DEPTH = 14


class _Audit:
    def __init__(self) -> None:
        self.main = threading.main_thread()
        self.busy = threading.local()  # inside a recorded call: its own internal calls are not recorded again
        self.step: int | None = None  # the global step of the batch the training loop runs now
        self.last_step = 0
        self.trainer: Any = None
        self.steps: dict[int, dict[str, Any]] = {}

    def begin(self, trainer: Any, step: int, logging: bool) -> None:
        self.trainer, self.step, self.last_step = trainer, step, step
        entry = self.steps.setdefault(step, {"logging": False, "checkpoint": False, "calls": []})
        entry["logging"] = entry["logging"] or logging

    def end(self) -> None:
        self.step = None

    def checkpoint(self) -> None:
        if self.step is not None:
            self.steps[self.step]["checkpoint"] = True

    def record(self, what: str, tensor: torch.Tensor | None) -> None:
        if self.step is None or threading.current_thread() is not self.main:
            return
        if self.trainer is not None and (self.trainer.validating or self.trainer.sanity_checking):
            return
        frames = traceback.extract_stack(sys._getframe(2), limit=STACK_DEPTH)[::-1]  # innermost first
        sites = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames]
        device = None if tensor is None else tensor.device.type
        call = {"what": what, "device": device, "site": _first_own_site(sites), "stack": sites}
        call["excluded"] = _excluded(what, device, frames)
        self.steps[self.step]["calls"].append(call)

    def report(self) -> dict[str, Any]:
        rank = self.trainer.global_rank if self.trainer is not None else int(os.environ.get("LOCAL_RANK", "0"))
        steps = {}
        for step, entry in sorted(self.steps.items()):
            kind = "checkpoint" if entry["checkpoint"] else "logging" if entry["logging"] else "ordinary"
            steps[str(step)] = {"kind": kind, "calls": entry["calls"]}
        log_every = self.trainer.log_every_n_steps if self.trainer is not None else None
        return {"rank": rank, "log_every_n_steps": log_every, "steps": steps}


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/resnet_lit/", "/tests/"):
        if marker in filename:
            head = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return head + filename.split(marker, 1)[1]
    return filename


def _first_own_site(sites: list[str]) -> str:
    """The innermost frame outside torch: where the call came from."""
    for site in sites:
        if not site.startswith("torch/"):
            return site
    return sites[0] if sites else "?"


def _excluded(what: str, device: str | None, frames: list[traceback.FrameSummary]) -> str | None:
    names = {(_short(f.filename), f.name) for f in frames}
    if ("lightning/pytorch/loops/training_epoch_loop.py", "_broadcast_sigterm_tensor") in names:
        return "Lightning's per-batch SIGTERM broadcast"
    if device == "cpu" and any(path.startswith("torch/utils/data/") for path, _ in names):
        return "host-side data loading (a CPU tensor in DataLoader iteration)"
    if device == "cpu" and ("resnet_lit/data/samplers.py", "epoch_order") in names:
        return "the epoch's sample order, drawn once per epoch from a CPU generator"
    converts = any(name == "convert_tensors_to_scalars" for _, name in names)
    progress_bar = any(
        path.startswith("lightning/pytorch/callbacks/progress/")
        or (path.endswith("logger_connector/result.py") and name == "metrics")
        for path, name in names
    )
    if what == "item" and device == "cpu" and converts and progress_bar:
        return "progress-bar value conversion of a CPU tensor"
    return None


AUDIT = _Audit()


def _tensor_method(name: str) -> None:
    original = getattr(torch.Tensor, name)

    @functools.wraps(original)
    def audited(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(AUDIT.busy, "on", False):
            return original(self, *args, **kwargs)
        AUDIT.busy.on = True
        try:
            AUDIT.record(name, self)
            return original(self, *args, **kwargs)
        finally:
            AUDIT.busy.on = False

    setattr(torch.Tensor, name, audited)


def _function(module: Any, name: str, kind: str) -> None:
    original = getattr(module, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def audited(*args: Any, **kwargs: Any) -> Any:
        if getattr(AUDIT.busy, "on", False):
            return original(*args, **kwargs)
        AUDIT.busy.on = True
        try:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            AUDIT.record(f"{kind}{name}", first)
            return original(*args, **kwargs)
        finally:
            AUDIT.busy.on = False

    setattr(module, name, audited)


def _step_windows() -> None:
    """File calls under the global step of the batch that the training loop runs."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    advance, advance_end = _TrainingEpochLoop.advance, _TrainingEpochLoop.on_advance_end
    save_checkpoint = Trainer.save_checkpoint

    def audited_advance(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        AUDIT.begin(trainer, trainer.global_step, trainer._logger_connector.should_update_logs)
        try:
            return advance(self, *args, **kwargs)
        finally:
            AUDIT.end()

    def audited_advance_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        AUDIT.begin(self.trainer, AUDIT.last_step, False)  # the rest of the batch that `advance` began
        try:
            return advance_end(self, *args, **kwargs)
        finally:
            AUDIT.end()

    def audited_save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        AUDIT.checkpoint()
        return save_checkpoint(self, *args, **kwargs)

    _TrainingEpochLoop.advance = audited_advance
    _TrainingEpochLoop.on_advance_end = audited_advance_end
    Trainer.save_checkpoint = audited_save_checkpoint


def install(report_dir: str) -> None:
    """Instrument torch and Lightning in this process; write the report to `report_dir` at exit."""
    for name in SYNCS:
        _tensor_method(name)
    _function(torch, "unique", "")
    _function(torch.functional, "unique", "")
    for name in COLLECTIVES:
        _function(dist, name, "dist.")
        _function(dist.distributed_c10d, name, "dist.")
    _step_windows()

    def write() -> None:
        report = AUDIT.report()
        with open(os.path.join(report_dir, f"rank{report['rank']}.json"), "w") as f:
            json.dump(report, f, indent=1)

    atexit.register(write)


if __name__ == "__main__":
    install(os.environ["RESNET_LIT_SYNC_AUDIT"])
    from resnet_lit.cli import main

    main()
