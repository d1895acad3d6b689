"""`ResNetLitArgumentParser`: LightningCLI's parser, reporting a bad option as one `resnet-lit: error:` message
instead of the 80-line usage text, and an unknown key with the valid keys closest to it."""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.DOTALL)
_SUBCOMMAND_OPTION = re.compile(r"Subcommand '([^']+)' does not accept option '([^']+)'")
_GROUP_OPTION = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_NESTED_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"class_path ?=? ?'([^']+)'")


class ResNetLitArgumentParser(LightningArgumentParser):
    """The parser of `resnet-lit fit/validate/test/predict`; only its error report differs from Lightning's."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser: the outermost one reports
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"resnet-lit: error: {describe_parse_error(message, parser)}\n")
        self.exit(2)


def describe_parse_error(message: str, parser: ArgumentParser) -> str:
    """jsonargparse's `message`, or for an unknown key `unknown key 'K'; did you mean ...?`."""
    unknown = _unknown_key(message)
    if unknown is None:
        return message.strip()
    key, candidates = unknown
    matches = close_keys(key, candidates(parser))
    if matches:
        return f"unknown key '{key}'; did you mean {' or '.join(matches)}?"
    return f"unknown key '{key}' (`{parser.prog.replace(' [options]', '')} --help` lists the valid keys)"


def close_keys(key: str, valid: list[str]) -> list[str]:
    """The valid keys most like `key`: by the last name among the keys of the same parent (a typo in an option
    name), else by the whole dotted key (a typo in a section name)."""
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == parent}
    matches = difflib.get_close_matches(name, list(siblings), n=3, cutoff=0.7)
    if matches:
        return [siblings[m] for m in matches]
    return difflib.get_close_matches(key, valid, n=3, cutoff=0.8)


def _unknown_key(message: str) -> tuple[str, Callable[[ArgumentParser], list[str]]] | None:
    """The unknown key named by `message` and how to list the keys valid in its place."""
    if match := _UNRECOGNIZED.match(message):
        options = [token for token in match.group(1).split() if token.startswith("-")]
        if options:
            return options[0].lstrip("-").split("=")[0], _parser_keys
    if match := _SUBCOMMAND_OPTION.search(message):
        return match.group(2), _parser_keys
    if match := _GROUP_OPTION.search(message):
        return f"{match.group(1)}.{match.group(2)}", _parser_keys
    if (match := _NESTED_OPTION.search(message)) and (parent := _PARSER_KEY.search(message)):
        class_path = _CLASS_PATH.search(message)
        prefix = parent.group(1)
        return f"{prefix}.{match.group(1)}", lambda _: _class_keys(prefix, class_path and class_path.group(1))
    return None


def _parser_keys(parser: ArgumentParser) -> list[str]:
    try:
        return [key for key, _ in parser.get_defaults().items()]
    except Exception:  # the suggestion is a courtesy: never let it hide the error
        return []


def _class_keys(prefix: str, class_path: str | None) -> list[str]:
    """`prefix.<option>` for each option of the class at `class_path`, as jsonargparse sees them."""
    if class_path is None:
        return []
    try:
        module, _, name = class_path.rpartition(".")
        options = ArgumentParser(exit_on_error=False)
        options.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
        return [f"{prefix}.{key}" for key, _ in options.get_defaults().items()]
    except Exception:  # as above
        return []
