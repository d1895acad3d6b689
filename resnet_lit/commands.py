"""The zoo's inspection commands `models`, `blocks` and `describe` (plain argparse; training is LightningCLI's)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from resnet_lit.models import BLOCKS, MODELS, ResNet, create_model, format_summary, summarize
from resnet_lit.models.describe import LayerSummary

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
    describe.add_argument(
        "--gradients", action="store_true",
        help="instead: gradient norms per stage and per block after one forward/backward at initialisation",
    )  # fmt: skip
    describe.add_argument("--plot", metavar="PATH", help="with --gradients: plot the norm per block into a PNG")
    describe.add_argument("--batch-size", type=_positive_int, help="with --gradients: random images (default 8)")
    describe.add_argument("--seed", type=int, help="with --gradients: seed of the weights and the batch (default 0)")
    args = parser.parse_args(list(argv))
    if args.command == "describe" and not args.gradients:
        extra = [flag for flag, value in (("--plot", args.plot), ("--batch-size", args.batch_size),
                                          ("--seed", args.seed)) if value is not None]  # fmt: skip
        if extra:
            describe.error(f"{', '.join(extra)} {'needs' if len(extra) == 1 else 'need'} --gradients")

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
    elif args.gradients:
        return _describe_gradients(args)
    else:
        return _describe(args.name, args.image_size, args.in_channels)
    return 0


def _describe_gradients(args: argparse.Namespace) -> int:
    # Only `describe --gradients` needs these (and only `--plot` matplotlib, which plot_gradient_flow imports).
    from resnet_lit.models.gradient_flow import format_gradient_flow, initial_gradient_flow, plot_gradient_flow

    flow = initial_gradient_flow(
        args.name,
        batch_size=args.batch_size or 8,
        seed=args.seed or 0,
        image_size=args.image_size,
        in_channels=args.in_channels,
    )
    print(format_gradient_flow(flow))
    if args.plot:
        plot_gradient_flow({args.name: flow}, args.plot, title=f"{args.name}: gradient norm per block at init")
        print(f"plot: {args.plot}")
    return 0


def _describe(name: str, image_size: int | None, in_channels: int | None) -> int:
    overrides = {} if in_channels is None else {"in_channels": in_channels}
    model = create_model(name, **overrides)
    if not isinstance(model, ResNet):
        raise SystemExit(f"describe supports ResNet models; {name!r} builds a {type(model).__name__}")
    if image_size is None:
        image_size = 32 if model.stem.stride == 1 else 224
    channels = model.stem[0].in_channels
    try:
        rows = _summarize_on_meta(model, image_size, channels)
    except (NotImplementedError, RuntimeError):  # a forward that needs values, e.g. a plugin block's `.item()`
        rows = summarize(create_model(name, **overrides), image_size, channels)
    print(format_summary(name, rows, image_size, channels))
    return 0


def _summarize_on_meta(model: ResNet, image_size: int, channels: int) -> list[LayerSummary]:
    """`summarize` on the meta device: shapes, parameters and MACs need no arithmetic, so a ResNet-50 at
    224 px takes 0.1 s instead of a real forward's seconds. Moves `model`'s weights away (to meta)."""
    with torch.device("meta"):
        return summarize(model.to("meta"), image_size, channels)
