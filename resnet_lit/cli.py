"""The `resnet-lit` entry point: dispatches the zoo commands, `benchmark` and the LightningCLI subcommands, and turns
configuration errors into one line instead of a traceback."""

from __future__ import annotations

import itertools
import os
import pickle
import sys
from collections.abc import Callable, Sequence

import torch
import yaml

from resnet_lit.commands import ZOO_COMMANDS, run_zoo_command
from resnet_lit.data.errors import CorruptImageError, DataConfigError
from resnet_lit.fault_tolerance import ClusterConfigError, NonFiniteLossError
from resnet_lit.fault_tolerance.checkpoint_io import CheckpointMismatchError
from resnet_lit.models.errors import ModelConfigError
from resnet_lit.registry import RegistryError
from resnet_lit.training_cli import ResNetLitCLI

__all__ = ["ResNetLitCLI", "main"]

# Errors in what the user configured: reported as `resnet-lit: error: <message>`, exit status 1.
CONFIG_ERRORS: tuple[type[Exception], ...] = (
    RegistryError,
    ModelConfigError,
    DataConfigError,
    ClusterConfigError,
    NonFiniteLossError,
    CheckpointMismatchError,
)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `resnet-lit` and `python -m resnet_lit`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "benchmark":
        from resnet_lit.bench import main as run_benchmark  # only this command imports the benchmark code

        _exit_with(argv[0], lambda: run_benchmark(argv[1:]))
        return
    if argv and argv[0] in ZOO_COMMANDS:
        _exit_with(argv[0], lambda: run_zoo_command(argv))
        return
    _check_yaml_files(argv)
    try:
        _run_cli(argv if args is not None else None)
    except CorruptImageError as err:
        raise SystemExit(f"resnet-lit: error: {_original_message(err)}") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(
            f"resnet-lit: error: refusing to load a checkpoint that needs arbitrary unpickling ({first})"
        ) from None
    except Exception as err:
        config_error = _config_error(err)
        if config_error is None:
            raise
        raise SystemExit(f"resnet-lit: error: {config_error}") from None


def _exit_with(command: str, run: Callable[[], int]) -> None:
    """Run a zoo command (`run` returns its exit status); a bad name or value becomes one error line."""
    try:
        code = run()
    except (RegistryError, ValueError) as err:
        raise SystemExit(f"resnet-lit {command}: error: {err}") from None
    if code:
        raise SystemExit(code)


def _config_error(err: BaseException) -> BaseException | None:
    """`err`, or the error it wraps, if it is a configuration error; jsonargparse wraps the errors of classes
    it instantiates as subclass types (e.g. `--data`) in a ValueError of its own."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, CONFIG_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def _check_yaml_files(argv: list[str]) -> None:
    """Fail fast, naming the file, on a `--config` that is not valid YAML (jsonargparse hides the name)."""
    for flag, path in itertools.pairwise(argv):
        if flag not in ("--config", "-c") or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise SystemExit(f"resnet-lit: error: {path} is not valid YAML: {err}") from None


def _run_cli(args: list[str] | None) -> None:
    """Run the LightningCLI, then close the process group so no gloo/NCCL thread outlives the interpreter
    (under torchrun an open group can abort the worker at exit after a successful run)."""
    try:
        ResNetLitCLI(args=args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _original_message(err: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last
