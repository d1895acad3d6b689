"""CIFAR-10 on a CPU budget: configs/cifar10_budget.yaml against a hand-written PyTorch loop (issue 16).

Data: the first 1,000 files (sorted by name) of each class of the CIFAR-10 JPEGs train (ROOT/train, 10,000
images); the next 500 of each class are held out (ROOT/val, 5,000 images) and only score final models.
`prepare` builds ROOT from the unpacked set (`.data/cifar10/train/<class>/*.jpg`) or the tarball.

Per seed the two contestants run back to back as whole processes, each timed from exec to exit:
  baseline  this file's `baseline` command: a hand-written loop with ResNet-20 (option A shortcuts), SGD
            Nesterov 0.9 lr 0.1, weight decay 1e-4 except norms and biases, one-cycle (25% warm-up), batch 128,
            pad-4 crop + flip on uint8 tensors in memory, channels_last fp32, 5 epochs, JPEG decoding included;
  recipe    `resnet-lit fit --config configs/cifar10_budget.yaml --data.init_args.root ROOT`.
Then, outside the timed part, both final models are scored on ROOT/val: the baseline's weights here, the
recipe's last.ckpt by `resnet-lit validate` (its EMA weights and flip TTA, as the recipe evaluates).
The JSON holds every run; the console the medians, the accuracy difference and the wall-time ratio.

    python benchmarks/cifar10_budget.py prepare --root .data/cifar10-budget
    python benchmarks/cifar10_budget.py compare --root .data/cifar10-budget --seeds 0 1 2 --json budget.json
    python benchmarks/cifar10_budget.py compare --baseline-epochs 10 --recipe-args --trainer.max_epochs 18 ...
    python benchmarks/cifar10_budget.py plot budget*.json --output docs/images/cifar10_budget.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 1000, 500
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# --- data -------------------------------------------------------------------------------------------------
# (first, end) file positions per class, sorted by name: the benchmark's layout, and the tuning layout that
# splits the same 1,000 training files into 900 to train on and 100 to choose the recipe's settings with.
BENCHMARK_LAYOUT = {"train": (0, TRAIN_PER_CLASS), "val": (TRAIN_PER_CLASS, TRAIN_PER_CLASS + HELD_OUT_PER_CLASS)}
TUNING_LAYOUT = {"train": (0, 900), "val": (900, TRAIN_PER_CLASS)}


def prepare(root: Path, source: Path | None = None, tarball: Path = TARBALL,
            layout: dict[str, tuple[int, int]] = BENCHMARK_LAYOUT) -> Path:  # fmt: skip
    """ROOT/train and ROOT/val, per class the files at ``layout``'s positions, from an unpacked set or the tarball."""
    if all((root / split).is_dir() for split in layout):
        return root
    with tempfile.TemporaryDirectory() as scratch:
        if source is None or not (source / "train").is_dir():
            print(f"unpacking {tarball}", flush=True)
            with tarfile.open(tarball) as archive:
                archive.extractall(scratch, filter="data")
            source = Path(scratch)
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        needed = max(end for _, end in layout.values())
        for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
            files = sorted(p.name for p in class_dir.iterdir())
            if len(files) < needed:
                raise SystemExit(f"{class_dir} has {len(files)} files, fewer than {needed}")
            for split, (first, end) in layout.items():
                target = partial / split / class_dir.name
                target.mkdir(parents=True)
                for name in files[first:end]:
                    shutil.copyfile(class_dir / name, target / name)
        root.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(root)
    return root


def load_split(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every JPEG of ``split_dir/<class>/`` decoded to one uint8 NCHW tensor, with the class indices."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in split_dir.iterdir() if p.is_dir())):
        for path in sorted(class_dir.iterdir()):
            images.append(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


# --- the hand-written baseline --------------------------------------------------------------------------
try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:  # `plot` and `prepare` need no torch
    torch = None


if torch is not None:

    class BasicBlock(nn.Module):
        """Two 3x3 conv-BN layers; option A shortcut: stride-2 subsampling and zero-padded channels."""

        def __init__(self, in_planes: int, planes: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.stride, self.pad = stride, planes - in_planes

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + shortcut)

    class ResNet20(nn.Module):
        """He et al. (2016), section 4.2: 3x3 conv 16, three stages of 3 blocks (16, 32, 64), pool, linear."""

        def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            layers, in_planes = [], 16
            for stage, planes in enumerate((16, 32, 64)):
                for i in range(blocks_per_stage):
                    layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                    in_planes = planes
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(F.relu(self.bn(self.conv(x))))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def crop_and_flip(padded: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the zero-padded 40x40 images ``padded[index]``, each flipped with probability 1/2."""
    n = index.numel()
    dy, dx = (torch.randint(0, 9, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[index[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


def train_baseline(root: Path, seed: int, epochs: float, batch_size: int = 128) -> nn.Module:
    """The hand-written loop; ``epochs`` may be fractional (the budget curve)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_split(root / "train")
    padded = F.pad(images, (4, 4, 4, 4))
    model = ResNet20().to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.1, momentum=0.9, nesterov=True)  # fmt: skip
    steps_per_epoch = -(-len(labels) // batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total_steps, pct_start=0.25,
                                                    cycle_momentum=False)  # fmt: skip
    model.train()
    step = 0
    while step < total_steps:
        order = torch.randperm(len(labels), generator=generator)
        for index in order.split(batch_size):
            x = normalize(crop_and_flip(padded, index, generator))
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total_steps:
                break
    return model


@torch.no_grad() if torch is not None else (lambda f: f)
def held_out_accuracy(model: nn.Module, root: Path) -> float:
    images, labels = load_split(root / "val")
    model.eval()
    batches = zip(images.split(500), labels.split(500), strict=True)
    correct = sum(int((model(normalize(x)).argmax(1) == y).sum()) for x, y in batches)
    return correct / len(labels)


# --- the comparison ---------------------------------------------------------------------------------------
def run_timed(command: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, done.returncode, (done.stdout + done.stderr)[-3000:]


def score_recipe(config: Path, root: Path, run_dir: Path, recipe_args: list[str]) -> float:
    """val/acc of the recipe's last checkpoint on ROOT/val, as the recipe evaluates (EMA weights, TTA): a
    `resnet-lit validate` in this process, which appends its metrics to the run's metrics.csv."""
    import csv

    from resnet_lit.cli import main as resnet_lit_main

    resnet_lit_main(["validate", "--config", str(config), "--data.init_args.root", str(root),
                     "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last",
                     "--trainer.limit_val_batches", "1.0", "--trainer.enable_progress_bar", "false",
                     *recipe_args])  # fmt: skip
    with open(run_dir / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/acc")]
    return float(rows[-1]["val/acc"])


def compare(args: argparse.Namespace) -> int:
    root = prepare(Path(args.root), REPO / ".data" / "cifar10")
    runs: list[dict] = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="cifar10-budget-") as scratch:
            weights = Path(scratch) / "baseline.pt"
            run_dir = Path(scratch) / "recipe"
            contestants = {
                "baseline": [sys.executable, __file__, "baseline", "--root", str(root), "--seed", str(seed),
                             "--epochs", str(args.baseline_epochs), "--output", str(weights)],
                "recipe": [sys.executable, "-m", "resnet_lit", "fit", "--config", str(args.config),
                           "--data.init_args.root", str(root), "--seed_everything", str(seed),
                           "--data.init_args.seed", str(seed),
                           "--trainer.default_root_dir", str(run_dir), *args.recipe_args],
            }  # fmt: skip
            order = ["baseline", "recipe"] if seed % 2 == 0 else ["recipe", "baseline"]
            timed = {}
            for name in order:
                print(f"seed {seed}: {name} ...", flush=True)
                seconds, code, tail = run_timed(contestants[name])
                if code != 0:
                    print(tail, file=sys.stderr)
                    raise SystemExit(f"{name} failed with exit status {code}")
                timed[name] = seconds
            baseline = ResNet20().to(memory_format=torch.channels_last)
            baseline.load_state_dict(torch.load(weights, weights_only=True))
            run = {
                "seed": seed,
                "baseline_seconds": timed["baseline"],
                "recipe_seconds": timed["recipe"],
                "baseline_accuracy": held_out_accuracy(baseline, root),
                "recipe_accuracy": score_recipe(Path(args.config), root, run_dir, args.recipe_args),
            }
            run["wall_time_ratio"] = run["recipe_seconds"] / run["baseline_seconds"]
            runs.append(run)
            print(json.dumps(run), flush=True)
            write_result(args, runs)
    summary = write_result(args, runs)
    print(f"held-out accuracy (median of {len(runs)}): baseline {summary['baseline_accuracy']:.4f}, recipe "
          f"{summary['recipe_accuracy']:.4f} ({100 * summary['accuracy_gain']:+.2f} points); wall time: baseline "
          f"{summary['baseline_seconds']:.1f} s, recipe {summary['recipe_seconds']:.1f} s (ratio "
          f"{summary['wall_time_ratio']:.3f})")  # fmt: skip
    return 0


def write_result(args: argparse.Namespace, runs: list[dict]) -> dict:
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("baseline_accuracy", "recipe_accuracy", "baseline_seconds", "recipe_seconds",
                           "wall_time_ratio")}  # fmt: skip
    summary["accuracy_gain"] = summary["recipe_accuracy"] - summary["baseline_accuracy"]
    if args.json:
        result = {"summary": summary, "runs": runs, "config": str(args.config),
                  "recipe_args": args.recipe_args, "baseline_epochs": args.baseline_epochs,
                  "cpu_count": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=2))
    return summary


def plot(args: argparse.Namespace) -> int:
    """Held-out accuracy against whole-process wall time, one point per run, a line through the medians."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted((json.loads(Path(path).read_text()) for path in args.results),
                     key=lambda r: r["summary"]["baseline_seconds"])  # fmt: skip
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, label, colour in (("baseline", "hand-written loop (ResNet-20, fp32)", "tab:gray"),
                                ("recipe", "configs/cifar10_budget.yaml", "tab:blue")):  # fmt: skip
        seconds = [run[f"{name}_seconds"] for r in results for run in r["runs"]]
        accuracy = [100 * run[f"{name}_accuracy"] for r in results for run in r["runs"]]
        axes.scatter(seconds, accuracy, s=14, alpha=0.5, color=colour)
        medians = [(r["summary"][f"{name}_seconds"], 100 * r["summary"][f"{name}_accuracy"]) for r in results]
        axes.plot(*zip(*medians, strict=True), "o-", color=colour, label=label)
    axes.set_xlabel("wall time of the whole process, s (2-core CPU)")
    axes.set_ylabel("held-out accuracy, % (5,000 images)")
    axes.set_title("CIFAR-10, 10,000 training images: accuracy per budget")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(args.output)
    return 0


def baseline_command(args: argparse.Namespace) -> int:
    model = train_baseline(Path(args.root), args.seed, args.epochs)
    torch.save(model.state_dict(), args.output)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="build ROOT/train and ROOT/val")
    p.add_argument("--root", default=str(REPO / ".data" / "cifar10-budget"))
    p.add_argument("--tarball", default=str(TARBALL))
    p.add_argument("--tuning", action="store_true",
                   help="the tuning layout: of the 1,000 training files per class, train on 900, validate on 100")
    p = commands.add_parser("baseline", help="the hand-written loop alone (timed by `compare`)")
    p.add_argument("--root", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--output", required=True, help="where the final weights go")
    p = commands.add_parser("compare", help="baseline and recipe back to back, per seed")
    p.add_argument("--root", default=str(REPO / ".data" / "cifar10-budget"))
    p.add_argument("--config", default=str(REPO / "configs" / "cifar10_budget.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-epochs", type=float, default=5.0)
    p.add_argument("--json", default=None)
    p.add_argument("--recipe-args", nargs=argparse.REMAINDER, default=[], help="further `resnet-lit fit` arguments")
    p = commands.add_parser("plot", help="accuracy against wall time from `compare` JSON files")
    p.add_argument("results", nargs="+")
    p.add_argument("--output", default=str(REPO / "docs" / "performance" / "cifar10_budget.png"))
    args = parser.parse_args()
    if args.command == "plot":
        return plot(args)
    if args.command == "prepare":
        layout = TUNING_LAYOUT if args.tuning else BENCHMARK_LAYOUT
        print(prepare(Path(args.root), REPO / ".data" / "cifar10", Path(args.tarball), layout))
        return 0
    if args.command == "baseline":
        return baseline_command(args)
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
