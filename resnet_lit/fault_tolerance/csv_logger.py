"""`ResumableCSVLogger`: a CSVLogger whose resumed runs append to `metrics.csv` instead of deleting it."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here. Keep it, and continue its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that with ``append=True`` an existing ``metrics.csv`` is continued.

    Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a folder that has one, so a run resumed
    with ``--ckpt_path`` (or even one that fails to resume) loses the history of the interrupted run. The
    resnet-lit CLI sets ``append`` when ``fit`` resumes from a checkpoint that exists. Steps logged by the
    interrupted run after its last checkpoint appear twice: first the interrupted run's rows, then the resumed
    run's, which are the ones that continue.
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
        if not self.append:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
