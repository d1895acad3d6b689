"""The `resnet-lit` entry point: dispatches the zoo commands, `benchmark` and the LightningCLI subcommands, and turns
every user-fixable error (`ResNetLitError`) into one line instead of a traceback.

Only the LightningCLI subcommands import Lightning, jsonargparse and the data stack: the zoo commands and
`benchmark` start with torch alone.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import pickle
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import yaml

from resnet_lit.commands import ZOO_COMMANDS, run_zoo_command
from resnet_lit.errors import ResNetLitError

if TYPE_CHECKING:
    from resnet_lit.training_cli import ResNetLitCLI

__all__ = ["ResNetLitCLI", "main"]

CONFIG_FLAGS = ("--config", "-c")


def __getattr__(name: str) -> Any:
    if name == "ResNetLitCLI":  # imported on first use: it brings in Lightning
        from resnet_lit.training_cli import ResNetLitCLI

        return ResNetLitCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `resnet-lit` and `python -m resnet_lit`."""
    if args is None:  # this process is `resnet-lit` itself, not Python code calling main([...])
        # At exit, CPython's final garbage collections walk every object that torch, Lightning and sympy made:
        # 0.7 s after `import torch`, up to 2 s after a `fit`. Frozen objects are skipped. Only finalizers of
        # objects in reference cycles may then not run at exit, which Python never promised anyway.
        atexit.register(_freeze_gc_unless_distributed)
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "benchmark":
        from resnet_lit.bench import main as run_benchmark  # only this command imports the benchmark code

        _exit_with(argv[0], lambda: run_benchmark(argv[1:]))
        return
    if argv and argv[0] in ZOO_COMMANDS:
        _exit_with(argv[0], lambda: run_zoo_command(argv))
        return
    _run_training_command(argv, argv if args is not None else None)


def _run_training_command(argv: list[str], args: list[str] | None) -> None:
    """Run a LightningCLI subcommand (`fit`, `validate`, `export`, ...; `args` None: from `sys.argv`), turning
    interrupts, refused checkpoints and user errors into one line. Only these commands import Lightning."""
    _check_yaml_files(argv)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from resnet_lit.cli_checkpoint import refused_pickle

    try:
        _run_cli(args)
    except SIGTERMException:  # Lightning's, for a SIGTERM before resnet-lit's handler took over
        print("resnet-lit: stopped by SIGTERM; nothing saved", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:  # Ctrl-C outside a Trainer run: while parsing, building the model, reading data
        print("resnet-lit: stopped by SIGINT; nothing saved", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except pickle.UnpicklingError as err:
        message = f"refusing to load a checkpoint that needs arbitrary unpickling: it {refused_pickle(err)}"
        raise SystemExit(f"resnet-lit: error: {message}") from None
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        raise SystemExit(f"resnet-lit: error: {_original_message(user_error)}") from None


def _exit_with(command: str, run: Callable[[], int]) -> None:
    """Run a zoo command (`run` returns its exit status); a bad name or value becomes one error line."""
    try:
        code = run()
    except (ResNetLitError, ValueError) as err:
        raise SystemExit(f"resnet-lit {command}: error: {err}") from None
    if code:
        raise SystemExit(code)


def _user_error(err: BaseException) -> ResNetLitError | None:
    """`err`, or an error it wraps, if it is a `ResNetLitError`. jsonargparse wraps the errors of the classes
    it instantiates in errors of its own (`__cause__`), and code that handles an error may raise another
    while doing so (`__context__`)."""
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        if isinstance(current, ResNetLitError):
            return current
        seen.add(id(current))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _check_yaml_files(argv: list[str]) -> None:
    """Fail fast, naming the file, on a `--config` that is not valid YAML or holds no mapping of keys
    (jsonargparse names neither the file nor, for `--config=FILE`, anything but `<unicode string>`)."""
    for path in _config_paths(argv):
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise SystemExit(f"resnet-lit: error: {path} is not valid YAML: {_yaml_problem(err)}") from None
        if content is None:
            raise SystemExit(f"resnet-lit: error: config file {path} is empty")
        if not isinstance(content, dict):
            raise SystemExit(
                f"resnet-lit: error: config file {path} holds a {type(content).__name__}, not a mapping of keys "
                "(e.g. `trainer:`, `model:`, `data:`)"
            )


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The YAML error in one line, with its position."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def _config_paths(argv: list[str]) -> list[str]:
    """The files of `--config FILE`, `--config=FILE`, `-c FILE` and `-c=FILE`."""
    paths = [path for flag, path in itertools.pairwise(argv) if flag in CONFIG_FLAGS]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith(tuple(f"{flag}=" for flag in CONFIG_FLAGS))]
    return paths


_ran_distributed = False  # set once this process has had a process group


def _run_cli(args: list[str] | None) -> None:
    """Run the LightningCLI, then close the process group so no gloo/NCCL thread outlives the interpreter
    (under torchrun an open group can abort the worker at exit after a successful run)."""
    global _ran_distributed
    from resnet_lit.training_cli import ResNetLitCLI

    try:
        ResNetLitCLI(args=args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _ran_distributed = True
            torch.distributed.destroy_process_group()


def _freeze_gc_unless_distributed() -> None:
    """At exit: `gc.freeze()`, so that the final collections skip everything torch and Lightning made, except in a
    process that ran distributed. There the frozen objects of c10d/gloo reach interpreter teardown unfinalized and
    can abort the worker after a successful run ("terminate called without an active exception", about 1 run in
    3 of tests/test_distributed.py's torchrun example)."""
    if not _ran_distributed:
        gc.freeze()


def _original_message(err: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last
