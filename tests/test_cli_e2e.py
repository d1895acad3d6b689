"""The real CLI end to end: quickstart training, checkpoint reload, validate/test/predict, config errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakedata import unpack_cifar_jpegs
from resnet_lit import ResNetClassifier
from resnet_lit.cli import ResNetLitCLI, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _last_metric(metrics_csv: Path, key: str) -> float:
    with open(metrics_csv) as f:
        values = [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    assert values, f"{key} never logged in {metrics_csv}"
    return values[-1]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main job, trained once for the tests of this module."""
    root = tmp_path_factory.mktemp("quickstart")
    main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(root), *QUIET])
    return root


@pytest.mark.slow
def test_quickstart_reaches_097_and_reloads_weights_only(quickstart_run: Path) -> None:
    assert _last_metric(quickstart_run / "metrics.csv", "val/acc") >= 0.99
    assert (quickstart_run / "config.yaml").is_file()
    ckpt_path = quickstart_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    assert checkpoint["hyper_parameters"]["arch"] == "resnet20"
    assert checkpoint["hyper_parameters"]["class_names"] == [str(i) for i in range(10)]
    model = ResNetClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    assert model.hparams.in_channels == 1 and model.hparams.num_classes == 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_reproduce_the_metric(quickstart_run: Path, stage: str) -> None:
    ckpt = str(quickstart_run / "checkpoints" / "last.ckpt")
    root = quickstart_run / f"{stage}-run"
    cli = ResNetLitCLI(args=[stage, "--config", QUICKSTART, "--ckpt_path", ckpt,
                             "--trainer.default_root_dir", str(root), *QUIET])  # fmt: skip
    if stage == "validate":
        # last.ckpt is written after the final validation, so validating it gives the same number.
        expected = _last_metric(quickstart_run / "metrics.csv", "val/acc")
        assert cli.trainer.callback_metrics["val/acc"].item() == pytest.approx(expected, abs=1e-6)
    else:
        assert cli.trainer.callback_metrics["test/acc"].item() >= 0.95
        assert "test/acc_top5" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_predict_writes_csv_with_class_names(quickstart_run: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"digit{i:02d}_label{digits.target[i]}.png")
    output = tmp_path / "predictions.csv"
    main(["predict", "--config", QUICKSTART, "--ckpt_path", str(quickstart_run / "checkpoints" / "last.ckpt"),
          "--data.init_args.predict_dir", str(images), "--prediction_writer.output_path", str(output),
          "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET])  # fmt: skip
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert {"path", "class", "probability"} <= set(rows[0])
    correct = sum(Path(r["path"]).stem.split("label")[1] == r["class"] for r in rows)
    assert correct >= 17, rows
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_validate_in_the_run_folder_keeps_the_training_history(quickstart_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    before = (run / "metrics.csv").read_text().splitlines()
    main(["validate", "--config", QUICKSTART, "--ckpt_path", "last", "--trainer.default_root_dir", str(run), *QUIET])
    after = (run / "metrics.csv").read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert _last_metric(run / "metrics.csv", "val/acc") == _last_metric(quickstart_run / "metrics.csv", "val/acc")


@pytest.mark.slow
def test_onnx_export_of_the_quickstart_agrees_with_predict(quickstart_run: Path, tmp_path: Path) -> None:
    """The quickstart's checkpoint as ONNX: onnxruntime and `resnet-lit predict`, reading the same PNG files with the
    preprocessing the ONNX file records, give the same class for every image. Its model card states the run."""
    import onnxruntime
    from sklearn.datasets import load_digits

    from resnet_lit.export.preprocess import preprocess_batch

    output = tmp_path / "export" / "digits.onnx"
    main(["export", "--config", QUICKSTART, "--ckpt_path", "last", "--trainer.default_root_dir", str(quickstart_run),
          "--output", str(output), *QUIET])  # fmt: skip
    digits = load_digits()
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(digits.images):
        Image.fromarray((image * (255 / 16)).round().astype(np.uint8), mode="L").save(images / f"{i:04d}.png")
    predictions = tmp_path / "predictions.csv"
    main(["predict", "--config", QUICKSTART, "--ckpt_path", str(quickstart_run / "checkpoints" / "last.ckpt"),
          "--data.init_args.predict_dir", str(images), "--prediction_writer.output_path", str(predictions),
          "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET])  # fmt: skip
    with open(predictions) as f:
        predicted = {Path(row["path"]).name: row["class"] for row in csv.DictReader(f)}

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    metadata = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    assert metadata["preprocessing"]["resize"] == [8, 8] and metadata["preprocessing"]["color"] == "L"
    names = sorted(os.listdir(images))
    batch = preprocess_batch([images / name for name in names], metadata["preprocessing"])
    logits = session.run(None, {"images": batch})[0]
    onnx_classes = [metadata["class_names"][i] for i in logits.argmax(1)]
    assert len(predicted) == len(names) == 1797
    disagreements = [name for name, cls in zip(names, onnx_classes, strict=True) if predicted[name] != cls]
    assert disagreements == []
    assert sum(cls == str(t) for cls, t in zip(onnx_classes, digits.target, strict=True)) / len(names) >= 0.95

    card = (tmp_path / "export" / "digits.onnx.md").read_text()
    val_acc = _last_metric(quickstart_run / "metrics.csv", "val/acc")
    parameters = sum(p.numel() for p in ResNetClassifier.load_from_checkpoint(
        quickstart_run / "checkpoints" / "last.ckpt", weights_only=True).net.parameters())  # fmt: skip
    assert "`resnet20`" in card and f"{parameters:,}" in card and f"{val_acc:.4f}" in card


def test_subprocess_entry_point_trains_and_writes_the_run_layout(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lit", "fit", "--config", QUICKSTART, "--trainer.max_epochs", "1",
         "--trainer.default_root_dir", str(tmp_path), *QUIET],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "metrics.csv").is_file()


def test_ckpt_path_last_resumes_from_the_fixed_checkpoint_folder(tmp_path: Path) -> None:
    args = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), *QUIET]
    main([*args, "--trainer.max_epochs", "1", "--ckpt_path", "last"])  # nothing to resume yet: starts fresh
    steps_per_epoch = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    cli = ResNetLitCLI(args=[*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2
    assert cli.trainer.global_step == 2 * steps_per_epoch  # one more epoch, not two


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model.arhc", "resnet20"], "model.arhc"),
        (["--trainer.max_epochs", "many"], "trainer.max_epochs"),
        (["--model.label_smoothing", "-0.5"], "model.label_smoothing"),
        (["--model.scheduler_interval", "hourly"], "model.scheduler_interval"),
    ],
)
def test_bad_keys_and_types_exit_non_zero_naming_the_key(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args])
    assert exit_info.value.code not in (0, None)
    assert needle in capsys.readouterr().err


def test_unknown_key_in_yaml_and_malformed_yaml_name_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(QUICKSTART).read_text().replace("max_epochs:", "max_epoch:"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(typo)])
    assert exit_info.value.code not in (0, None)
    assert "max_epoch" in capsys.readouterr().err

    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1,\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(broken)])
    assert exit_info.value.code not in (0, None)
    assert "broken.yaml" in str(exit_info.value.code) + capsys.readouterr().err


def test_unknown_architecture_suggests_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.arch", "resnet2O", "--trainer.fast_dev_run", "true"])
    assert exit_info.value.code not in (0, None)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert "resnet20" in message


def test_unknown_block_option_is_one_line_naming_the_block_and_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.net.block_args", "{reductoin: 8}", "--trainer.fast_dev_run",
              "true", "--trainer.default_root_dir", str(tmp_path), *QUIET])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: block ") and "\n" not in message, message
    assert "'basic'" in message and "reductoin" in message and "valid options" in message
    assert "Traceback" not in capsys.readouterr().err


def test_config_errors_wrapped_by_jsonargparse_are_unwrapped() -> None:
    from resnet_lit.cli import _user_error
    from resnet_lit.models.errors import ModelConfigError

    cause = ModelConfigError("block 'se' has no option(s) x")
    wrapped = ValueError("Does not validate against any of the Union subtypes")  # what jsonargparse raises
    wrapped.__cause__ = cause
    assert _user_error(wrapped) is cause
    assert _user_error(ValueError("unrelated")) is None


def test_training_commands_do_not_import_the_benchmarks() -> None:
    check = ("import sys, resnet_lit.cli, resnet_lit.training_cli; "
             "print(sorted(m for m in sys.modules if m.startswith('resnet_lit.bench')))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_imagefolder_on_real_cifar10_jpegs_beats_chance(tmp_path: Path) -> None:
    root = unpack_cifar_jpegs(tmp_path / "cifar", per_class=250)
    cli = ResNetLitCLI(
        args=[
            "fit", "--config", QUICKSTART,
            "--data", "resnet_lit.data.ImageFolderDataModule",
            "--data.root", str(root), "--data.transform_style", "cifar", "--data.image_size", "32",
            "--data.val_fraction", "0.2", "--data.batch_size", "64",
            "--model.arch", "resnet20", "--model.net.strides", "[1, 2, 2]",
            "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET,
        ]
    )  # fmt: skip
    assert cli.datamodule.num_classes == 10
    assert cli.trainer.callback_metrics["val/acc"].item() >= 0.30  # chance is 0.10
