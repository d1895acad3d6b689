"""CIFAR-10 speedrun: configs/cifar10_speedrun.yaml, trained once per schedule length and scored once (issue 16).

Data: the shared set holds only the 50k CIFAR-10 training JPEGs (re-encoded, slightly lossy). `prepare` builds
ROOT/train from all but the last 1,000 files (sorted by name) of each class (40k) and ROOT/val from those last
1,000 (10k, held out), as hard links (copies across file systems). The held-out figure is NOT the official test
set's.

`run` trains the recipe once per `--epochs` value (separate runs: a cosine cut short is not a shorter recipe), in
this process, with nothing inside the timed part but training: no validation, no checkpoint, no progress bar.
A callback times it (the device synchronised at each mark):
  first_steps_seconds  training start to the end of the first `--first-steps` steps: compilation, cuDNN autotuning,
                       the copy of the images to the device, and those steps;
  steady_seconds       the rest of training, to the end of the last step;
  train_seconds        steady_seconds + first_steps x the steady time per step: the training time with everything
                       one-off taken out;
  compile_seconds      first_steps_seconds - first_steps x the steady time per step: the one-off part.
Then the final weights are scored once on ROOT/val with the recipe's flip TTA (`accuracy`, also timed). Every run
is appended to the JSON as soon as it ends. With `--deadline-seconds` a run is skipped (and listed as such) when
the previous run's timings say it would end after the deadline.

    python benchmarks/cifar10_speedrun.py prepare --root .data/cifar10-speedrun
    python benchmarks/cifar10_speedrun.py run --epochs 16 10 20 --json speedrun.json
    python benchmarks/cifar10_speedrun.py run --accelerator cpu --epochs 4 --json cpu.json -- \\
        --data.init_args.batch_size 256      # further `resnet-lit fit` arguments after --
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar10_speedrun.yaml"
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"
SOURCE = REPO / ".data" / "cifar10"
HELD_OUT_PER_CLASS = 1000


# --- data -------------------------------------------------------------------------------------------------
def prepare(root: Path, source: Path = SOURCE, tarball: Path = TARBALL, held_out: int = HELD_OUT_PER_CLASS) -> Path:
    """ROOT/train (all but the last `held_out` files per class) and ROOT/val (those last ones), from `source`
    (an unpacked set, `source/train/<class>/*.jpg`) or else the tarball. Kept while ROOT/split.json matches."""
    unpacked = (source / "train").is_dir()
    marker = {"held_out_per_class": held_out, "source": str((source if unpacked else tarball).resolve())}
    if (root / "split.json").is_file() and json.loads((root / "split.json").read_text()) == marker:
        return root
    with tempfile.TemporaryDirectory() as scratch:
        if not unpacked:
            print(f"unpacking {tarball}", flush=True)
            with tarfile.open(tarball) as archive:
                archive.extractall(scratch, filter="data")
            source = Path(scratch)
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
            files = sorted(p.name for p in class_dir.iterdir())
            if len(files) <= held_out:
                raise SystemExit(
                    f"{class_dir} has {len(files)} files: none left to train on if {held_out} are held out"
                )
            for split, chosen in (("train", files[:-held_out]), ("val", files[-held_out:])):
                target = partial / split / class_dir.name
                target.mkdir(parents=True)
                for name in chosen:
                    _link_or_copy(class_dir / name, target / name)
        (partial / "split.json").write_text(json.dumps(marker))
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(root)
    return root


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- timing -----------------------------------------------------------------------------------------------
def speedrun_clock(first_steps: int) -> Any:
    """A Lightning callback timing training in two parts: the first `first_steps` steps, and the rest."""
    import lightning as L
    import torch

    def synchronize(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    class SpeedrunClock(L.Callback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.steps = 0

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            synchronize(pl_module)
            self.marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            self.steps += 1
            if self.steps == first_steps:  # the only synchronisation inside training: one step, once
                synchronize(pl_module)
                self.marks["first_steps"] = time.perf_counter()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            synchronize(pl_module)
            self.marks["end"] = time.perf_counter()

        def result(self) -> dict[str, float | int]:
            start, end = self.marks["start"], self.marks["end"]
            first = self.marks.get("first_steps", end)
            timed_first = min(first_steps, self.steps)
            per_step = (end - first) / (self.steps - timed_first) if self.steps > timed_first else 0.0
            return {
                "steps": self.steps,
                "first_steps": timed_first,
                "first_steps_seconds": first - start,
                "steady_seconds": end - first,
                "steady_seconds_per_step": per_step,
                "train_seconds": end - first + timed_first * per_step,
                "compile_seconds": max(0.0, first - start - timed_first * per_step),
            }

    return SpeedrunClock()


# --- one run ----------------------------------------------------------------------------------------------
def train_and_score(root: Path, epochs: int, run_dir: Path, first_steps: int, fit_args: list[str]) -> dict[str, Any]:
    """Train the recipe for `epochs` epochs, timed, then score the final model once on ROOT/val (flip TTA)."""
    import torch

    from resnet_lit.training_cli import ResNetLitCLI

    torch._dynamo.reset()  # every run compiles afresh (Inductor's on-disk cache aside), within dynamo's cache limit
    process_start = time.perf_counter()
    cli = ResNetLitCLI(
        args=["--config", str(CONFIG), "--data.init_args.root", str(root), "--trainer.max_epochs", str(epochs),
              "--trainer.default_root_dir", str(run_dir), *fit_args],
        run=False,
    )  # fmt: skip
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if trainer.limit_val_batches != 0:
        raise SystemExit("the timed part must not validate: keep trainer.limit_val_batches: 0")
    clock = speedrun_clock(first_steps)
    trainer.callbacks.insert(0, clock)
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - process_start
    if not trainer.state.finished or trainer.current_epoch != epochs:
        raise SystemExit(f"the {epochs}-epoch run stopped after {trainer.current_epoch} epochs")
    timing = clock.result()
    eval_start = time.perf_counter()
    trainer.limit_val_batches = 1.0  # score once, outside the timed part: the whole held-out split
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    return {
        "epochs": epochs,
        "accuracy": metrics["val/acc"],
        "loss": metrics["val/loss"],
        "held_out_images": len(data.splits().val),
        "train_images": len(data.splits().train),
        "batch_size": data.batch_size,
        **timing,
        "setup_seconds": fit_seconds - timing["first_steps_seconds"] - timing["steady_seconds"],
        "eval_seconds": time.perf_counter() - eval_start,
        "wall_seconds": time.perf_counter() - process_start,
        "device": _device_name(trainer),
        "precision": str(trainer.precision),
        "compile": bool(model.hparams.compile),
        "tta": model.hparams.tta,
    }


def _device_name(trainer: Any) -> str:
    import torch

    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    import torch

    root = prepare(Path(args.root), Path(args.source), Path(args.tarball), args.held_out)
    fit_args = ["--trainer.accelerator", args.accelerator, *args.fit_args]
    if args.accelerator == "cpu":
        fit_args = ["--model.compile", "false", *fit_args]  # Inductor on this CPU costs more than it saves
    result: dict[str, Any] = {
        "config": str(CONFIG.relative_to(REPO)), "root": str(root), "fit_args": fit_args,
        "held_out": f"the last {args.held_out} files (sorted by name) of each class of the 50k CIFAR-10 training "
                    "JPEGs; not the official test set",
        "torch": torch.__version__, "runs": [], "skipped": [],
    }  # fmt: skip
    start = time.perf_counter()
    previous: dict[str, Any] | None = None
    for epochs in args.epochs:
        if args.deadline_seconds and previous is not None:
            projected = _projected_seconds(previous, epochs)
            if time.perf_counter() - start + projected > args.deadline_seconds:
                print(f"skipping the {epochs}-epoch run: about {projected:.0f} s, past the deadline", flush=True)
                result["skipped"].append({"epochs": epochs, "projected_seconds": projected})
                _write(args.json, result)
                continue
        with tempfile.TemporaryDirectory(prefix="cifar10-speedrun-") as run_dir:
            previous = train_and_score(root, epochs, Path(run_dir), args.first_steps, fit_args)
        result["runs"].append(previous)
        _write(args.json, result)
        print(_line(previous), flush=True)
    return 0


def _projected_seconds(previous: dict[str, Any], epochs: int) -> float:
    """The wall time of an `epochs`-epoch run, from the previous run's one-off parts and its time per epoch."""
    one_off = previous["wall_seconds"] - previous["train_seconds"]
    return one_off + previous["train_seconds"] * epochs / previous["epochs"]


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['epochs']} epochs: held-out accuracy {run['accuracy']:.4f} ({run['held_out_images']} images, flip TTA); "
        f"training {run['train_seconds']:.2f} s ({run['steps']} steps of {run['batch_size']}), compile and other "
        f"first-step costs {run['compile_seconds']:.2f} s, set-up {run['setup_seconds']:.1f} s, scoring "
        f"{run['eval_seconds']:.1f} s; {run['device']}"
    )


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        temporary = Path(path).with_suffix(".tmp")
        temporary.write_text(json.dumps(result, indent=2))
        temporary.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("prepare", "build ROOT/train (40k) and ROOT/val (10k)"),
                            ("run", "train once per --epochs value, score each once")):  # fmt: skip
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--root", default=str(REPO / ".data" / "cifar10-speedrun"), help="the folder to build/use")
        p.add_argument("--source", default=str(SOURCE), help="unpacked JPEGs (SOURCE/train/<class>/); else --tarball")
        p.add_argument("--tarball", default=str(TARBALL))
        p.add_argument("--held-out", type=int, default=HELD_OUT_PER_CLASS, help="files per class held out")
    p.add_argument("--epochs", type=int, nargs="+", default=[16], help="one run per value")
    p.add_argument("--accelerator", default="auto", help="trainer.accelerator (cpu: compile off)")
    p.add_argument("--first-steps", type=int, default=3, help="steps timed as the one-off part (compile)")
    p.add_argument("--deadline-seconds", type=float, default=None, help="skip runs projected to end after it")
    p.add_argument("--json", default=None, help="result file, rewritten after every run")
    p.add_argument("fit_args", nargs="*", help="further `resnet-lit fit` arguments, after --")
    args = parser.parse_args()
    if args.command == "prepare":
        print(prepare(Path(args.root), Path(args.source), Path(args.tarball), args.held_out))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
