"""A CSV logger that keeps the history of a resumed run (Lightning's deletes metrics.csv)."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _KeepingWriter(ExperimentWriter):
    """Keeps the rows of an existing metrics.csv logged before ``resume_step`` (later rows were
    logged after the checkpoint being resumed and are logged again), then appends as usual."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return  # a fresh metrics.csv: nothing to delete (Lightning warns whenever the dir has files)
        if self.resume_step is None:
            super()._check_log_dir_exists()  # an old metrics.csv and no resume: Lightning's warning, file removed
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < self.resume_step]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


class CSVLogger(_CSVLogger):
    """Lightning's CSVLogger; after ``resume_from(step)`` an existing metrics.csv is continued."""

    _resume_step: int | None = None

    def resume_from(self, step: int) -> None:
        self._resume_step = int(step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment  # type: ignore[return-value]
