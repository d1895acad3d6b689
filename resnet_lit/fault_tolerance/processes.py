"""Which process wrote a file: this host's name and whether a process of this host still runs."""

from __future__ import annotations

import os
import socket


def this_host() -> str:
    """The host name that lock files and temporary checkpoint names record."""
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists and is no zombie (a killed, not yet reaped child is gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no procfs (macOS): trust kill()
        return True
    return state not in (b"Z", b"X")
