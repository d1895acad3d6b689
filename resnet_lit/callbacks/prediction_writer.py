"""Write `predict` results to CSV: one row per image with its path, predicted class name and probability.

The rows go to a temporary file beside the output, renamed over it only when the run succeeds: a failed or
interrupted `predict` leaves an existing output file as it was.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
from collections.abc import Sequence
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from resnet_lit.errors import ResNetLitError


class PredictionOutputError(ResNetLitError):
    """The predictions file cannot be written (a folder, no permission, a full disk); the message names it."""


def printable_path(path: Any) -> str:
    """``path`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (kept by Python as lone surrogates)
    are written as ``\\xNN``, like Python's ``backslashreplace``."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name byte produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class PendingFile:
    """A text file written under a unique temporary name in the folder of ``path``, renamed over ``path`` by
    :meth:`commit`; :meth:`discard` removes it. Concurrent writers of one ``path`` never share a temporary file."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            raise PredictionOutputError(f"prediction output {path!r} is a folder; give a file name")
        folder, name = os.path.split(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            self.temp, descriptor = self._create(folder, name)
        except OSError as error:
            raise PredictionOutputError(f"cannot write predictions to {path!r}: {error.strerror or error}") from error
        self.file: IO[str] = os.fdopen(descriptor, "w", newline="", encoding="utf-8")

    @staticmethod
    def _create(folder: str, name: str) -> tuple[str, int]:
        while True:
            temp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
            with contextlib.suppress(FileExistsError):
                return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open() would

    def fail(self, error: OSError) -> PredictionOutputError:
        """Discard the temporary file; the error to raise, naming the output."""
        self.discard()
        return PredictionOutputError(
            f"cannot write predictions to {self.path!r}: {error.strerror or error}; an existing file was left as it was"
        )

    def commit(self) -> None:
        """Flush the rows to disk and rename the temporary file over ``path``."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except OSError as error:
            raise self.fail(error) from error

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is not touched."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


class PredictionCSVWriter(BasePredictionWriter):
    """Stream `predict_step` outputs to `output_path` (default `<default_root_dir>/predictions.csv`).

    Columns: `path, class, probability`, then `class_k, probability_k` for the other top-k guesses. A path that
    is not valid UTF-8 is written with its undecodable bytes as `\\xNN`. The file replaces an existing one only
    when the run succeeds. With several processes each rank writes `predictions.rank<N>.csv` beside it.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._output: PendingFile | None = None
        self._writer: Any = None
        self._header_written = False

    def resolved_path(self, trainer: L.Trainer) -> str:
        path = self.output_path or os.path.join(trainer.default_root_dir, "predictions.csv")
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext}"
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._discard()
        self._output = PendingFile(self.resolved_path(trainer))
        self._writer = csv.writer(self._output.file)
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
        assert self._output is not None, "on_predict_start opens the output"
        names, probs = prediction["class_names"], prediction["probs"].tolist()
        keys = prediction["keys"]
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        rows = []
        if not self._header_written:
            k = len(names[0]) if names else 1
            extra = [col for i in range(2, k + 1) for col in (f"class_{i}", f"probability_{i}")]
            rows.append(["path", "class", "probability", *extra])
            self._header_written = True
        for key, row_names, row_probs in zip(keys, names, probs, strict=True):
            cells = [c for pair in zip(row_names, (f"{p:.6f}" for p in row_probs), strict=True) for c in pair]
            rows.append([printable_path(key), *cells])
        try:
            self._writer.writerows(rows)
        except OSError as error:
            output, self._output = self._output, None
            raise output.fail(error) from error

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._output is not None:
            output, self._output = self._output, None
            output.commit()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._discard()

    def _discard(self) -> None:
        if self._output is not None:
            output, self._output = self._output, None
            output.discard()
