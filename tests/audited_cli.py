"""`python tests/audited_cli.py <resnet-lit arguments>`: the CLI, with a record of every file each process writes.

Every process appends the absolute paths it opens for writing (or renames/replaces onto) to
`$RESNET_LIT_WRITE_AUDIT/rank<R>.<pid>.txt`, R being its rank as the launcher set it at start (RANK, else
LOCAL_RANK, else 0). Lightning's DDP launcher re-runs this script for the other ranks, so they are audited too.
Uses `sys.addaudithook`: the record covers Python-level opens (builtin `open`, `os.open`), which is how
Lightning writes checkpoints (fsspec), the config (jsonargparse) and the CSV log.
"""

from __future__ import annotations

import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install_audit(audit_dir: str) -> None:
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    record = open(os.path.join(audit_dir, f"rank{rank}.{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115

    def hook(event: str, args: tuple) -> None:
        path = None
        if event == "open":
            target, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if writes and isinstance(target, str | bytes | os.PathLike):
                path = target
        elif event in ("os.rename", "os.replace"):
            path = args[1]
        if path is not None:
            record.write(os.path.abspath(os.fsdecode(path)) + "\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    _install_audit(os.environ["RESNET_LIT_WRITE_AUDIT"])
    from resnet_lit.cli import main

    main()
