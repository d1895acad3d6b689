"""A sha256 digest inside every checkpoint file resnet-lit writes, checked when the file is read.

`torch.save` writes a zip archive. The digest covers every byte of the archive up to its comment and is stored
as the comment, ``resnet-lit sha256:<64 hex digits>``. It travels inside the one file that is renamed into
place, so no second file must be renamed with it (a kill between two renames would leave them disagreeing),
and `torch.load` and every other zip reader ignore the comment. Computing it costs one pass of sha256 over the
bytes while they are written, verifying it one more read of the file (about 0.1 s per 100 MB each).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO

MARKER = b"resnet-lit sha256:"
COMMENT_SIZE = len(MARKER) + 64
_END_SIGNATURE = b"PK\x05\x06"  # the zip archive's end-of-central-directory record ...
_END_SIZE = 22  # ... is its last 22 bytes; the last two are the comment length
_CHUNK = 8 << 20


class DigestingWriter:
    """A write-only stream for `torch.save` that passes bytes on to ``file`` and hashes them; `finish()` then
    appends the digest as the archive comment."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._sha = hashlib.sha256()
        self._tail = b""  # the last bytes written, not hashed yet: they must be the archive's end record

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._file.write(view)
        if view.nbytes >= _END_SIZE:
            self._sha.update(self._tail)
            self._sha.update(view[:-_END_SIZE])
            self._tail = bytes(view[-_END_SIZE:])
        else:
            tail = self._tail + bytes(view)
            self._sha.update(tail[:-_END_SIZE])
            self._tail = tail[-_END_SIZE:]
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> bool:
        """Write the digest into the archive comment; False (nothing written) unless the stream ended with an
        end record without a comment, as `torch.save` writes it."""
        tail = self._tail
        if len(tail) != _END_SIZE or not tail.startswith(_END_SIGNATURE) or tail[-2:] != b"\0\0":
            return False
        self._sha.update(tail[:-2])
        comment = MARKER + self._sha.hexdigest().encode("ascii")
        self._file.seek(-2, os.SEEK_END)
        self._file.write(struct.pack("<H", len(comment)) + comment)
        return True


def stored_digest(path: str) -> str | None:
    """The digest stored in checkpoint ``path``, or None if it has none (a file that resnet-lit did not write)."""
    size = os.path.getsize(path)
    if size < _END_SIZE + COMMENT_SIZE:
        return None
    with open(path, "rb") as f:
        f.seek(size - _END_SIZE - COMMENT_SIZE)
        end = f.read()
    if not end.startswith(_END_SIGNATURE) or end[_END_SIZE - 2 : _END_SIZE] != struct.pack("<H", COMMENT_SIZE):
        return None
    comment = end[_END_SIZE:]
    return comment[len(MARKER) :].decode("ascii", "replace") if comment.startswith(MARKER) else None


def verify_digest(path: str) -> bool | None:
    """True if ``path`` matches the digest stored in it, False if it does not (the file changed after it was
    written), None if it stores none."""
    expected = stored_digest(path)
    if expected is None:
        return None
    sha = hashlib.sha256()
    remaining = os.path.getsize(path) - COMMENT_SIZE - 2
    buffer = bytearray(min(_CHUNK, max(remaining, 1)))
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while remaining > 0:
            n = f.readinto(view[: min(len(buffer), remaining)])
            if not n:
                return False
            sha.update(view[:n])
            remaining -= n
    return sha.hexdigest() == expected
