"""`ResumableCSVLogger`: a CSVLogger whose resumed runs append to `metrics.csv` instead of deleting it."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_warn


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here. Keep it, and continue its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class _ReplacingExperimentWriter(ExperimentWriter):
    """Replaces an existing metrics.csv, as Lightning's writer does, but only at the first save: the writer is
    created before the callbacks' `setup`, where the run-folder lock is taken, and a run refused there must
    leave the folder's files alone."""

    def _check_log_dir_exists(self) -> None:
        self._replace = True

    def save(self) -> None:
        if self.metrics and self._replace:
            self._replace = False
            if self._fs.isfile(self.metrics_file_path):
                rank_zero_warn(f"resnet-lit: replacing {self.metrics_file_path}, the metrics of an earlier run")
                self._fs.rm_file(self.metrics_file_path)
        super().save()


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that with ``append=True`` an existing ``metrics.csv`` is continued.

    Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a folder that has one, so a run resumed
    with ``--ckpt_path`` (or even one that fails to resume) loses the history of the interrupted run. The
    resnet-lit CLI sets ``append`` when ``fit`` resumes from a checkpoint that exists. Steps logged by the
    interrupted run after its last checkpoint appear twice: first the interrupted run's rows, then the resumed
    run's, which are the ones that continue. Without ``append`` an existing file is replaced when the first
    metrics are saved, not when the logger starts (a run that fails before logging anything keeps it).
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        append: bool = False,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        writer = _AppendingExperimentWriter if self.append else _ReplacingExperimentWriter
        self._experiment = writer(log_dir=self.log_dir)
        return self._experiment
