"""The zoo's inspection commands `models`, `blocks` and `describe` (plain argparse; training is LightningCLI's)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resnet_lit.models import BLOCKS, MODELS, ResNet, create_model, format_summary, summarize

ZOO_COMMANDS = ("models", "blocks", "describe")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_zoo_command(argv: Sequence[str]) -> int:
    """Run `models`, `blocks` or `describe` with their arguments; returns the exit code."""
    parser = argparse.ArgumentParser(prog="resnet-lit", description="Inspect the model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list architecture names")
    models.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'resnet*'")
    blocks = sub.add_parser("blocks", help="list residual block types and where they come from")
    blocks.add_argument("pattern", nargs="?", default="*")
    describe = sub.add_parser("describe", help="per-stage output shape, parameters and MACs")
    describe.add_argument("name", help="architecture name, e.g. resnet50")
    describe.add_argument("--image-size", type=_positive_int, help="input side (default 224; 32 for CIFAR)")
    describe.add_argument("--in-channels", type=_positive_int, help="input channels (default: the model's)")
    args = parser.parse_args(list(argv))

    if args.command in ("models", "blocks"):
        registry = MODELS if args.command == "models" else BLOCKS
        if not registry.names(args.pattern):
            print(f"no {registry.kind}s match {args.pattern!r}", file=sys.stderr)
            return 1
    if args.command == "models":
        print("\n".join(MODELS.names(args.pattern)))
    elif args.command == "blocks":
        for name in BLOCKS.names(args.pattern):
            cls = BLOCKS.get(name)
            print(f"{name:<20} {BLOCKS.origin(name):<24} {cls.__module__}.{cls.__qualname__}")
    else:
        return _describe(args.name, args.image_size, args.in_channels)
    return 0


def _describe(name: str, image_size: int | None, in_channels: int | None) -> int:
    overrides = {} if in_channels is None else {"in_channels": in_channels}
    model = create_model(name, **overrides)
    if not isinstance(model, ResNet):
        raise SystemExit(f"describe supports ResNet models; {name!r} builds a {type(model).__name__}")
    if image_size is None:
        image_size = 32 if model.stem.stride == 1 else 224
    channels = model.stem[0].in_channels
    print(format_summary(name, summarize(model, image_size, channels), image_size, channels))
    return 0
