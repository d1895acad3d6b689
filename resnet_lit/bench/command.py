"""`resnet-lit benchmark` and `python -m resnet_lit.bench`: the command line of the benchmarks."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from resnet_lit.bench.config import MEMORY_FORMATS, PRECISIONS, RUNNERS, BenchConfig, Measurement
from resnet_lit.bench.measure import measure
from resnet_lit.bench.report import format_table, machine_info, summarize


def _csv(kind: type, choices: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = []
        for item in text.split(","):
            item = item.strip()
            value = (item.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(item)
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, choices))}")
            values.append(value)
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of `resnet-lit benchmark`; comma-separated values multiply the configurations."""
    parser = argparse.ArgumentParser(
        prog="resnet-lit benchmark",
        description="Training images/s and peak memory of resnet-lit fit beside a hand-written PyTorch loop. "
        "Comma-separated values multiply the configurations.",
        epilog="`resnet-lit benchmark quickstart` measures instead what a user waits for: the wall times of the "
        "zoo commands and of the quickstart fit, start-up included (see its --help).",
    )
    parser.add_argument("--model", type=_csv(str), default=["resnet20"], help="zoo architecture(s)")
    parser.add_argument("--image-size", type=_csv(int), default=[32])
    parser.add_argument("--batch-size", type=_csv(int), default=[128])
    parser.add_argument("--precision", type=_csv(str, PRECISIONS), default=["32-true"])
    parser.add_argument("--memory-format", type=_csv(str, MEMORY_FORMATS), default=["channels_last"])
    parser.add_argument("--compile", type=_csv(bool), default=[False], help="true, false or both: false,true")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder root (root/train/...)")
    parser.add_argument(
        "--loader",
        type=_csv(str, ("device", "dataloader")),
        default=None,
        help="data path of fit/pipeline (default: device for synthetic, dataloader for folders)",
    )
    parser.add_argument("--num-workers", type=_csv(int), default=[0], help="DataLoader workers (dataloader path)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--runners", type=_csv(str, RUNNERS), default=["loop", "fit"])
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (use more with --compile)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every run")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    parser.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="on CPUs, run loop and fit one after the other instead of taking turns step by step",
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and (``--json``) write the results; returns the exit code.

    A first argument ``quickstart`` runs that scenario instead (`resnet_lit.bench.quickstart`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quickstart"]:
        from resnet_lit.bench.quickstart import main as run_quickstart

        return run_quickstart(argv[1:])
    args = build_parser().parse_args(argv)
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SystemExit(f"resnet-lit benchmark: error: --data {args.data!r} is neither 'synthetic' nor a folder")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("resnet-lit benchmark: error: --warmup, --steps and --repeats must be at least 1")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine_info(device)
    print(
        f"# {info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads)"
        f"{', ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}, lightning {info['lightning']}; "
        f"load average {info['load_average']}",
        file=sys.stderr,
    )
    command = " ".join(["resnet-lit benchmark", *argv])

    def write_json(measurements: list[Measurement], complete: bool) -> None:
        write_results(args.json, command, args, info, measurements, complete)

    measurements = measure(
        configurations(args, device),
        args.runners,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        interleave=args.interleave,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        on_measurement=(lambda done: write_json(done, complete=False)) if args.json else None,
    )
    print(format_table(summarize(measurements)))
    if args.json:
        write_json(measurements, complete=True)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


def write_results(
    path: str,
    command: str,
    args: argparse.Namespace,
    info: dict[str, Any],
    measurements: list[Measurement],
    complete: bool,
) -> None:
    """The JSON of a benchmark: every run, the medians and ratios of the runs so far, and the machine.

    Written after every run (``complete`` false until the last), by replacing the file, so that a benchmark
    killed by a time limit keeps every finished run and the file always parses.
    """
    info = {**info, "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    result = {
        "command": command,
        "complete": complete,
        "machine": info,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": [{**asdict(s), "config": asdict(s.config)} for s in summarize(measurements)],
        "measurements": [{**asdict(m), "config": asdict(m.config)} for m in measurements],
    }
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(temporary, path)


def configurations(args: argparse.Namespace, device: str) -> list[BenchConfig]:
    """Every combination of the list-valued options, without repeats (workers only vary the dataloader path)."""
    loaders = args.loader or (["device"] if args.data == "synthetic" else ["dataloader"])
    configs = [
        BenchConfig(
            model=model,
            image_size=size,
            batch_size=batch,
            precision=precision,
            memory_format=fmt,
            compile=compiled,
            data=args.data,
            loader=loader,
            num_workers=workers if loader == "dataloader" else 0,
            num_classes=args.num_classes,
            device=device,
            cudnn_benchmark=args.cudnn_benchmark,
        )
        for model, size, batch, precision, fmt, compiled, loader, workers in itertools.product(
            args.model,
            args.image_size,
            args.batch_size,
            args.precision,
            args.memory_format,
            args.compile,
            loaders,
            args.num_workers,
        )
    ]
    return list(dict.fromkeys(configs))
