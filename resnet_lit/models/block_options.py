"""Block options: the keyword parameters a block type takes beyond the builder's protocol.

`net.block_args` sets them from a config. They are checked against the block's signature before anything
is built, so a misspelt option fails at start-up with one line naming the block and its valid options.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_lit.models.blocks import ResidualBlock
from resnet_lit.models.errors import ModelConfigError

BlockArgs = Mapping[str, Any] | Sequence[Mapping[str, Any]]

# The arguments the network builder passes to every block, and the `net` setting each one comes from.
BUILDER_ARGS: dict[str, str] = {
    "in_channels": "widths", "channels": "widths", "stride": "strides", "groups": "groups",
    "width_per_group": "width_per_group", "shortcut": "shortcut", "norm_layer": "norm", "act_layer": "act",
    "drop_path": "drop_path", "residual": "residual",
}  # fmt: skip

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def block_options(cls: type[ResidualBlock]) -> dict[str, inspect.Parameter]:
    """The options of block class `cls`: its constructor's named parameters that the builder does not pass.

    A constructor with `**kwargs` is taken to forward them to the next class in the MRO, whose parameters then
    count too (an SE block's `reduction` and its base block's, say).
    """
    options: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        for param in params:
            if param.kind in _NAMED and param.name != "self" and param.name not in BUILDER_ARGS:
                options.setdefault(param.name, param)
        if klass is ResidualBlock or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return options


def check_block_options(label: str, cls: type[ResidualBlock], args: Mapping[str, Any]) -> dict[str, Any]:
    """`args` as keyword options for block `cls` (called `label` in messages), or a `ModelConfigError`."""
    if not isinstance(args, Mapping) or not all(isinstance(name, str) for name in args):
        raise ModelConfigError(f"net.block_args for block {label} must map option names to values, got {args!r}")
    reserved = sorted(set(args) & set(BUILDER_ARGS))
    if reserved:
        settings = ", ".join(f"{name} (net.{BUILDER_ARGS[name]})" for name in reserved)
        raise ModelConfigError(f"net.block_args cannot set {settings}: the network builder passes these to every block")
    options = block_options(cls)
    valid = ", ".join(options) or "none"
    unknown = sorted(set(args) - set(options))
    if unknown:
        raise ModelConfigError(f"block {label} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    missing = [name for name, p in options.items() if p.default is inspect.Parameter.empty and name not in args]
    if missing:
        raise ModelConfigError(f"block {label} needs option(s) {', '.join(missing)} in net.block_args")
    return dict(args)


def block_label(spec: object, cls: type[ResidualBlock]) -> str:
    """How messages name a block: its registry name or import path and its class, e.g. `'se_basic' (SEBasicBlock)`."""
    return f"{spec!r} ({cls.__qualname__})" if isinstance(spec, str) else f"{cls.__module__}.{cls.__qualname__}"


def per_stage_block_args(
    block_args: BlockArgs | None, blocks: Sequence[tuple[str, type[ResidualBlock]]]
) -> list[dict[str, Any]]:
    """One checked options mapping per stage, from one mapping for every stage or a list of one per stage.

    `blocks` holds each stage's block label (see `block_label`) and class.
    """
    if block_args is None:
        stage_args: list[Any] = [{}] * len(blocks)
    elif isinstance(block_args, Mapping):
        stage_args = [block_args] * len(blocks)
    elif isinstance(block_args, str):
        raise ModelConfigError(f"net.block_args must be a mapping or a list of mappings, got {block_args!r}")
    else:
        stage_args = list(block_args)
        if len(stage_args) != len(blocks):
            raise ModelConfigError(
                f"net.block_args lists {len(stage_args)} entries but there are {len(blocks)} stages (layers)"
            )
    return [check_block_options(label, cls, args) for (label, cls), args in zip(blocks, stage_args, strict=True)]
