"""`PerClassReport`: per-class precision/recall/F1 and the confusion matrix of validate and test, as files.

Everything is derived from the module's confusion matrix, whose counts are summed over all processes, so the
files are the same on 1 and N processes. Rank 0 writes them atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

CONFUSION_CORNER = "true/predicted"


class PerClassReport(Callback):
    """Writes `<stage>_per_class.csv`, `<stage>_confusion_matrix.csv` and (with matplotlib)
    `<stage>_confusion_matrix.png` into `trainer.default_root_dir`, for stage `val` and `test`.

    Fit-time validation overwrites the `val_*` CSV files every epoch (not in the sanity check) and draws the PNG of
    the last one when the fit ends (drawing it every epoch cost a quarter of the quickstart's wall time). Needs a
    module with `confusion_matrix(stage)` (`ResNetClassifier`); other modules are left alone. A file that cannot be
    written gives a warning, not a failed run: the metrics are logged anyway.

    Args:
        plot: also draw the confusion matrix as a PNG (skipped with one warning when matplotlib is missing).
    """

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self._warned_no_matplotlib = False
        self._pending_plot: tuple[Path, list[list[int]], list[str]] | None = None  # the fit's last validation

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_plot is not None:
            self._plot(*self._pending_plot)
            self._pending_plot = None

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        confusion_matrix: Callable[[str], Tensor] | None = getattr(pl_module, "confusion_matrix", None)
        if confusion_matrix is None:
            return
        counts = confusion_matrix(stage)  # a collective under DDP: on every rank
        if not trainer.is_global_zero:
            return
        matrix: list[list[int]] = counts.cpu().tolist()
        if sum(map(sum, matrix)) == 0:
            return
        names = class_names(pl_module, len(matrix))
        root = Path(trainer.default_root_dir)
        _write_text(root / f"{stage}_per_class.csv", per_class_csv(matrix, names))
        _write_text(root / f"{stage}_confusion_matrix.csv", confusion_csv(matrix, names))
        if not self.plot:
            return
        plot = (root / f"{stage}_confusion_matrix.png", matrix, names)
        if trainer.state.fn == TrainerFn.FITTING:
            self._pending_plot = plot
        else:
            self._plot(*plot)

    def _plot(self, path: Path, matrix: list[list[int]], names: list[str]) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not self._warned_no_matplotlib:
                self._warned_no_matplotlib = True
                rank_zero_warn(
                    f"resnet-lit: matplotlib is not installed, so {path.name} is not drawn (the CSV files are "
                    "written); install it with `pip install resnet-lit[plots]`"
                )
            return
        _write_atomically(path, lambda f: plot_confusion_matrix(matrix, names, f))


def class_names(pl_module: pl.LightningModule, num_classes: int) -> list[str]:
    """The module's `class_names`, or the class indices when it has none that fit."""
    names = getattr(pl_module, "class_names", None)
    return [str(n) for n in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def per_class_metrics(matrix: list[list[int]]) -> list[tuple[float, float, float, int]]:
    """(precision, recall, F1, support) per class; 0 where a ratio is 0/0, as scikit-learn's default."""
    rows = []
    for c, row in enumerate(matrix):
        tp, support = row[c], sum(row)
        predicted = sum(r[c] for r in matrix)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1_denominator = predicted + support  # 2 tp + fp + fn
        f1 = 2 * tp / f1_denominator if f1_denominator else 0.0
        rows.append((precision, recall, f1, support))
    return rows


def per_class_csv(matrix: list[list[int]], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for name, (precision, recall, f1, support) in zip(names, per_class_metrics(matrix), strict=True):
        writer.writerow([name, f"{precision:.6f}", f"{recall:.6f}", f"{f1:.6f}", support])
    return out.getvalue()


def confusion_csv(matrix: list[list[int]], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([CONFUSION_CORNER, *names])
    for name, row in zip(names, matrix, strict=True):
        writer.writerow([name, *row])
    return out.getvalue()


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], f: IO[bytes]) -> None:
    """Draws the counts with class names on both axes (counts written in the cells up to 30 classes)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    n = len(matrix)
    size = min(4 + 0.4 * n, 40)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        peak = max(map(max, matrix)) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=100)


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda f: f.write(text.encode()))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write` into a temporary file next to `path`, then rename it: readers never see half a file. On an
    OSError (read-only or full disk) the temporary file is removed and a warning names `path`."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        rank_zero_warn(f"resnet-lit: could not write {path}: {err.strerror or err}")
