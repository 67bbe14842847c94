"""MLflow plumbing: where the store is, one run's lifecycle, batched metric logging.

The default store is SQLite inside `mlruns/` (MLflow 3's file store raises), with artifacts beside it in
`mlruns/artifacts`. `MLFLOW_TRACKING_URI` (or `tracking.uri`) points runs elsewhere, e.g. at a shared
`mlflow server`. A run is never left RUNNING by this process: an exception ends it FAILED, an
interruption ends it KILLED.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import psutil
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PROJECT_ROOT, PipelineError, shared_project_root


def default_tracking_uri() -> str:
    return f"sqlite:///{shared_project_root() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _artifact_location(uri: str) -> str | None:
    """Artifacts of the local store live beside its database; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


class TrackingUnavailable(PipelineError):
    """The MLflow store cannot be reached or written."""


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails now, not after MLflow's minutes of retries."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except (OSError, ValueError) as error:
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({getattr(error, 'reason', error)}); start it, fix "
            "MLFLOW_TRACKING_URI / tracking.uri, or unset them to use the local store in mlruns/"
        ) from None


def prepare_store(uri: str, experiment: str) -> str:
    """Creates the store and the experiment once (parallel first writers race on both), marks runs
    left RUNNING by dead processes as FAILED; returns the experiment id."""
    if uri.startswith(("http://", "https://")):
        _check_reachable(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise TrackingUnavailable(f"the MLflow store folder {folder} is not writable ({error.strerror}); "
                                      "fix its permissions or set MLFLOW_TRACKING_URI elsewhere") from None
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            # The kind tag makes MLflow 3's UI open on its training-runs view rather than GenAI traces.
            experiment_id = client.create_experiment(experiment, artifact_location=_artifact_location(uri),
                                                     tags={"mlflow.experimentKind": "custom_model_development"})
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and our create.
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = found.experiment_id
    mark_stale_runs(client, experiment_id)
    return experiment_id


def process_tags() -> dict[str, str]:
    """Who runs a run: lets a later invocation tell a live run from one whose process was killed."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": str(me.pid), "pid_started": f"{me.create_time():.3f}"}


def _process_alive(pid: str, started: str) -> bool:
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0  # same pid, same process
    except (psutil.Error, ValueError):
        return False


def mark_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Runs of this host still RUNNING whose process is gone (SIGKILL, power loss) end FAILED, tagged why."""
    stale = []
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        tags = run.data.tags
        if tags.get("host") != socket.gethostname() or "pid" not in tags:
            continue  # another machine's run: its liveness cannot be checked from here
        if not _process_alive(tags["pid"], tags.get("pid_started", "0")):
            client.set_tag(run.info.run_id, "failed_reason", f"stale: process {tags['pid']} on {tags['host']} ended without closing the run")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            stale.append(run.info.run_id)
    if stale:
        print(f"marked {len(stale)} stale RUNNING run(s) FAILED: {', '.join(stale)}", flush=True)
    return stale


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, string values."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def git_state() -> dict[str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)

    commit = git("rev-parse", "HEAD")
    if commit.returncode != 0:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return {"git_commit": commit.stdout.strip(), "git_dirty": str(dirty).lower()}


class MetricBuffer:
    """Collects per-epoch metrics and sends them in batches (SQLite logging costs ~65 ms a call)."""

    def __init__(self, client: MlflowClient, run_id: str, flush_seconds: float = 5.0):
        self.client, self.run_id, self.flush_seconds = client, run_id, flush_seconds
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []
        self.last_flush = time.monotonic()


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:5000]


def record_failed_job(uri: str, experiment_id: str, run_name: str, tags: dict[str, str], error: BaseException) -> str:
    """A FAILED run for a sweep job that failed before its run was opened (bad value, missing data)."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, "error": describe(error)})
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return run.info.run_id


def start_study(uri: str, experiment_id: str, study: str, tags: dict[str, str] | None = None) -> str:
    """Creates a study's parent run (tag role=study); its children carry its id as mlflow.parentRunId."""
    run = MlflowClient(uri).create_run(experiment_id, run_name=f"study-{study}",
                                       tags={"role": "study", "study": study, **process_tags(), **(tags or {})})
    return run.info.run_id


def end_run(uri: str, run_id: str, status: int = RunStatus.FINISHED) -> None:
    MlflowClient(uri).set_terminated(run_id, RunStatus.to_string(status))


@contextlib.contextmanager
def tracked_run(
    uri: str, experiment_id: str, run_name: str | None = None, tags: dict[str, str] | None = None,
    parent_run_id: str | None = None, run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run (new, or `run_id` resumed) that ends FINISHED, FAILED (exception) or KILLED
    (interrupt), never RUNNING."""
    mlflow.set_tracking_uri(uri)
    tags = {**(tags or {}), **process_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if run_id:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(tags)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    except BaseException as error:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", describe(error))
        error.mlflow_run_id = run.info.run_id  # lets a sweep know the failure is on record
        raise
    finally:
        mlflow.end_run(status)
