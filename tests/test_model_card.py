"""The model card `resnet-lit export` writes beside the artefact: the final metrics of a (resumed) run's
metrics.csv, and a card that names the network, its input, its classes and its evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resnet_lit import create_model
from resnet_lit.export.model_card import (
    ModelCardInputs,
    ModelCardWriteError,
    final_metrics,
    read_final_metrics,
    render_model_card,
    write_model_card,
)
from resnet_lit.fault_tolerance import ResumableCSVLogger
from resnet_lit.models import summarize

CIFAR_PREPROCESSING = {
    "color": "RGB",
    "resize": 36,
    "resize_mode": "shorter_side",
    "center_crop": 32,
    "interpolation": "bilinear",
    "antialias": True,
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.247, 0.2435, 0.2616],
    "normalization": "inside the model: do not subtract mean or divide by std yourself",
}


def log_run(folder: Path, rows: list[tuple[int, dict[str, float]]], append: bool) -> None:
    """Log `(step, metrics)` rows through the CSV logger the CLI uses, as one run (resumed when `append`)."""
    logger = ResumableCSVLogger(save_dir=str(folder), name="", version="", append=append)
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.save()


def card_inputs(**changes: object) -> ModelCardInputs:
    fields: dict[str, object] = {
        "title": "resnet20.onnx",
        "arch": "resnet20",
        "num_classes": 10,
        "in_channels": 3,
        "image_size": 32,
        "format": "onnx",
        "artefact": "exports/resnet20.onnx",
        "created": "2025-01-01T00:00:00+00:00",
        "resnet_lit_version": "0.1.0",
        "torch_version": "2.0",
        "class_names": [f"class_{i}" for i in range(10)],
        "preprocessing": CIFAR_PREPROCESSING,
        "input_spec": {"name": "images", "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0]},
    }
    fields.update(changes)
    return ModelCardInputs(**fields)  # type: ignore[arg-type]


def test_final_metrics_of_a_resumed_run_are_the_last_logged(tmp_path: Path) -> None:
    # The interrupted run validated epochs 0-2, but its last checkpoint was at epoch 1: the resumed run logs
    # epoch 2 again (a new column too, so the file's header is rewritten), and its rows are the ones that count.
    log_run(tmp_path, [
        (9, {"epoch": 0, "train/loss": 2.0}),
        (9, {"epoch": 0, "val/acc": 0.40, "val/loss": 1.5}),
        (19, {"epoch": 1, "val/acc": 0.60, "val/loss": 1.1}),
        (29, {"epoch": 2, "val/acc": 0.95, "val/loss": 0.3}),
    ], append=False)  # fmt: skip
    log_run(tmp_path, [
        (29, {"epoch": 2, "val/acc": 0.80, "val/loss": 0.7, "val/acc_top5": 0.99}),
        (29, {"epoch": 2, "test/acc": 0.77, "test/loss": 0.8}),
        (35, {"epoch": 3, "train/loss": 0.6}),
    ], append=True)  # fmt: skip

    metrics = final_metrics(tmp_path / "metrics.csv")

    assert metrics == {
        "val/acc": 0.80,
        "val/acc_top5": 0.99,
        "val/loss": 0.7,
        "test/acc": 0.77,
        "test/loss": 0.8,
        "epoch": 2,
        "step": 29,
    }
    assert isinstance(metrics["epoch"], int) and isinstance(metrics["step"], int)


def test_final_metrics_follow_a_second_header(tmp_path: Path) -> None:
    # A run appended under columns of its own (another column order): its rows are read by its header.
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc\n"
        "0,9,2.0,\n"
        "0,9,,0.5\n"
        "epoch,step,test/acc,val/acc,val/loss\n"
        "1,19,,0.75,0.9\n"
        "1,19,0.7,,\n"
    )
    assert final_metrics(tmp_path / "metrics.csv") == {
        "val/acc": 0.75,
        "val/loss": 0.9,
        "test/acc": 0.7,
        "epoch": 1,
        "step": 19,
    }


def test_final_metrics_never_fail(tmp_path: Path) -> None:
    missing = read_final_metrics(tmp_path / "metrics.csv")
    assert missing.metrics == {} and missing.note == f"no metrics.csv found at {tmp_path / 'metrics.csv'}"

    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\xff\xfe\x00binary")
    assert read_final_metrics(garbage).metrics == {}
    assert read_final_metrics(garbage).note.startswith(f"could not read {garbage}")

    prose = tmp_path / "prose.csv"
    prose.write_text("not, a metrics file\n1,2\n")
    assert read_final_metrics(prose).metrics == {}
    assert "no 'step' column" in read_final_metrics(prose).note

    train_only = tmp_path / "train_only.csv"
    train_only.write_text("epoch,step,train/loss\n0,9,2.0\n")
    assert read_final_metrics(train_only).metrics == {}
    assert read_final_metrics(train_only).note == f"{train_only} has no val/* or test/* values"

    damaged = tmp_path / "damaged.csv"
    damaged.write_text("epoch,step,val/acc\n0,9,0.5\n1,19,0.7x\n")
    reading = read_final_metrics(damaged)
    assert reading.metrics == {"val/acc": 0.5, "epoch": 0, "step": 9}
    assert reading.note == f"1 unreadable value in {damaged} skipped"


def test_card_names_architecture_input_classes_and_accuracy(tmp_path: Path) -> None:
    net = create_model("resnet20")
    parameters = sum(p.numel() for p in net.parameters())
    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc,val/loss\n9,999,0.99634,0.0123\n")
    card = render_model_card(
        card_inputs(
            summary_rows=summarize(net, 32, 3),
            metrics=final_metrics(tmp_path / "metrics.csv"),
            data={"class_path": "resnet_lit.data.CIFAR10DataModule", "init_args": {"root": "data/cifar10"}},
            ema=True,
            parity={"max_abs_diff": 2e-6, "relative_diff": 3e-7, "tolerance": 1e-5, "source": "8 val images"},
        )
    )

    summary = card.split("\n\n")[2]
    assert summary.startswith(
        f"`resnet20` (ResNet, {parameters / 1e6:.2f} M ({parameters:,}) parameters, 40.6 M MACs at 3x32x32), "
        "a classifier of 10 classes, trained on `CIFAR10DataModule` (root `data/cifar10`), "
        "reaching val/acc 0.9963 (epoch 9, step 999)."
    ), summary
    assert parameters == 269_722 and f"| **total** |  | **{parameters:,}** | **40,551,040** |" in card
    assert "| val/acc | 0.9963 |" in card and "| val/loss | 0.0123 |" in card
    assert "| 0 | class_0 |" in card and "| 9 | class_9 |" in card
    steps = [
        "1. Decode the image file",
        "2. Convert it to RGB",
        "3. Resize it so that its shorter side is 36 pixels, keeping the aspect ratio (bilinear interpolation with "
        "antialiasing).",
        "4. Crop the central 32 x 32 pixels.",
        "5. Convert the pixels to float32 and scale them to [0, 1] (divide by 255).",
        "6. Arrange them as NCHW",
        "7. Do not normalise: the network subtracts the mean and divides by the std itself; for reference, "
        "mean [0.4914, 0.4822, 0.4465], std [0.247, 0.2435, 0.2616].",
    ]
    positions = [card.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "- weights: the exponential moving average (EMA) of the training weights" in card
    assert "- parity with the PyTorch network: passed: max |difference| 2e-06" in card


def test_card_steps_follow_the_preprocessing() -> None:
    digits = {"color": "L", "resize": [8, 8], "resize_mode": "exact", "center_crop": None, "mean": [0.5], "std": [0.25]}
    card = render_model_card(
        card_inputs(
            in_channels=1,
            image_size=8,
            format="safetensors",
            preprocessing={**digits, "normalization": "inside the model: do not subtract mean or divide by std"},
            parity={"relative_diff": 1e-3, "tolerance": 1e-5},
        )
    )
    assert "2. Convert it to L (8-bit grayscale, one channel)." in card
    assert "3. Resize it to exactly 8 x 8 pixels (height x width, bilinear interpolation with antialiasing)." in card
    assert "Crop the central" not in card
    # safetensors holds the bare network's weights: the deployer normalises, whatever the sentence says
    assert "Normalise each channel: (x - mean) / std, with mean [0.5], std [0.25]." in card
    assert "net = resnet_lit.create_model('resnet20', num_classes=10, in_channels=1).eval()" in card
    assert "parity with the PyTorch network: FAILED" in card
    onnx = render_model_card(card_inputs(preprocessing={**digits, "normalization_in_model": False}))
    assert "Normalise each channel" in onnx


def test_card_without_metrics_csv_says_so(tmp_path: Path) -> None:
    reading = read_final_metrics(tmp_path / "metrics.csv")
    card = render_model_card(card_inputs(metrics=reading.metrics, metrics_note=reading.note))
    evaluation = card[card.index("## Evaluation") : card.index("## Export")]
    assert f"No metrics recorded: no metrics.csv found at {tmp_path / 'metrics.csv'}." in evaluation
    assert "No accuracy was recorded for these weights." in card
    assert "No metrics recorded." in render_model_card(card_inputs())


def test_more_than_50_classes_are_truncated() -> None:
    names = [f"species_{i:03d}" for i in range(120)]
    card = render_model_card(card_inputs(num_classes=120, class_names=names))
    assert "| 49 | species_049 |" in card
    assert "species_050" not in card
    assert "... and 70 more (indices 50 to 119), not listed here." in card


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = tmp_path / "resnet20.onnx.md"
    card.write_text("old card\n")
    write_model_card(card, card_inputs())
    assert card.read_text() == render_model_card(card_inputs())
    assert os.listdir(tmp_path) == [card.name]

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ModelCardWriteError, match=f"cannot write the model card {card}: No space left on device"):
        write_model_card(card, card_inputs(title="new"))
    assert card.read_text() == render_model_card(card_inputs())
    assert os.listdir(tmp_path) == [card.name]
