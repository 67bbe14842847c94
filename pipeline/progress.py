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

# When this process's jobs of each study ended (monotonic seconds), by the study's start: the pace of its
# next jobs. A worker runs many jobs in turn; the time from one job's end to the next's counts everything a
# job costs (set-up, training, evaluation, logging), whichever setting or backend it trains.
_JOB_ENDS: dict[float, list[float]] = {}
RECENT_JOBS = 10  # the pace is read over the last ones: a study's later jobs can be faster (warm caches)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class EpochProgress:
    """Call with (epoch, metrics) after every epoch (the run's `on_epoch_end` does).

    The estimates extrapolate the epochs after the first one this process trained: the first also pays
    for building and tracing, so until a second epoch is done a line gives no estimate. A job's time left
    is its remaining epochs at that rate. A study's adds, for each job not yet started, one job's duration
    (the first epoch as this one took it, the others at the rate) shared among the launcher's workers;
    with w workers, jobs up to about this one's number + w have started. Processes' start-up and the
    study's report are not counted.
    """

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
        self.first_epoch_done: float | None = None  # when this process's first epoch ended
        self.every = max(1, self.epochs // 10)
        jobs = os.environ.get(STUDY_JOBS_ENV)
        self.study_jobs = int(jobs) if jobs and self.job is not None else None
        self.study_started = float(os.environ.get(STUDY_STARTED_ENV, time.time()))
        self.workers = max(1, int(os.environ.get(STUDY_WORKERS_ENV, "1")))

    def line(self, epoch: int, metrics: dict, now: float) -> str:
        elapsed = now - self.started
        since_first = epoch - self.first_epoch
        rate = (now - self.first_epoch_done) / since_first if since_first > 0 else None  # seconds an epoch
        parts = []
        if self.study_jobs:
            study = f"study {clock(time.time() - self.study_started)}"
            if rate is not None:
                ends = _JOB_ENDS.get(self.study_started, [])[-(RECENT_JOBS + 1):]
                job_seconds = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1
                               else (self.first_epoch_done - self.started) + rate * (self.epochs - 1))
                not_started = max(0, self.study_jobs - self.job - self.workers)
                study += f", ~{clock(rate * (self.epochs - epoch) + job_seconds * not_started / self.workers)} left"
            parts.append(f"job {self.job + 1}/{self.study_jobs} ({study})")
        parts.append(f"{self.name} epoch {epoch}/{self.epochs}")
        parts.append(f"loss {metrics.get('train_epoch_loss', float('nan')):.4g}")
        if "val_nll_float64" in metrics:
            parts.append(f"val_nll {metrics['val_nll_float64']:.4g}")
        if metrics.get("val_clipped_fraction"):
            parts.append(f"clipped {metrics['val_clipped_fraction']:.1%}")
        parts.append(f"{clock(elapsed)} elapsed" + (f", ~{clock(rate * (self.epochs - epoch))} left" if rate is not None else ""))
        return "  ".join(parts)

    def __call__(self, epoch: int, metrics: dict) -> None:
        now = time.monotonic()
        if self.first_epoch_done is None:
            self.first_epoch_done = now
        if epoch == self.epochs and self.study_jobs:
            _JOB_ENDS.setdefault(self.study_started, []).append(now)
        if self.interactive:
            self.show(f"\r\033[K{self.line(epoch, metrics, now)}", end="\n" if epoch == self.epochs else "")
        elif epoch == self.first_epoch or epoch == self.epochs or epoch % self.every == 0:
            self.show(self.line(epoch, metrics, now))

    def show(self, line: str, end: str = "\n") -> None:
        try:
            print(line, end=end, file=self.stream, flush=True)
        except OSError:  # a terminal that hung up (its SIGHUP stops the run after this epoch), a full disk under
            pass  # redirected output: the run's metrics are in the store; a line not shown must not fail it
