"""CIFAR-10 time-to-accuracy with the fast ResNet-18 recipe (configs/cifar10_resnet18.yaml).

Runs `resnet-lit fit` on the recipe with the data swapped for the CIFAR-10 JPEG set in ImageFolder layout
(`<root>/train/<class>/*.jpg`, e.g. `.data/cifar10` unpacked from cifar10-jpg-train.tar.gz), a seeded 45k/5k
train/val split of it (the JPEG set has no test split), and the in-memory device path (`loader: device`).
Training stops when val/acc first reaches the target; the seconds from the start of training (after data
loading) to that validation are written to `<out>/cifar10_time_to_accuracy.json` after every validation.

Nothing but training and validation runs inside the timed window: no checkpoint is written. The schedule
(`--epochs`, the recipe's 40 by default; warmup + cosine over all of them) must fit the time cap
(`--max-minutes`): a cosine cut off at a high learning rate measures nothing. From the second validation on,
the run projects the end of its schedule and stops as soon as that lies beyond the cap, saying so in the JSON
(`schedule_fits: false`) and on the console; lower `--epochs` (or raise the cap) then.

    python benchmarks/cifar10_time_to_accuracy.py --root .data/cifar10 --out /tmp/out [--epochs 30 --max-minutes 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The checkpoint callback with every save turned off (as the benchmark's fit runner, resnet_lit/bench/fit.py).
NO_CHECKPOINTS = {"save_last": False, "save_top_k": 0, "every_n_epochs": 0, "every_n_train_steps": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / ".data" / "cifar10"), help="ImageFolder root with train/")
    parser.add_argument("--out", default=".", help="folder for the JSON result")
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("--loader", default="device", choices=["device", "dataloader"])
    parser.add_argument("--max-minutes", type=float, default=4.0, help="cap on the training time")
    parser.add_argument("--epochs", type=int, default=None, help="length of the schedule (default: the recipe's)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true", help="model.compile: true")
    parser.add_argument("extra", nargs="*", help="further `resnet-lit fit` arguments, after --")
    args = parser.parse_args()

    if not (Path(args.root) / "train").is_dir():
        raise SystemExit(f"no {args.root}/train: unpack cifar10-jpg-train.tar.gz into {args.root}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "cifar10_time_to_accuracy.json"
    result_path.unlink(missing_ok=True)  # never report an earlier run's result

    with open(REPO / "configs" / "cifar10_resnet18.yaml") as f:
        config = yaml.safe_load(f)
    batch_size = config["data"]["init_args"]["batch_size"]
    config["data"] = {
        "class_path": "resnet_lit.data.ImageFolderDataModule",
        "init_args": {
            "root": args.root,
            "transform_style": "cifar",
            "image_size": 32,
            "batch_size": batch_size,
            "val_fraction": 0.1,
            "num_workers": args.num_workers,
            "persistent_workers": args.loader == "dataloader",
            "loader": args.loader,
        },
    }
    run_dir = tempfile.mkdtemp(prefix="cifar10-tta-")
    trainer = config.setdefault("trainer", {})
    max_seconds = args.max_minutes * 60
    trainer.update({
        "default_root_dir": run_dir,
        "benchmark": True,  # cudnn autotuning: fixed input sizes
        "max_epochs": args.epochs or trainer.get("max_epochs", 40),
        "max_time": _dd_hh_mm_ss(max_seconds),  # hard stop; TimeToAccuracy stops sooner if the schedule won't fit
        "callbacks": [{
            "class_path": "resnet_lit.bench.TimeToAccuracy",
            "init_args": {"target": args.target, "monitor": "val/acc", "output": str(result_path),
                          "max_seconds": max_seconds},
        }],
    })  # fmt: skip
    config["checkpoint"] = dict(NO_CHECKPOINTS)  # no checkpoint inside the timed window
    config["model"]["compile"] = bool(args.compile)
    config_path = Path(run_dir) / "cifar10_time_to_accuracy.yaml"
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)

    start = time.perf_counter()
    command = [sys.executable, "-m", "resnet_lit", "fit", "--config", str(config_path), *args.extra]
    print("+", " ".join(command), flush=True)
    terminated: list[int] = []
    # `timeout` signals the whole process group: let the fit stop by itself, then still write the result.
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    code = subprocess.call(command, cwd=REPO)
    wall = time.perf_counter() - start
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.update({"process_seconds": wall, "exit_code": code, "terminated": bool(terminated),
                   "loader": args.loader, "compile": args.compile, "root": args.root, "config": config})  # fmt: skip
    temporary = result_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(result_path)
    reached = result.get("reached_seconds")
    print(
        f"CIFAR-10 ResNet-18 recipe, loader={args.loader}: "
        + (f"val/acc >= {args.target} after {reached:.1f} s of training" if reached else "target not reached")
        + f"; best val/acc {result.get('best', float('nan')):.4f}; whole process {wall:.1f} s",
        flush=True,
    )
    if result.get("stopped"):
        print(f"stopped early: {result['stopped']}", flush=True)
    return code


def _dd_hh_mm_ss(seconds: float) -> str:
    seconds = max(1, math.ceil(seconds))
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    raise SystemExit(main())
