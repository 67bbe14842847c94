"""A study = one Hydra multirun: an MLflow parent run, its child runs, and the comparison at the end.

Registered as a Hydra callback in conf/config.yaml, so it works with every launcher: the parent run
is created in the launching process before any job starts (which also creates the store and the
experiment once: parallel first writers crash SQLite's schema creation), and its id reaches the jobs
through the environment, which local and SLURM workers inherit.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PROJECT_ROOT
from pipeline.progress import STUDY_JOBS_ENV, STUDY_STARTED_ENV, count_sweep_jobs

PARENT_RUN_ENV = "FROMLOGITS_PARENT_RUN_ID"


class StudyCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from pipeline.tracking import prepare_store, start_study, tracking_uri

        self.uri = tracking_uri(config.tracking.uri)
        self.experiment = config.tracking.experiment
        experiment_id = prepare_store(self.uri, self.experiment)
        name = config.study or "sweep"
        sweep_params = OmegaConf.select(config, "hydra.sweeper.params")
        sweep = OmegaConf.to_container(sweep_params, resolve=False) if sweep_params is not None else {}
        overrides = list(config.hydra.overrides.task)
        self.parent_run_id = start_study(self.uri, experiment_id, name, {"sweep_dir": str(config.hydra.sweep.dir)})
        MlflowClient(self.uri).log_param(self.parent_run_id, "sweep", str({**sweep, **{"overrides": overrides}}))
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        jobs = count_sweep_jobs(overrides, sweep)
        if jobs:
            os.environ[STUDY_JOBS_ENV] = str(jobs)
        os.environ[STUDY_STARTED_ENV] = f"{time.time():.3f}"
        self.started = time.monotonic()
        atexit.register(self._end_if_still_running)
        print(f"study {name}: {jobs or '?'} jobs, MLflow parent run {self.parent_run_id} ({self.uri})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from pipeline.compare import compare, print_comparison

        if not self.parent_run_id:
            return  # on_multirun_start failed; Hydra has already shown why
        compare_started = time.monotonic()
        try:
            # A named study's report goes to <reports_dir>/<study>; an ad-hoc sweep's stays in its sweep dir.
            out_dir = (Path(config.hydra.sweep.dir) / "report" if config.study is None
                       else Path(PROJECT_ROOT / config.reports_dir) / config.study)
            outcome = compare(self.uri, self.experiment, parent_run_id=self.parent_run_id, out_dir=out_dir)
        except Exception as error:
            self._end(RunStatus.FAILED)
            print(f"error: the study's comparison failed: {error}", file=sys.stderr, flush=True)
            # Hydra turns a callback's exception into a warning; a failed comparison must fail the command.
            sys.exit(1)
        MlflowClient(self.uri).log_metric(self.parent_run_id, "seconds_compare", time.monotonic() - compare_started)
        print_comparison(outcome)
        print(f"study took {time.monotonic() - self.started:.0f} s", flush=True)
        self._end(RunStatus.FINISHED)

    def _end(self, status: int) -> None:
        from pipeline.tracking import end_run

        if self.parent_run_id:
            end_run(self.uri, self.parent_run_id, status)
            os.environ.pop(PARENT_RUN_ENV, None)
            self.parent_run_id = None

    def _end_if_still_running(self) -> None:
        """The sweep was interrupted or crashed before on_multirun_end: never leave the parent RUNNING."""
        if self.parent_run_id:
            self._end(RunStatus.KILLED)
