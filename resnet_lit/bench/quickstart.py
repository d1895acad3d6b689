"""`resnet-lit benchmark quickstart`: the wall times a user waits for, each a whole process from exec to exit.

Every repeat runs, back to back: `python -c "import torch"` (the floor of any command), the zoo commands
`models`, `blocks` and `describe resnet50`, and the quickstart `fit` (configs/quickstart.yaml, into a temporary
`default_root_dir`). The `fit` process carries a `PhaseClock` (see `quickstart_probe`), which splits its wall time
into interpreter start, imports, set-up, validation, training and finish (the parts add up to the total), and
reports the final `val/acc`. Figures are medians over the repeats; each zoo command is also compared with the
`import torch` of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resnet_lit.bench.quickstart_probe import BOOTSTRAP
from resnet_lit.errors import ResNetLitError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
BASELINE = "import torch"
FIT = "fit"
# Name -> the arguments of `python -m resnet_lit` (what `resnet-lit NAME` runs).
ZOO_COMMANDS = {"models": ["models"], "blocks": ["blocks"], "describe resnet50": ["describe", "resnet50"]}
PARTS = ("interpreter", "imports", "setup", "validation", "training", "finish")


class QuickstartBenchmarkError(ResNetLitError):
    """A measured command failed, or the quickstart config is missing."""


@dataclass
class ProcessRun:
    """One measured process: its wall time from exec to exit and, for `fit`, where that time went."""

    name: str
    repeat: int
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    time_to_first_step: float | None = None
    val_acc: float | None = None
    epochs: int | None = None


# Runs one process: (name, argv, repeat, PhaseClock output or None) -> its measurement. Tests pass a stub.
Runner = Callable[[str, list[str], int, str | None], ProcessRun]


def run_process(name: str, argv: list[str], repeat: int, clock_output: str | None = None) -> ProcessRun:
    """Run ``argv`` to its end and time it; with ``clock_output``, read the `PhaseClock` marks it wrote."""
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise QuickstartBenchmarkError(f"{name!r} ({shlex.join(argv)}) exited with {done.returncode}: {last[0]}")
    run = ProcessRun(name, repeat, ended - started)
    if clock_output is None:
        return run
    if not os.path.isfile(clock_output):
        raise QuickstartBenchmarkError(f"{name!r} ({shlex.join(argv)}) ended without training: no phase marks")
    with open(clock_output) as f:
        clock = json.load(f)
    run.parts = fit_parts(clock, started, ended)
    run.time_to_first_step = clock["marks"]["first_step"] - started
    run.val_acc = clock["val_acc"]
    run.epochs = clock["epochs"]
    return run


def fit_parts(clock: dict[str, Any], started: float, ended: float) -> dict[str, float]:
    """The wall time of a `fit` process in parts that add up to ``ended - started``: interpreter start, imports,
    set-up (parse, build, data; up to the start of training), validation (sanity check included), training
    (steps, epoch ends, checkpoint saves) and finish (end of training to process exit)."""
    marks = clock["marks"]
    windows = {
        "setup": (marks["imported"], marks["train_start"]),
        "training": (marks["train_start"], marks["train_end"]),
        "finish": (marks["train_end"], ended),
    }
    parts = {"interpreter": marks["started"] - started, "imports": marks["imported"] - marks["started"]}
    parts.update({name: end - begin for name, (begin, end) in windows.items()})
    parts["validation"] = 0.0
    for begin, end in clock["validations"]:
        window = next((name for name, (lo, hi) in windows.items() if lo <= begin < hi), "training")
        parts[window] -= end - begin
        parts["validation"] += end - begin
    return {name: parts[name] for name in PARTS}


def commands(config: str, root: str, clock_output: str, with_fit: bool = True) -> dict[str, list[str]]:
    """The measured processes of one repeat, in the order they run."""
    python = sys.executable
    argvs = {BASELINE: [python, "-c", BASELINE]}
    argvs.update({name: [python, "-m", "resnet_lit", *args] for name, args in ZOO_COMMANDS.items()})
    if with_fit:
        fit_args = ["fit", "--config", config, "--trainer.default_root_dir", root]
        argvs[FIT] = [python, "-c", BOOTSTRAP, clock_output, *fit_args]
    return argvs


def measure_quickstart(
    config: str,
    repeats: int,
    *,
    with_fit: bool = True,
    run: Runner = run_process,
    log: Callable[[str], None] = print,
    on_run: Callable[[list[ProcessRun]], None] | None = None,
) -> list[ProcessRun]:
    """Every command of `commands`, ``repeats`` times; each `fit` writes into a fresh temporary directory."""
    runs: list[ProcessRun] = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory(prefix="resnet-lit-quickstart-") as tmp:
            clock_output = os.path.join(tmp, "phases.json")
            for name, argv in commands(config, os.path.join(tmp, "run"), clock_output, with_fit).items():
                result = run(name, argv, repeat, clock_output if name == FIT else None)
                runs.append(result)
                log(f"[{repeat + 1}/{repeats}] {name}: {result.seconds:.2f} s")
                if on_run is not None:
                    on_run(runs)
    return runs


def summarize_runs(runs: Sequence[ProcessRun]) -> dict[str, dict[str, Any]]:
    """Per command: the median wall time and every run's; zoo commands also the medians of their per-repeat
    ratio to, and difference from, `import torch`; `fit` also its parts, time to first step and val/acc."""
    by_name: dict[str, list[ProcessRun]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    baseline = {r.repeat: r.seconds for r in by_name.get(BASELINE, [])}
    results: dict[str, dict[str, Any]] = {}
    for name, items in by_name.items():
        samples = [r.seconds for r in items]
        result: dict[str, Any] = {"seconds": statistics.median(samples), "samples": samples}
        paired = [(r.seconds, baseline[r.repeat]) for r in items if r.repeat in baseline]
        if name in ZOO_COMMANDS and paired:
            result["ratio_to_import_torch"] = statistics.median(s / b for s, b in paired)
            result["over_import_torch_s"] = statistics.median(s - b for s, b in paired)
        if name == FIT:
            result["parts"] = {p: statistics.median(r.parts[p] for r in items) for p in PARTS}
            result["time_to_first_step"] = statistics.median(r.time_to_first_step for r in items)  # type: ignore[type-var]
            accuracies = [r.val_acc for r in items if r.val_acc is not None]
            result["val_acc"] = statistics.median(accuracies) if accuracies else None
            result["val_acc_samples"] = accuracies
        results[name] = result
    return results


def format_summary(results: dict[str, dict[str, Any]], argvs: dict[str, list[str]]) -> str:
    """The medians as a few aligned lines (the JSON has every run)."""
    rows = [("command", "median s", "runs (s)", "vs import torch")]
    for name, result in results.items():
        ratio = result.get("ratio_to_import_torch")
        rows.append(
            (
                _display(argvs[name]),
                f"{result['seconds']:.2f}",
                " ".join(f"{s:.2f}" for s in result["samples"]),
                "" if ratio is None else f"{ratio:.2f}x ({result['over_import_torch_s']:+.2f} s)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    fit = results.get(FIT)
    if fit is not None:
        lines.append("fit parts (median s): " + ", ".join(f"{p} {fit['parts'][p]:.2f}" for p in PARTS))
        accuracy = "-" if fit["val_acc"] is None else f"{fit['val_acc']:.4f}"
        lines.append(f"fit: first training step after {fit['time_to_first_step']:.2f} s; final val/acc {accuracy}")
    return "\n".join(lines)


def _display(argv: list[str]) -> str:
    """How a user types the command: `resnet-lit models` for `python -m resnet_lit models`."""
    if argv[1:3] == ["-m", "resnet_lit"]:
        return " ".join(["resnet-lit", *argv[3:]])
    if argv[2] == BOOTSTRAP:  # the fit process: its clock's output, then resnet-lit's arguments
        command, _, config = argv[4:7]
        return f"resnet-lit {command} --config {os.path.relpath(config)}"
    return f'python -c "{argv[2]}"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-lit benchmark quickstart",
        description="Wall times of whole processes, exec to exit: `python -c 'import torch'`, `resnet-lit models`, "
        "`blocks`, `describe resnet50` and the quickstart `fit` (split into imports, set-up, training and "
        "validation, with its final val/acc). Nothing is written into the working directory.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of every command, taking turns (default 3)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the fit config (default: the quickstart's)")
    parser.add_argument("--no-fit", dest="fit", action="store_false", help="only `import torch` and the zoo commands")
    parser.add_argument("--json", default=None, help="write every run and the medians to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None, run: Runner | None = None) -> int:
    """Measure, print the medians and (``--json``) write the results, after every run; returns the exit code.
    ``run`` (default `run_process`) runs and times one process."""
    from resnet_lit.bench.report import machine_info

    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("resnet-lit benchmark quickstart: error: --repeats must be at least 1")
    if args.fit and not os.path.isfile(args.config):
        raise QuickstartBenchmarkError(f"--config {args.config!r} does not exist; pass the quickstart config's path")
    config = os.path.abspath(args.config)
    info = machine_info("cpu")
    command = " ".join(["resnet-lit benchmark quickstart", *(argv if argv is not None else sys.argv[1:])])
    argvs = commands(config, "<temporary directory>", "<phases.json>", args.fit)

    def write_json(runs: list[ProcessRun], complete: bool) -> None:
        result = {
            "scenario": "quickstart",
            "command": command,
            "complete": complete,
            "machine": {**info, "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "repeats": args.repeats,
            "config": config,
            "commands": argvs,
            "results": summarize_runs(runs),
            "runs": [asdict(r) for r in runs],
        }
        temporary = f"{args.json}.tmp"
        with open(temporary, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(temporary, args.json)

    runs = measure_quickstart(
        config,
        args.repeats,
        with_fit=args.fit,
        run=run or run_process,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        on_run=(lambda done: write_json(done, complete=False)) if args.json else None,
    )
    print(format_summary(summarize_runs(runs), argvs))
    if args.json:
        write_json(runs, complete=True)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0
