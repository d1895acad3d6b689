"""`RunFolderLock`: one live `fit` per run folder. A second one fails at once, naming the folder, host and process.

Rank 0 holds ``<default_root_dir>/.resnet-lit.lock``, a JSON record of host, pid, start time and a heartbeat
that a background thread refreshes. A lock is stale, and taken over with a note, when its process is gone (same
host), when its heartbeat is older than the timeout (another host: a killed or crashed node), or when it is an
earlier attempt of this SLURM job or torchrun run (a requeue or restart, on any node).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime

import lightning.pytorch as pl
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.processes import process_alive, this_host

LOCK_NAME = ".resnet-lit.lock"
_HELD: dict[str, RunLock] = {}  # token -> lock, the locks this process holds


class RunFolderError(ResNetLitError):
    """The run folder cannot be used: another live run holds it, or it is not writable."""


class RunFolderBusyError(RunFolderError):
    """Another live run holds the run folder's lock."""


@dataclass
class LockRecord:
    """What a lock file says about its holder."""

    host: str
    pid: int
    start_time: float
    heartbeat: float
    token: str = ""  # tells this holder from a later one with the same host and pid
    slurm_job: str = ""  # SLURM_JOB_ID, with SLURM_RESTART_COUNT: a requeued job is the same job, one attempt on
    slurm_attempt: int = 0
    torchelastic_run: str = ""  # TORCHELASTIC_RUN_ID, with TORCHELASTIC_RESTART_COUNT, likewise for torchrun
    torchelastic_attempt: int = 0

    @classmethod
    def for_this_process(cls) -> LockRecord:
        now = time.time()
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        return cls(
            host=this_host(),
            pid=os.getpid(),
            start_time=now,
            heartbeat=now,
            token=secrets.token_hex(8),
            slurm_job=os.environ.get("SLURM_JOB_ID", ""),
            slurm_attempt=_int_env("SLURM_RESTART_COUNT"),
            torchelastic_run="" if run_id == "none" else run_id,  # torchrun's default id is shared by all runs
            torchelastic_attempt=_int_env("TORCHELASTIC_RESTART_COUNT"),
        )

    @classmethod
    def parse(cls, text: str) -> LockRecord | None:
        try:
            data = json.loads(text)
            record = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            return None
        numbers = (record.start_time, record.heartbeat, record.slurm_attempt, record.torchelastic_attempt)
        if not isinstance(record.pid, int) or not all(isinstance(n, int | float) for n in numbers):
            return None
        return record

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.start_time).isoformat(timespec="seconds")
        return f"process {self.pid} on host {self.host} (started {started})"


def _int_env(name: str) -> int:
    value = os.environ.get(name, "0")
    return int(value) if value.isdigit() else 0


class RunLock:
    """The lock file of one run folder: acquire, refresh the heartbeat, release.

    Creation is atomic (a hard link of a complete temporary file, which fails if the lock exists, also on NFS),
    every rewrite is a rename, and a stale lock is moved aside before it is replaced, so that of two processes
    taking it over at once only one succeeds.
    """

    def __init__(self, folder: str, timeout: float = 300.0, heartbeat_interval: float = 30.0) -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.record: LockRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; return a note when a stale lock was taken over. Raises :class:`RunFolderBusyError`, or
        :class:`RunFolderError` when the lock file cannot be written (a read-only or full disk)."""
        try:
            return self._acquire()
        except OSError as err:
            raise RunFolderError(
                f"cannot use run folder {self.folder}: creating its lock file {LOCK_NAME} failed: {err.strerror or err}"
            ) from err

    def _acquire(self) -> str | None:
        os.makedirs(self.folder, exist_ok=True)
        note = None
        record = LockRecord.for_this_process()
        for _ in range(5):
            if self._create(record):
                self.record = record
                _HELD[record.token] = self
                self._start_heartbeat()
                return note
            current = self._read()
            reason = self.stale_reason(current)
            if reason is None:
                assert current is not None
                raise RunFolderBusyError(
                    f"run folder {self.folder} is in use by a live run: {current.describe()}, last heartbeat "
                    f"{max(0, time.time() - current.heartbeat):.0f} s ago. Use another trainer.default_root_dir, or "
                    f"wait for that run to end (if it is gone, delete {self.path})"
                )
            if self._move_aside(current):
                holder = current.describe() if current is not None else "an unreadable lock file"
                note = f"resnet-lit: took over the stale lock of run folder {self.folder} from {holder}: {reason}"
        raise RunFolderBusyError(f"run folder {self.folder}: could not take its lock {self.path}; another process "
                                 "is taking it at the same time")  # fmt: skip

    def stale_reason(self, record: LockRecord | None) -> str | None:
        """Why the lock ``record`` no longer protects a live run, or None if it does."""
        if record is None:
            return "its lock file is unreadable"
        ours = LockRecord.for_this_process()
        if record.slurm_job and record.slurm_job == ours.slurm_job and record.slurm_attempt < ours.slurm_attempt:
            return f"SLURM requeued job {record.slurm_job}"
        if (
            record.torchelastic_run
            and record.torchelastic_run == ours.torchelastic_run
            and record.torchelastic_attempt < ours.torchelastic_attempt
        ):
            return f"torchrun restarted run {record.torchelastic_run}"
        if record.host == ours.host:
            if record.pid == ours.pid:
                return None if record.token in _HELD else "an earlier run of this process left it"
            return None if process_alive(record.pid) else "that process is gone"
        age = time.time() - record.heartbeat
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s (timeout {self.timeout:g} s)"
        return None

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        record, self.record = self.record, None
        if record is None:
            return
        _HELD.pop(record.token, None)
        current = self._read()
        if current is not None and current.token == record.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def refresh(self) -> bool:
        """Write a new heartbeat; False if the lock is no longer this process's (someone took it over)."""
        record = self.record
        if record is None:
            return False
        current = self._read()
        if current is None or current.token != record.token:
            return False
        record.heartbeat = time.time()
        temp = self._write_temp(record)
        os.replace(temp, self.path)
        return True

    # --- file operations --------------------------------------------------------------------------------------
    def _write_temp(self, record: LockRecord) -> str:
        temp = os.path.join(self.folder, f"{LOCK_NAME}.{record.token}.{secrets.token_hex(4)}.tmp")
        with open(temp, "x") as f:
            json.dump(asdict(record), f)
            f.flush()
            os.fsync(f.fileno())
        return temp

    def _create(self, record: LockRecord) -> bool:
        temp = self._write_temp(record)
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then the content
            return self._create_exclusive(record)
        finally:
            os.remove(temp)

    def _create_exclusive(self, record: LockRecord) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        return True

    def _read(self) -> LockRecord | None:
        for attempt in range(2):
            try:
                with open(self.path) as f:
                    record = LockRecord.parse(f.read())
            except FileNotFoundError:
                return None
            if record is not None or attempt:
                return record
            time.sleep(0.2)  # a lock being created without hard links is empty for a moment
        return None

    def _move_aside(self, stale: LockRecord | None) -> bool:
        """Remove the stale lock; if a fresh one replaced it meanwhile, put that one back. True if removed."""
        aside = f"{self.path}.stale.{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside) as f:
                moved = LockRecord.parse(f.read())
            if stale is not None and (moved is None or moved.token != stale.token):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return False
            return True
        finally:
            os.remove(aside)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="resnet-lit-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                held = self.refresh()
            except OSError as err:  # e.g. a full disk: the next beat tries again
                rank_zero_warn(f"resnet-lit: could not refresh the run-folder lock {self.path}: {err}")
                continue
            if not held:
                rank_zero_warn(
                    f"resnet-lit: the run-folder lock {self.path} was taken over by another process; "
                    "two runs may now write this folder"
                )
                return


@atexit.register
def _release_held_locks() -> None:
    for lock in list(_HELD.values()):
        if lock.record is not None and lock.record.pid == os.getpid():
            lock.release()


class RunFolderLock(Callback):
    """Holds the run folder's lock (``<default_root_dir>/.resnet-lit.lock``) on rank 0 during `fit`, so that a
    second `fit` into the same folder fails at once instead of overwriting the first run's checkpoints.

    Acquired in `setup`, before the config, checkpoints or metrics are written (the resnet-lit CSV logger defers
    its only earlier write), and released at teardown, on an exception and at interpreter exit. `validate`,
    `test` and `predict` take no lock: they write no checkpoints.

    Args:
        timeout: seconds without a heartbeat after which a lock held from another host is stale.
        heartbeat_interval: seconds between two heartbeats of the holder.
    """

    def __init__(self, timeout: float = 300.0, heartbeat_interval: float = 30.0) -> None:
        if heartbeat_interval <= 0 or timeout <= heartbeat_interval:
            raise ResNetLitError(
                f"RunFolderLock needs 0 < heartbeat_interval < timeout, got heartbeat_interval={heartbeat_interval!r}"
                f", timeout={timeout!r}"
            )
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.lock: RunLock | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or get_protocol(trainer.default_root_dir) != "file":  # no lock files on object stores
            return
        error: RunFolderError | None = None
        if trainer.is_global_zero:
            lock = RunLock(trainer.default_root_dir, self.timeout, self.heartbeat_interval)
            try:
                note = lock.acquire()
            except RunFolderError as err:
                error = err
            else:
                self.lock = lock
                if note:
                    rank_zero_info(note)
        if trainer.world_size > 1:  # every rank stops, not only rank 0
            message = trainer.strategy.broadcast(None if error is None else str(error))
            error = error or (RunFolderError(message) if message else None)
        if error is not None:
            raise error

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
