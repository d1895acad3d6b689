"""Per-class results: `<stage>/acc_macro`, the per-class CSV and the confusion matrix (CSV and PNG)."""

from __future__ import annotations

import csv
import errno
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from sklearn.metrics import precision_recall_fscore_support
from test_sync_audit import no_host_reads
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from resnet_lit import ResNetClassifier
from resnet_lit.callbacks import PerClassReport
from resnet_lit.callbacks import per_class_report as report_module
from resnet_lit.cli import ResNetLitCLI, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
REPORT = ["--trainer.callbacks+=resnet_lit.callbacks.PerClassReport"]
TINY = ["--config", QUICKSTART, "--trainer.precision", "32-true", "--model.net.layers", "[1, 1, 1]", *QUIET, *REPORT]


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a ResNet-8 on the digits: a checkpoint far enough from chance to have varied classes."""
    root = tmp_path_factory.mktemp("per_class_fit")
    main(["fit", *TINY, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root)])
    return root


def test_fit_time_validation_writes_the_val_files(tiny_fit: Path) -> None:
    header, *rows = _read_csv(tiny_fit / "val_confusion_matrix.csv")
    assert header == ["true/predicted", *[str(i) for i in range(10)]]
    assert [row[0] for row in rows] == [str(i) for i in range(10)]
    assert sum(int(v) for row in rows for v in row[1:]) == 270  # 15% of the 1,797 digits, each counted once
    assert (tiny_fit / "val_per_class.csv").is_file() and (tiny_fit / "val_confusion_matrix.png").is_file()
    assert not list(tiny_fit.glob(".*.tmp")), "no temporary file left behind"


def test_test_writes_files_that_agree_with_the_logged_accuracy_and_sklearn(tiny_fit: Path, tmp_path: Path) -> None:
    cli = ResNetLitCLI(args=["test", *TINY, "--ckpt_path", str(tiny_fit / "checkpoints" / "last.ckpt"),
                             "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    logged = {k: v.item() for k, v in cli.trainer.callback_metrics.items()}
    header, *rows = _read_csv(tmp_path / "test_confusion_matrix.csv")
    matrix = np.array([[int(v) for v in row[1:]] for row in rows])
    assert 0.2 < logged["test/acc"] < 1.0, "a model this far from trivial makes the comparison meaningful"
    assert np.trace(matrix) / matrix.sum() == pytest.approx(logged["test/acc"], abs=1e-6)
    with open(tmp_path / "test_confusion_matrix.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The same predictions, made here: sklearn's per-class numbers and the macro accuracy (mean recall).
    model, datamodule = cli.model.eval(), cli.datamodule
    preds, targets = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, labels = datamodule.on_after_batch_transfer(batch, 0)
            preds.append(model(images).argmax(dim=1))
            targets.append(labels)
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    np.testing.assert_array_equal(matrix, np.bincount(y_true * 10 + y_pred, minlength=100).reshape(10, 10))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(10)), zero_division=0
    )
    header, *rows = _read_csv(tmp_path / "test_per_class.csv")
    assert header == ["class", "precision", "recall", "f1", "support"]
    got = np.array([[float(v) for v in row[1:]] for row in rows])
    np.testing.assert_allclose(got[:, :3], np.stack([precision, recall, f1], axis=1), atol=1e-6)
    np.testing.assert_array_equal(got[:, 3], support)
    assert logged["test/acc_macro"] == pytest.approx(recall[support > 0].mean(), abs=1e-6)


def test_class_names_head_the_files_and_missing_matplotlib_skips_the_png_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ResNetClassifier(num_classes=3, class_names=["cat", "dog", "emu"])
    model.test_confusion.update(torch.eye(3)[[0, 1, 1, 2]], torch.tensor([0, 1, 2, 2]))
    trainer = _FakeTrainer(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    callback = PerClassReport()
    with pytest.warns(UserWarning, match="matplotlib is not installed") as warnings:
        callback.on_test_epoch_end(trainer, model)  # type: ignore[arg-type]
        callback.on_test_epoch_end(trainer, model)  # type: ignore[arg-type]
    assert len([w for w in warnings if "matplotlib" in str(w.message)]) == 1
    assert _read_csv(tmp_path / "test_confusion_matrix.csv") == [
        ["true/predicted", "cat", "dog", "emu"], ["cat", "1", "0", "0"], ["dog", "0", "1", "0"], ["emu", "0", "1", "1"]
    ]  # fmt: skip
    assert _read_csv(tmp_path / "test_per_class.csv")[1:] == [
        ["cat", "1.000000", "1.000000", "1.000000", "1"],
        ["dog", "0.500000", "1.000000", "0.666667", "1"],
        ["emu", "1.000000", "0.500000", "0.666667", "2"],
    ]
    assert not (tmp_path / "test_confusion_matrix.png").exists()


def test_sanity_check_writes_nothing_and_a_read_only_folder_warns_without_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ResNetClassifier(num_classes=2)
    model.val_confusion.update(torch.eye(2), torch.tensor([0, 1]))
    trainer = _FakeTrainer(tmp_path, sanity_checking=True)
    PerClassReport(plot=False).on_validation_epoch_end(trainer, model)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(report_module.os, "replace", refuse)
    trainer.sanity_checking = False
    with pytest.warns(UserWarning, match=f"could not write {tmp_path / 'val_per_class.csv'}: Permission denied"):
        PerClassReport(plot=False).on_validation_epoch_end(trainer, model)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [], "the temporary files are removed"


def test_evaluation_updates_never_read_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.bincount reads the maximum on the host on CUDA")

    model = ResNetClassifier(num_classes=10)
    logits, targets = torch.randn(40, 10), torch.randint(0, 10, (40,))
    monkeypatch.setattr(torch, "bincount", refuse)
    with no_host_reads():
        model.val_metrics.update(logits, targets)  # acc_macro included
        model.val_confusion.update(logits, targets)
    monkeypatch.undo()
    reference = MulticlassAccuracy(10, average="macro")
    reference.update(logits, targets)
    assert model.val_metrics["acc_macro"].compute() == reference.compute()
    assert torch.equal(model.val_confusion.compute(), MulticlassConfusionMatrix(10)(logits, targets))


class _FakeTrainer:
    """What `PerClassReport` reads of a Trainer."""

    def __init__(self, root: Path, sanity_checking: bool = False) -> None:
        self.default_root_dir, self.sanity_checking, self.is_global_zero = str(root), sanity_checking, True
        self.state = types.SimpleNamespace(fn=TrainerFn.TESTING)
