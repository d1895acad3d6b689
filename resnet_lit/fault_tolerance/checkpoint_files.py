"""Checkpoint files on disk: crash-safe writes with a digest inside, and reads that turn every problem of the
file (missing, a folder, empty, truncated, not a checkpoint, a failed digest) into one line naming it."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import pickletools
import secrets
import zipfile
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpoint_digest import DigestingWriter, verify_digest
from resnet_lit.fault_tolerance.processes import process_alive, this_host

TEMP_SUFFIX = ".partial"
_ZIP_MAGIC = b"PK\x03\x04"
_FULL_DISK = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
_READ_ONLY = {errno.EACCES: "the folder is not writable", errno.EPERM: "the folder is not writable",
              errno.EROFS: "the file system is read-only"}  # fmt: skip


class CheckpointReadError(ResNetLitError):
    """A checkpoint file is missing, not a file, empty, truncated, not a checkpoint, or fails its digest."""


class CheckpointWriteError(ResNetLitError):
    """A checkpoint could not be written (full or read-only disk); the message says what became of the last one."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``, with a digest inside the file.

    Writes a temporary file of its own (``.<name>.<host>.<pid>.<random>.partial``, so that concurrent writers
    never share one) in the same folder, flushes and fsyncs it, renames it over ``path`` with :func:`os.replace`
    (atomic on POSIX within one filesystem), then fsyncs the folder so that the rename itself survives a power
    or node failure. On any error the temporary file is removed; an ``OSError`` (full disk, read-only folder)
    becomes a :class:`CheckpointWriteError` that says whether the previous checkpoint is intact. Temporary files
    that killed writers of this host left behind are removed after the next successful save.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    temp = os.path.join(folder, f".{name}.{_temp_tag()}{TEMP_SUFFIX}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(temp, "xb") as f:
            writer = DigestingWriter(f)
            torch.save(obj, writer)
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as err:
        _remove_quietly(temp)
        if isinstance(err, OSError):
            raise CheckpointWriteError(describe_write_failure(path, err)) from err
        raise
    _fsync_dir(folder)
    _remove_dead_writers_files(folder, name)


def _temp_tag() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in this_host()) or "host"
    return f"{host}.{os.getpid()}.{secrets.token_hex(4)}"


def _remove_dead_writers_files(folder: str, name: str) -> None:
    """Remove ``.<name>.*.partial`` files of this host whose writing process is gone (killed mid-write)."""
    prefix, host = f".{name}.", _temp_tag().split(".", 1)[0]
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(TEMP_SUFFIX)):
            continue
        parts = entry[len(prefix) : -len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not process_alive(int(parts[1])):
            _remove_quietly(os.path.join(folder, entry))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_write_failure(path: str, err: OSError) -> str:
    """One line: which checkpoint in which folder could not be written, why, and the state of the last one."""
    folder = os.path.dirname(os.path.abspath(path))
    why = _FULL_DISK.get(err.errno) or _READ_ONLY.get(err.errno) or "writing failed"
    reason = f"{err.strerror or err}" + (f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else "")
    return (
        f"cannot write checkpoint {os.path.basename(path)} in run folder {folder}: {reason}: {why}; "
        f"{last_checkpoint_state(path)}. Free space or fix the permissions, then resume with --ckpt_path last"
    )


def last_checkpoint_state(path: str) -> str:
    """Whether the checkpoint that a failed write of ``path`` leaves as the newest one is intact: ``path``
    itself (the previous version) or else ``last.ckpt`` next to it, checked against its digest."""
    folder = os.path.dirname(os.path.abspath(path))
    previous = next((p for p in (path, os.path.join(folder, "last.ckpt")) if os.path.isfile(p)), None)
    if previous is None:
        return f"no earlier checkpoint exists in {folder}"
    try:
        check_checkpoint_file(previous)
        verified = verify_digest(previous)
    except (CheckpointReadError, OSError) as err:
        return f"the last checkpoint {previous} is damaged too ({err})"
    if verified is None:
        return f"the last checkpoint {previous} is unchanged (it has no digest to verify)"
    if verified:
        return f"the last good checkpoint {previous} is intact (digest verified)"
    return f"the last checkpoint {previous} is damaged: it does not match its digest"


def check_checkpoint_file(path: str | os.PathLike[str], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointReadError` naming ``path`` if it is missing, a folder, empty, a truncated zip
    archive, or no checkpoint at all (neither a zip archive nor a pickle). A real pickle passes: whether it may
    be unpickled is `torch.load`'s ``weights_only`` decision."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointReadError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointReadError(f"{what} {path!r} is a folder, not a checkpoint file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if size == 0:
                raise CheckpointReadError(f"{what} {path!r} is empty (0 bytes)")
            if head == _ZIP_MAGIC:
                if not zipfile.is_zipfile(f):
                    raise CheckpointReadError(
                        f"{what} {path!r} is truncated or damaged: its zip archive has no end "
                        "(an interrupted write or copy?)"
                    )
                return
            try:
                for _ in pickletools.genops(f):  # parses the first pickle without running it
                    pass
            except Exception:
                raise CheckpointReadError(
                    f"{what} {path!r} is not a checkpoint: neither a zip archive nor a pickle ({size} bytes)"
                ) from None
    except OSError as err:
        raise CheckpointReadError(f"cannot read {what} {path!r}: {err.strerror or err}") from err


def read_checkpoint(
    path: str | os.PathLike[str],
    map_location: Any = None,
    weights_only: bool = True,
    what: str = "checkpoint",
) -> Any:
    """`torch.load` of a checkpoint file, with its problems as one-line :class:`CheckpointReadError` naming it.

    Checks the file (see :func:`check_checkpoint_file`) and the digest resnet-lit stores inside it; a file
    without one (written by other tools) is loaded with a note. A pickle that ``weights_only`` loading refuses
    raises torch's ``pickle.UnpicklingError`` unchanged.
    """
    path = os.fspath(path)
    check_checkpoint_file(path, what)
    verified = _verify_once(path)
    if verified is False:
        raise CheckpointReadError(
            f"{what} {path!r} is corrupt: its bytes do not match the sha256 digest stored in it when it was "
            "written (a damaged disk or copy); use another checkpoint"
        )
    if verified is None and _note_once(path):
        rank_zero_info(f"resnet-lit: note: {path} has no resnet-lit digest (written elsewhere); loading it unverified")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointReadError(f"cannot read {what} {path!r}: {type(err).__name__}: {first}") from err


def read_safetensors(path: str | os.PathLike[str], what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU, with its problems as one-line :class:`CheckpointReadError`.

    Needs the optional ``safetensors`` package (``pip install resnet-lit[weights]``). Such files carry no
    resnet-lit digest: they load with a note, like other external files.
    """
    path = os.fspath(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointReadError(
            f"{what} {path!r} is a .safetensors file, which needs the safetensors package: "
            "pip install resnet-lit[weights]"
        ) from None
    if not os.path.exists(path):
        raise CheckpointReadError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointReadError(f"{what} {path!r} is a folder, not a weights file")
    if _note_once(path):
        rank_zero_info(f"resnet-lit: note: {path} has no resnet-lit digest (written elsewhere); loading it unverified")
    try:
        return load_file(path, device="cpu")
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointReadError(f"cannot read {what} {path!r}: {type(err).__name__}: {first}") from err


_last_verified: tuple[tuple[Any, ...], bool | None] | None = None  # the CLI reads a --ckpt_path file twice
_last_noted: tuple[Any, ...] | None = None


def _file_key(path: str) -> tuple[Any, ...]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _verify_once(path: str) -> bool | None:
    """`verify_digest`, computed once for consecutive reads of an unchanged file."""
    global _last_verified
    key = _file_key(path)
    if _last_verified is None or _last_verified[0] != key:
        _last_verified = (key, verify_digest(path))
    return _last_verified[1]


def _note_once(path: str) -> bool:
    global _last_noted
    key = _file_key(path)
    first, _last_noted = _last_noted != key, key
    return first
