"""What a researcher sees while a run or a study trains.

On a terminal: one line rewritten in place per epoch. Elsewhere (CI logs, files, `tee`): a compact line
every few epochs, so a 100-epoch run prints about ten lines. In a study, each line also says which job
of how many is running and when the study should end; the study's callback puts its size and start
time in the environment, which every launcher's workers inherit.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

STUDY_JOBS_ENV = "FROMLOGITS_STUDY_JOBS"
STUDY_STARTED_ENV = "FROMLOGITS_STUDY_STARTED"
STUDY_WORKERS_ENV = "FROMLOGITS_STUDY_WORKERS"  # jobs the launcher runs at once


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class EpochProgress:
    """Call with (epoch, metrics) after every epoch (the run's `on_epoch_end` does)."""

    name: str
    epochs: int
    first_epoch: int = 1  # > 1 when a run resumes
    job: int | None = None  # 0-based job number in a study
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    interactive: bool | None = None

    def __post_init__(self):
        if self.interactive is None:
            self.interactive = self.stream.isatty()
        self.started = time.monotonic()
        self.every = max(1, self.epochs // 10)
        jobs = os.environ.get(STUDY_JOBS_ENV)
        self.study_jobs = int(jobs) if jobs and self.job is not None else None
        self.study_started = float(os.environ.get(STUDY_STARTED_ENV, time.time()))
        self.workers = max(1, int(os.environ.get(STUDY_WORKERS_ENV, "1")))

    def line(self, epoch: int, metrics: dict) -> str:
        elapsed = time.monotonic() - self.started
        done = epoch - self.first_epoch + 1
        left = elapsed / done * (self.epochs - epoch) if done > 0 else 0.0
        parts = []
        if self.study_jobs:
            study_elapsed = time.time() - self.study_started
            # With w workers, job j starts after about j / w job-durations: the study lasts jobs / w of them.
            job_durations = self.job // self.workers + done / max(1, self.epochs - self.first_epoch + 1)
            per_job = study_elapsed / job_durations if job_durations > 0 else 0.0
            study_left = max(0.0, per_job * self.study_jobs / self.workers - study_elapsed)
            parts.append(f"job {self.job + 1}/{self.study_jobs} (study {clock(study_elapsed)}, ~{clock(study_left)} left)")
        parts.append(f"{self.name} epoch {epoch}/{self.epochs}")
        parts.append(f"loss {metrics.get('train_epoch_loss', float('nan')):.4g}")
        if "val_nll_float64" in metrics:
            parts.append(f"val_nll {metrics['val_nll_float64']:.4g}")
        if metrics.get("val_clipped_fraction"):
            parts.append(f"clipped {metrics['val_clipped_fraction']:.1%}")
        parts.append(f"{clock(elapsed)} elapsed, ~{clock(left)} left")
        return "  ".join(parts)

    def __call__(self, epoch: int, metrics: dict) -> None:
        if self.interactive:
            end = "\n" if epoch == self.epochs else ""
            print(f"\r\033[K{self.line(epoch, metrics)}", end=end, file=self.stream, flush=True)
        elif epoch == self.first_epoch or epoch == self.epochs or epoch % self.every == 0:
            print(self.line(epoch, metrics), file=self.stream, flush=True)
