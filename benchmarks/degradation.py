"""The degradation experiment of He et al. (2016a) on a CIFAR-10 subset, small enough for a CPU.

Unpacks the first ``--per-class`` images of each class of the CIFAR-10 JPEG set (``cifar10-jpg-train.tar.gz``,
ImageFolder layout) into ``--root``, holds out a seeded 20% of them for validation, and runs ``resnet-lit fit``
with each recipe of ``configs/degradation/`` (plain20, plain56, resnet20, resnet56) for every seed: the same
data, epochs and schedule (the recipes' lr 0.1 per 128 images, so 0.05 at batch 64; a tenth of it for the first
epoch; divided by 10 at 50% and 75% of the steps, as the paper's 32k and 48k of 64k), only the network differs.
Each command is printed as it runs. It writes ``<out>/degradation.json`` and a markdown table of the final
training loss (the mean of the last epoch's logged ``train/loss``), the last epoch's training accuracy and the
final ``val/acc`` per network and seed, plus ``<out>/gradient_flow.png``: the gradient norm of every block at
initialisation, plain56 against resnet56 (``resnet-lit describe --gradients``).

    python benchmarks/degradation.py --tar ../shared/data/cifar10-jpg-train.tar.gz --out docs/deep-residual
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("plain20", "plain56", "resnet20", "resnet56")


def unpack_subset(tar: Path, root: Path, per_class: int) -> Path:
    """The first `per_class` JPEGs of each class as `root/train/<class>/` (kept when already there)."""
    marker = root / f".per_class_{per_class}"
    if marker.is_file():
        return root
    taken: dict[str, int] = {}
    with tarfile.open(tar) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            label = parts[-2]
            if taken.get(label, 0) >= per_class:
                continue
            target = root / "train" / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            taken[label] = taken.get(label, 0) + 1
            if len(taken) == 10 and min(taken.values()) >= per_class:
                break
    marker.write_text(json.dumps(taken))
    return root


def fit_command(network: str, seed: int, args: argparse.Namespace, steps_per_epoch: int, run_dir: Path) -> list[str]:
    total = args.epochs * steps_per_epoch
    milestones = [total // 2, total * 3 // 4]
    return [
        "resnet-lit", "fit", "--config", f"configs/degradation/{network}.yaml",
        "--seed_everything", str(seed),
        "--data", "resnet_lit.data.ImageFolderDataModule", "--data.root", str(args.root),
        "--data.transform_style", "cifar", "--data.image_size", "32", "--data.val_fraction", "0.2",
        "--data.batch_size", str(args.batch_size), "--data.loader", "device", "--data.num_workers", "0",
        "--trainer.max_epochs", str(args.epochs), "--trainer.max_steps", "-1",
        "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--model.lr_scheduler.milestones", json.dumps(milestones),
        "--model.lr_scheduler.warmup_steps", str(steps_per_epoch),
        # The recipes' lr 0.1 is per 128 images (the paper's batch): at batch 64, 0.05, by the linear scaling rule.
        "--model.lr_reference_batch", "128",
    ]  # fmt: skip


def read_result(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    last_epoch = max(int(r["epoch"]) for r in rows if r.get("epoch"))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss") and int(r["epoch"]) == last_epoch]
    train_acc = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    return {"train_loss": statistics.fmean(losses), "train_acc": train_acc[-1], "val_acc": val_acc[-1]}


def markdown_table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> str:
    lines = [
        "| network | " + " | ".join(f"seed {s}: train loss / train acc / val acc" for s in seeds)
        + " | mean train loss | mean val acc |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for network, by_seed in results.items():
        cells = [
            f"{r['train_loss']:.3f} / {r['train_acc']:.3f} / {r['val_acc']:.3f}" for r in (by_seed[s] for s in seeds)
        ]
        mean_loss = statistics.fmean(by_seed[s]["train_loss"] for s in seeds)
        mean_acc = statistics.fmean(by_seed[s]["val_acc"] for s in seeds)
        lines.append(f"| {network} | " + " | ".join(cells) + f" | {mean_loss:.3f} | {mean_acc:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tar", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz")
    parser.add_argument("--root", type=Path, default=REPO / ".data" / "cifar10_degradation")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "deep-residual")
    parser.add_argument("--per-class", type=int, default=200, help="images per class (20%% of them held out)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    args = parser.parse_args()
    args.root = unpack_subset(args.tar, args.root.resolve(), args.per_class)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    train_images = 10 * args.per_class - round(10 * args.per_class * 0.2)
    steps_per_epoch = train_images // args.batch_size  # drop_last

    results: dict[str, dict[int, dict[str, float]]] = {}
    commands: list[str] = []
    for seed in args.seeds:  # seed by seed: a partial run still compares the four networks
        for network in args.networks:
            run_dir = args.out / "runs" / f"{network}-seed{seed}"
            command = fit_command(network, seed, args, steps_per_epoch, run_dir)
            shown = " ".join(command)
            print("+", shown, flush=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "resnet_lit", *command[1:]], cwd=REPO, check=True)
            result = read_result(run_dir / "metrics.csv")
            result["seconds"] = time.perf_counter() - start
            print(f"  {network} seed {seed}: {result}", flush=True)
            results.setdefault(network, {})[seed] = result
            commands.append(shown)
            (args.out / "degradation.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "commands": commands},
                indent=2))  # fmt: skip

    from resnet_lit.models.gradient_flow import initial_gradient_flow, plot_gradient_flow

    flows = {name: initial_gradient_flow(name, batch_size=args.batch_size, seed=0) for name in ("plain56", "resnet56")}
    plot_gradient_flow(flows, args.out / "gradient_flow.png", title="gradient norm per block at initialisation")
    table = markdown_table(results, args.seeds)
    (args.out / "degradation.md").write_text(table + "\n")
    print(table)
    for name, flow in flows.items():
        print(f"{name} at initialisation: " + ", ".join(f"{part} {norm:.3g}" for part, norm in flow.parts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
