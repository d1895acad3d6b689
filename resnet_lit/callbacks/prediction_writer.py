"""Write `predict` results to CSV: one row per image with its path, predicted class name and probability."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionCSVWriter(BasePredictionWriter):
    """Stream `predict_step` outputs to `output_path` (default `<default_root_dir>/predictions.csv`).

    Columns: `path, class, probability`, then `class_k, probability_k` for the other top-k guesses.
    With several processes each rank writes `predictions.rank<N>.csv` beside it.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file: Any = None
        self._writer: Any = None

    def resolved_path(self, trainer: L.Trainer) -> str:
        path = self.output_path or os.path.join(trainer.default_root_dir, "predictions.csv")
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext}"
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.resolved_path(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "w", newline="")  # noqa: SIM115 - closed in on_predict_end
        self._writer = csv.writer(self._file)
        self._header_written = False

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        names, probs = prediction["class_names"], prediction["probs"].tolist()
        keys = prediction["keys"]
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        if not self._header_written:
            k = len(names[0]) if names else 1
            extra = [col for i in range(2, k + 1) for col in (f"class_{i}", f"probability_{i}")]
            self._writer.writerow(["path", "class", "probability", *extra])
            self._header_written = True
        for key, row_names, row_probs in zip(keys, names, probs, strict=True):
            cells = [c for pair in zip(row_names, (f"{p:.6f}" for p in row_probs), strict=True) for c in pair]
            self._writer.writerow([key, *cells])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
