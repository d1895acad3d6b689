"""benchmarks/cifar10_budget.py (issue 16): its data layout, its hand-written baseline, and one whole comparison."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakedata import unpack_cifar_jpegs, write_image_folder
from resnet_lit.models import create_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cifar10_budget.py"


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("cifar10_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


budget = _benchmark_module()


def test_prepare_takes_the_first_files_of_each_class_for_train_and_the_next_for_held_out(tmp_path: Path) -> None:
    source = write_image_folder(tmp_path / "source", classes=("cat", "dog"), per_class=7, size=8)
    root = budget.prepare(tmp_path / "root", source, layout={"train": (0, 4), "val": (4, 6)})
    for name in ("cat", "dog"):
        assert sorted(p.name for p in (root / "train" / name).iterdir()) == [f"{i:04d}.jpg" for i in range(4)]
        assert sorted(p.name for p in (root / "val" / name).iterdir()) == ["0004.jpg", "0005.jpg"]
    assert not root.with_name("root.partial").exists()
    with pytest.raises(SystemExit, match="fewer than 9"):
        budget.prepare(tmp_path / "short", source, layout={"train": (0, 4), "val": (4, 9)})


def test_the_baseline_network_is_resnet20_with_option_a_shortcuts() -> None:
    """The hand-written network has the zoo's ResNet-20 parameter count (option A adds no parameters) and maps a
    batch to 10 logits."""
    baseline = budget.ResNet20()
    count = sum(p.numel() for p in baseline.parameters())
    assert count == sum(p.numel() for p in create_model("resnet20").parameters()) == 269_722
    assert baseline(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_baseline_augmentation_crops_32x32_windows_of_the_padded_images_and_flips_some() -> None:
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    out = budget.crop_and_flip(padded, torch.arange(64), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    flipped = 0
    for i in range(64):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32): every crop offset
        plain = (windows == out[i][:, None, None]).all(dim=(0, 3, 4)).any()
        mirrored = (windows == out[i].flip(-1)[:, None, None]).all(dim=(0, 3, 4)).any()
        assert plain or mirrored, f"image {i} is no window of its padded image"
        flipped += bool(mirrored and not plain)
    assert 16 <= flipped <= 48


@pytest.mark.slow
def test_compare_runs_both_contestants_and_scores_them_on_the_held_out_images(tmp_path: Path) -> None:
    """One seed of the whole comparison on 30 real CIFAR-10 JPEGs per class (20 train, 10 held out), each contestant
    shortened to one epoch: the JSON has both wall times, both held-out accuracies and their ratio."""
    source = unpack_cifar_jpegs(tmp_path / "source", per_class=30)
    root = budget.prepare(tmp_path / "root", source, layout={"train": (0, 20), "val": (20, 30)})
    result_path = tmp_path / "budget.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "compare", "--root", str(root), "--seeds", "0", "--baseline-epochs", "1",
         "--json", str(result_path), "--recipe-args", "--trainer.max_epochs", "1", "--data.init_args.batch_size", "32"],
        check=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    result = json.loads(result_path.read_text())
    (run,) = result["runs"]
    assert run["seed"] == 0 and run["baseline_seconds"] > 0 and run["recipe_seconds"] > 0
    assert run["wall_time_ratio"] == pytest.approx(run["recipe_seconds"] / run["baseline_seconds"])
    for name in ("baseline", "recipe"):  # 100 held-out images: accuracies are multiples of 1/100
        assert 0.0 <= run[f"{name}_accuracy"] <= 1.0
        assert round(run[f"{name}_accuracy"] * 100, 6) == round(run[f"{name}_accuracy"] * 100)
    assert result["summary"]["accuracy_gain"] == pytest.approx(run["recipe_accuracy"] - run["baseline_accuracy"])
