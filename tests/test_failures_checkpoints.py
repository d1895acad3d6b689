"""Checkpoint and run-folder failures (issue 10): concurrent writers, a second `fit` into a live run folder,
non-finite state, bit flips, unreadable `--ckpt_path` files, and full or read-only disks. Races and disk
errors are injected, so every test is deterministic."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from faultinject import QUICKSTART, QUIET

from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance import NonFiniteLossError, NonFiniteLossPolicy
from resnet_lit.fault_tolerance.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, load_network_weights

# The new run-lock module is imported in the tests that use it, so that on the code before issue 10 each test
# fails on its own defect.
LOCK_NAME = ".resnet-lit.lock"
HOST = socket.gethostname()
TINY_FIT = ["fit", "--config", QUICKSTART, "--trainer.limit_val_batches", "1", *QUIET]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder after 2 quickstart steps, with checkpoints/last.ckpt."""
    root = tmp_path_factory.mktemp("digits")
    main([*TINY_FIT, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)])
    assert not (root / LOCK_NAME).exists()  # released when the run ended
    return root


def _one_line_error(exit_info: pytest.ExceptionInfo[SystemExit]) -> str:
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    assert message.startswith("resnet-lit: error: ") and "\n" not in message, message
    return message


# --- 1. concurrent writers ----------------------------------------------------------------------------------
def test_two_concurrent_writers_never_tear_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer 1 has written half of its checkpoint when writer 2 writes and renames a whole one; then writer 1
    finishes. With a temporary name shared by both, writer 2 truncated writer 1's file and writer 1's tail
    landed in the renamed last.ckpt."""
    target = tmp_path / "last.ckpt"
    real_save = torch.save
    halfway, go_on = threading.Event(), threading.Event()

    def interleaved_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if obj["writer"] != 1:
            f.write(data)
            return
        f.write(data[: len(data) // 2])
        f.flush()
        halfway.set()
        assert go_on.wait(60)
        f.write(data[len(data) // 2 :])

    monkeypatch.setattr(torch, "save", interleaved_save)
    first = {"writer": 1, "w": torch.ones(1 << 14)}
    errors: list[BaseException] = []

    def writer_1() -> None:
        try:
            atomic_torch_save(first, target)
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=writer_1)
    thread.start()
    assert halfway.wait(60)
    atomic_torch_save({"writer": 2, "w": torch.full((1 << 14,), 2.0)}, target)
    go_on.set()
    thread.join(60)
    assert not errors, errors
    saved = AtomicCheckpointIO().load_checkpoint(target)  # complete, and its digest matches
    assert saved["writer"] == 1 and torch.equal(saved["w"], first["w"])  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --- 2. the run-folder lock ---------------------------------------------------------------------------------
def _fake_lock(folder: Path, **fields: Any) -> Path:
    now = time.time()
    record = {"host": HOST, "pid": os.getppid(), "start_time": now - 60, "heartbeat": now, "token": "f1",
              **fields}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


def test_run_lock_is_held_refreshed_and_released(tmp_path: Path) -> None:
    from resnet_lit.fault_tolerance.run_lock import RunFolderBusyError, RunLock

    lock = RunLock(str(tmp_path), timeout=300, heartbeat_interval=30)
    assert lock.acquire() is None
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (record["host"], record["pid"]) == (HOST, os.getpid())
    assert record["start_time"] <= record["heartbeat"]
    with pytest.raises(RunFolderBusyError) as busy:  # a second run in this very process
        RunLock(str(tmp_path)).acquire()
    assert f"run folder {tmp_path} is in use by a live run: process {os.getpid()} on host {HOST}" in str(busy.value)
    old_heartbeat = record["heartbeat"]
    time.sleep(0.01)
    assert lock.refresh()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > old_heartbeat
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    again = RunLock(str(tmp_path))
    assert again.acquire() is None
    again.release()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("fields", "env", "reason"),
    [
        ({"pid": "dead"}, {}, "that process is gone"),
        ({"host": "node-elsewhere", "heartbeat": time.time() - 3600}, {}, "no heartbeat for"),
        ({"host": "node-elsewhere", "slurm_job": "4242", "slurm_attempt": 0},
         {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, "SLURM requeued job 4242"),
        ({"host": "node-elsewhere", "torchelastic_run": "r50", "torchelastic_attempt": 0},
         {"TORCHELASTIC_RUN_ID": "r50", "TORCHELASTIC_RESTART_COUNT": "2"}, "torchrun restarted run r50"),
    ],
    ids=["dead-process", "old-heartbeat-other-host", "slurm-requeue-other-host", "torchrun-restart"],
)  # fmt: skip
def test_stale_locks_are_taken_over_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], env: dict[str, str], reason: str
) -> None:
    from resnet_lit.fault_tolerance.run_lock import RunLock

    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if fields.get("pid") == "dead":
        fields = {**fields, "pid": _dead_pid()}
    _fake_lock(tmp_path, **fields)
    lock = RunLock(str(tmp_path), timeout=300)
    note = lock.acquire()
    assert note is not None and f"took over the stale lock of run folder {tmp_path}" in note and reason in note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_live_lock_of_another_host_is_respected_until_its_heartbeat_times_out(tmp_path: Path) -> None:
    from resnet_lit.fault_tolerance.run_lock import RunFolderBusyError, RunLock

    _fake_lock(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 100)
    with pytest.raises(RunFolderBusyError, match="process 1 on host node-elsewhere"):
        RunLock(str(tmp_path), timeout=300).acquire()
    lock = RunLock(str(tmp_path), timeout=60)
    assert "no heartbeat for 100 s (timeout 60 s)" in (lock.acquire() or "")
    lock.release()


def test_second_fit_into_a_live_run_folder_fails_at_once_and_touches_nothing(tmp_path: Path) -> None:
    lock = _fake_lock(tmp_path)  # our parent process: alive, on this host
    (tmp_path / "config.yaml").write_text("the live run's config\n")
    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,2.5\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_FIT, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)])
    message = _one_line_error(exit_info)
    assert f"run folder {tmp_path} is in use by a live run: process {os.getppid()} on host {HOST}" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no checkpoints, config or log touched
    assert lock.exists()


# --- 3. non-finite state and losses ---------------------------------------------------------------------------
class _Trainer(SimpleNamespace):
    """A single-process trainer stand-in for the policy's hooks."""

    def __init__(self) -> None:
        super().__init__(world_size=1, global_step=12, current_epoch=3, checkpoint_callbacks=[], log_every_n_steps=1)


class _Net(torch.nn.Linear):
    def __init__(self, policy: str) -> None:
        super().__init__(2, 2)
        self.hparams = {"nonfinite_loss": policy}

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


def _batch(policy: NonFiniteLossPolicy, trainer: _Trainer, net: _Net, loss: float) -> None:
    policy.on_train_batch_start(trainer, net, None, 0)
    policy.on_before_backward(trainer, net, torch.tensor(loss))
    policy.on_train_batch_end(trainer, net, None, None, 0)
    trainer.global_step += 1


def test_checkpoints_with_nonfinite_weights_or_optimizer_state_are_not_written(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    good = {"state_dict": {"net.bn.running_var": torch.ones(3)}, "global_step": 5,
            "callbacks": {"ModelCheckpoint": {"kth_value": torch.tensor(float("inf"))}}}  # fmt: skip
    AtomicCheckpointIO().save_checkpoint(good, target)  # an inf in a callback's bookkeeping is no fault
    inf_stats = {**good, "global_step": 6, "state_dict": {"net.bn.running_var": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(ResNetLitError) as refused:
        AtomicCheckpointIO().save_checkpoint(inf_stats, target)
    assert "state_dict['net.bn.running_var'] holds inf" in str(refused.value) and str(target) in str(refused.value)
    nan_state = {0: {"exp_avg": torch.tensor([float("nan")])}}
    nan_moment = {**good, "global_step": 7, "optimizer_states": [{"state": nan_state}]}
    with pytest.raises(ResNetLitError, match=r"optimizer_states\[0\]\['state'\]\[0\]\['exp_avg'\] holds NaN"):
        AtomicCheckpointIO().save_checkpoint(nan_moment, target)
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 5  # the last good one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # In a run, the policy refuses first, on every rank together, and names the last good checkpoint.
    trainer, net = _Trainer(), _Net("stop")
    policy = NonFiniteLossPolicy()
    policy.setup(trainer, net, "fit")
    policy.on_load_checkpoint(trainer, net, {"global_step": 5})
    trainer.checkpoint_callbacks = [SimpleNamespace(last_model_path=str(target))]
    with pytest.raises(ResNetLitError) as refused:
        policy.on_save_checkpoint(trainer, net, inf_stats)
    message = str(refused.value)
    assert "state_dict['net.bn.running_var'] holds inf" in message
    assert f"last good checkpoint: {target} (step 5)" in message
    assert "resume with --ckpt_path last --model.optimizer.init_args.lr <lower lr>" in message


def test_stop_message_says_how_to_resume_with_a_lower_lr() -> None:
    trainer, net = _Trainer(), _Net("stop")
    policy = NonFiniteLossPolicy()
    policy.setup(trainer, net, "fit")
    policy.on_train_batch_start(trainer, net, None, 0)
    policy.on_before_backward(trainer, net, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError) as info:
        policy.on_train_epoch_end(trainer, net)
    assert "resume with --ckpt_path last --model.optimizer.init_args.lr <lower lr>" in str(info.value)


def test_skip_stops_when_more_than_the_limit_of_recent_batches_were_skipped() -> None:
    trainer, net = _Trainer(), _Net("skip")
    policy = NonFiniteLossPolicy(max_skip_fraction=0.2, window=10)
    policy.setup(trainer, net, "fit")
    nan = float("nan")
    with pytest.warns(UserWarning, match="skipped training step"):
        for loss in [nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, nan, nan]:  # 2 of the last 10: allowed
            _batch(policy, trainer, net, loss)
        resumed = NonFiniteLossPolicy(max_skip_fraction=0.2, window=10)  # the count survives a resume
        resumed.setup(trainer, net, "fit")
        resumed.load_state_dict(policy.state_dict())
        with pytest.raises(NonFiniteLossError) as info:
            _batch(resumed, trainer, net, nan)
    message = str(info.value)
    assert message.startswith("non-finite training loss in 3 of the last 10 training batches, more than the limit")
    assert "resume with --ckpt_path last --model.optimizer.init_args.lr <lower lr>" in message
    assert (NonFiniteLossPolicy().max_skip_fraction, NonFiniteLossPolicy().window) == (0.1, 100)


def test_skip_limits_are_configured_through_trainer_callbacks(tmp_path: Path) -> None:
    cli = ResNetLitCLI(args=[*TINY_FIT[1:], "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.callbacks+=resnet_lit.fault_tolerance.NonFiniteLossPolicy",
                             "--trainer.callbacks.max_skip_fraction=0.25", "--trainer.callbacks.window=40"],
                       run=False)  # fmt: skip
    policies = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteLossPolicy)]
    assert [(p.max_skip_fraction, p.window) for p in policies] == [(0.25, 40)]


# --- 4. digests -------------------------------------------------------------------------------------------------
def _flip_a_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flip_is_refused_on_every_load_path(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    net = torch.nn.Linear(256, 256)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    _flip_a_bit(path, path.stat().st_size // 2)  # inside the weight matrix: torch.load alone does not notice
    with pytest.raises(ResNetLitError) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(path) in str(info.value) and "do not match the sha256 digest" in str(info.value)
    with pytest.raises(ResNetLitError, match=r"model\.init_from .* do not match the sha256 digest"):
        load_network_weights(torch.nn.Linear(256, 256), str(path), reinit_head=False)


def test_a_bit_flipped_ckpt_path_fails_with_one_line(digits_run: Path, tmp_path: Path) -> None:
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes((digits_run / "checkpoints" / "last.ckpt").read_bytes())
    _flip_a_bit(flipped, flipped.stat().st_size // 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", QUICKSTART, "--ckpt_path", str(flipped), *QUIET])
    assert str(flipped) in _one_line_error(exit_info)


def test_a_checkpoint_without_digest_loads_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "external.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with caplog.at_level(logging.INFO):
        loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert f"{path} has no resnet-lit digest" in caplog.text


# --- 5. unreadable --ckpt_path files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "needle"),
    [("missing", "does not exist"), ("folder", "is a folder, not a checkpoint file"), ("empty", "is empty"),
     ("truncated", "is truncated or damaged"), ("random", "is not a checkpoint")],
)  # fmt: skip
def test_unreadable_checkpoint_files_are_one_line_errors_naming_the_file(
    digits_run: Path, tmp_path: Path, kind: str, needle: str
) -> None:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        whole = (digits_run / "checkpoints" / "last.ckpt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ResNetLitError) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message
    assert not isinstance(info.value, pickle.UnpicklingError)


def test_random_bytes_on_the_command_line_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", QUICKSTART, "--ckpt_path", str(path), *QUIET])
    message = _one_line_error(exit_info)
    assert f"{str(path)!r} is not a checkpoint" in message and "unpickling" not in message


# --- 6. full or read-only disks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC], ids=["read-only", "full"])
def test_a_failed_checkpoint_write_names_the_folder_and_the_intact_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 2, "w": torch.ones(8)}, target)
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:100])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ResNetLitError) as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.zeros(8)}, target)
    message = str(info.value)
    assert f"in run folder {target.parent}: {os.strerror(code)}" in message and "\n" not in message
    assert f"the last good checkpoint {target} is intact (digest verified)" in message
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the partial file is gone
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 2


def test_a_full_disk_during_fit_is_one_line_and_releases_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, saves = torch.save, []

    def full_at_second_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(obj.get("global_step"))
        if len(saves) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_second_save)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_FIT, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    message = _one_line_error(exit_info)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"in run folder {last.parent}: No space left on device (ENOSPC): the disk is full" in message
    assert f"the last good checkpoint {last} is intact (digest verified)" in message
    assert saves == [2, 4] and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert not (tmp_path / LOCK_NAME).exists()  # released on the error
