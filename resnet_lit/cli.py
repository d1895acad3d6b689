"""The `resnet-lit` command: the zoo's inspection commands plus a LightningCLI for training."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from resnet_lit.commands import ZOO_COMMANDS, run_zoo_command
from resnet_lit.registry import RegistryError


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `resnet-lit` and `python -m resnet_lit`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ZOO_COMMANDS:
        try:
            code = run_zoo_command(argv)
        except (RegistryError, ValueError) as err:
            raise SystemExit(f"resnet-lit {argv[0]}: error: {err}") from None
        if code:
            raise SystemExit(code)
        return
    raise SystemExit("training commands are not wired yet")
