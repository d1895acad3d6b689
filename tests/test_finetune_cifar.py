"""Fine-tuning beats training from scratch on real images: a ResNet-20 pretrained on five CIFAR-10 classes and
fine-tuned on 500 images of the other five is more accurate on 1,000 held-out images of those five than the same
network trained on the same 500 images from a random start. Uses the shared real CIFAR-10 JPEGs; skipped without
them."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from fakedata import CIFAR10_CLASSES, SHARED_CIFAR_JPEGS
from resnet_lit.training_cli import ResNetLitCLI

PRETRAIN_CLASSES = CIFAR10_CLASSES[:5]  # airplane ... deer: class indices 0-4
FINETUNE_CLASSES = CIFAR10_CLASSES[5:]  # dog ... truck: 5-9
PRETRAIN_PER_CLASS, FINETUNE_PER_CLASS, HELD_OUT_PER_CLASS = 500, 100, 200


def unpack_split_subsets(dest: Path) -> tuple[Path, Path]:
    """`dest/pretrain/train/` (500 images of each of classes 0-4) and `dest/finetune/{train,val}/` (100 and 200
    other images of each of classes 5-9), from the first images of each class in the archive."""
    if not SHARED_CIFAR_JPEGS.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {SHARED_CIFAR_JPEGS} (CI provides ../shared/data)")
    wanted = {name: PRETRAIN_PER_CLASS for name in PRETRAIN_CLASSES}
    wanted.update({name: FINETUNE_PER_CLASS + HELD_OUT_PER_CLASS for name in FINETUNE_CLASSES})
    taken = dict.fromkeys(wanted, 0)
    with tarfile.open(SHARED_CIFAR_JPEGS) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train" or parts[-2] not in wanted:
                continue
            label = parts[-2]
            if taken[label] == wanted[label]:
                continue
            if label in PRETRAIN_CLASSES:
                target = dest / "pretrain" / "train" / label / parts[-1]
            else:
                split = "train" if taken[label] < FINETUNE_PER_CLASS else "val"
                target = dest / "finetune" / split / label / parts[-1]
            taken[label] += 1
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if taken == wanted:
                break
    assert taken == wanted, f"the archive holds fewer images than the test needs: {taken}"
    return dest / "pretrain", dest / "finetune"


def fit(root: Path, run_dir: Path, *extra: str) -> ResNetLitCLI:
    """Three epochs of ResNet-20 at batch 50 with a fixed seed (SGD, warmup + cosine), CIFAR-style augmentation."""
    return ResNetLitCLI(
        args=[
            "fit",
            "--seed_everything", "0",
            "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "3",
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--model.arch", "resnet20",
            "--model.optimizer", "torch.optim.SGD",
            "--model.optimizer.lr", "0.1",
            "--model.optimizer.momentum", "0.9",
            "--model.optimizer.weight_decay", "5e-4",
            "--model.lr_scheduler", "resnet_lit.optim.WarmupCosineLR",
            "--model.lr_scheduler.warmup_steps", "0.1",
            "--data", "resnet_lit.data.ImageFolderDataModule",
            "--data.root", str(root),
            "--data.transform_style", "cifar",
            "--data.image_size", "32",
            "--data.batch_size", "50",
            "--data.val_fraction", "0.0",
            "--data.loader", "device",  # decoded once, cropped and flipped per batch: the fastest path here
            *extra,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch_on_real_images(tmp_path: Path) -> None:
    pretrain_root, finetune_root = unpack_split_subsets(tmp_path / "data")
    pretrained = fit(pretrain_root, tmp_path / "pretrain")
    checkpoint = tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    assert pretrained.trainer.state.finished and checkpoint.is_file()

    finetuned = fit(finetune_root, tmp_path / "finetuned", "--model.init_from", str(checkpoint),
                    "--model.reinit_head", "true")  # fmt: skip
    scratch = fit(finetune_root, tmp_path / "scratch")
    assert finetuned.datamodule.class_names == scratch.datamodule.class_names == FINETUNE_CLASSES
    assert len(finetuned.datamodule.splits().train) == 500 and len(finetuned.datamodule.splits().val) == 1000

    finetuned_acc = float(finetuned.trainer.callback_metrics["val/acc"])
    scratch_acc = float(scratch.trainer.callback_metrics["val/acc"])
    assert finetuned_acc >= scratch_acc + 0.03, f"fine-tuned {finetuned_acc:.3f}, from scratch {scratch_acc:.3f}"
