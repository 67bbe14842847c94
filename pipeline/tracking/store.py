"""Where the MLflow store is and whether it can be used, and runs whose process died (pipeline/processes.py).

The default store is SQLite inside `mlruns/` (MLflow 3's file store raises), with artifacts beside it in
`mlruns/artifacts`. `MLFLOW_TRACKING_URI` (or `tracking.uri`) points runs elsewhere, e.g. at a shared
`mlflow server` (with `basic-auth`, credentials come from `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`).
`prepare_store` checks the store, creates the experiment and ends stale runs, failing in one line.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import STORE_URI, PipelineError, TrackingConfig, first_line, shared_project_root
from pipeline.files import folder_lock
from pipeline.processes import named_on_this_host, process_gone
from pipeline.record import Tag


class TrackingUnavailable(PipelineError):
    """The MLflow store cannot be reached, read or written."""


# The codes of MLflow's answer to a request naming a run it has not, or will not take (deleted): the store answered.
NO_SUCH_RUN = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")

# What becomes of a run this process could not end (`mark_stale_runs`, run by every command's `prepare_store`).
LEFT_FOR_NEXT_COMMAND = "the next command on this store, on this machine, marks it FAILED"


def default_tracking_uri() -> str:
    return f"sqlite:///{shared_project_root() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    """The store's URI: `configured` (tracking.uri), else $MLFLOW_TRACKING_URI, else the local store. The variable
    set but empty (`MLFLOW_TRACKING_URI=$SERVER`, SERVER unset) is refused: it meant the local store, unsaid."""
    if configured:
        return configured
    from_environment = os.environ.get("MLFLOW_TRACKING_URI")
    if from_environment is not None and not from_environment.strip():
        raise TrackingUnavailable(f"MLFLOW_TRACKING_URI={from_environment!r} is not accepted: it is set but empty; "
                                  f"expected {STORE_URI}, or the variable unset for the local store in mlruns/")
    return from_environment or default_tracking_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_database(uri: str) -> Path | None:
    """The database file a local store's URI (sqlite:///<path>) names; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str) -> str | None:
    """Artifacts of the local store live beside its database; a server chooses its own."""
    database = sqlite_database(uri)
    return None if database is None else (database.parent / "artifacts").as_uri()


def bound_requests(tracking: TrackingConfig) -> None:
    """Every request to a tracking server gives up after `timeout_seconds`, with one quick retry:
    MLflow's defaults (120 s, 7 retries with doubling back-off) hang a run for minutes on a dead server."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, tracking.timeout_seconds)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def not_answering(error: BaseException) -> bool:
    """An MLflow request to a tracking server that got no answer: it timed out, could not connect, or met only
    errors of the server's (MLflow's REST client raises an MlflowException caused by requests' exception)."""
    import requests

    unanswered = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    chain = [error, error.__cause__, error.__context__]
    return any(isinstance(e, unanswered) for e in chain if e is not None)


@contextlib.contextmanager
def one_quick_request() -> Iterator[None]:
    """Requests inside give up after 1 s, untried again: the last word to a server a run has given up on (each
    request to a hung server otherwise waits out `timeout_seconds` twice)."""
    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_server(uri: str, timeout: float) -> None:
    """A server that does not answer, or refuses our credentials, fails now in one line."""
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None and password is not None:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise TrackingUnavailable(
                f"tracking server {uri} refused the request (HTTP {error.code}): credentials missing or wrong; "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        if error.code == 404:
            return  # no Default experiment (deleted): the server answers, which is what we check
        raise TrackingUnavailable(f"tracking server {uri} answered HTTP {error.code}; check its log") from None
    except (OSError, ValueError) as error:
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({getattr(error, 'reason', error)}); start it, fix "
            "MLFLOW_TRACKING_URI / tracking.uri, or unset them to use the local store in mlruns/") from None


def _check_local_store(uri: str) -> None:
    database = sqlite_database(uri)
    if database is not None:
        if not database.is_absolute():  # MLflow cannot name the artifacts beside it: it failed once both were made
            raise TrackingUnavailable(f"tracking URI {uri!r} is not accepted: its database path {str(database)!r} "
                                      "is relative; expected an absolute one, sqlite:////<folder>/mlflow.db (four "
                                      "slashes)")
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
            probe = database.parent / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise TrackingUnavailable(f"the MLflow store folder {database.parent} is not writable "
                                      f"({error.strerror}); fix it or set MLFLOW_TRACKING_URI elsewhere") from None
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise TrackingUnavailable(f"tracking URI {uri!r} is not accepted: MLflow 3's file store is deprecated; "
                                  "expected sqlite:///<path>/mlflow.db, http(s)://<server> or a database URI")


def prepare_store(uri: str, experiment: str, tracking: TrackingConfig | None = None) -> str:
    """Creates the store and the experiment once (parallel first writers race on both), marks runs
    left RUNNING by dead processes as FAILED; returns the experiment id. Fails in one line when the
    store cannot be used."""
    tracking = tracking or TrackingConfig(experiment=experiment)
    bound_requests(tracking)
    if is_server(uri):
        _check_server(uri, tracking.timeout_seconds)
    else:
        _check_local_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _creating(uri):
            client = MlflowClient(uri)
            experiment_id = _experiment_id(client, uri, experiment)
        mark_stale_runs(client, experiment_id)
    except MlflowException as error:
        raise TrackingUnavailable(f"the MLflow store {uri} cannot be used: {first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - a damaged database, a missing driver: one line, not a traceback
        raise TrackingUnavailable(f"the MLflow store {uri} cannot be opened: {type(error).__name__}: "
                                  f"{first_line(error)}") from None
    return experiment_id


def _creating(uri: str):
    """A local store's folder, locked while a process creates or checks the store: two commands on a new
    store at once would both run MLflow's schema migrations on it, and one would fail."""
    database = sqlite_database(uri)
    return contextlib.nullcontext() if database is None else folder_lock(database.parent)


def _experiment_id(client: MlflowClient, uri: str, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingUnavailable(f"tracking.experiment={experiment!r} is deleted in {uri}; restore it in the "
                                  "MLflow UI, or choose another name")
    if found is not None:
        return found.experiment_id
    try:
        # The kind tag makes MLflow 3's UI open on its training-runs view rather than GenAI traces.
        return client.create_experiment(experiment, artifact_location=_artifact_location(uri),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:
        return client.get_experiment_by_name(experiment).experiment_id  # another process created it first


# --- runs whose process died ------------------------------------------------------------------------


def _end_orphan(client: MlflowClient, run, status: str, reason: str) -> bool:
    """Ends a run whose process is gone, unless that process ended it itself; a FAILED one is tagged why.
    Returns whether it ended the run.

    The run was listed RUNNING before its process was found gone, and in between the process may have
    ended it (KILLED, after a stop) and exited. Read again now that the process is gone, the status is final.
    """
    if client.get_run(run.info.run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
        return False
    if status == RunStatus.to_string(RunStatus.FAILED):
        client.set_tag(run.info.run_id, Tag.FAILED_REASON, reason)
    client.set_terminated(run.info.run_id, status)
    return True


def mark_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Runs of this host still RUNNING whose process is gone (SIGKILL, power loss) end FAILED, tagged why."""
    stale = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        # Another machine's run is skipped: its liveness cannot be checked from here.
        if named_on_this_host(run.data.tags) and process_gone(run.data.tags):
            tags = run.data.tags
            if _end_orphan(client, run, RunStatus.to_string(RunStatus.FAILED),
                           f"stale: process {tags['pid']} on {tags['host']} ended without closing the run"):
                stale.append(run.info.run_id)
    if stale:
        print(f"marked {len(stale)} stale RUNNING run(s) FAILED: {', '.join(stale)}", flush=True)
    return stale


def end_orphaned_children(uri: str, parent_run_id: str, error: BaseException, wait_seconds: float = 15.0) -> list[str]:
    """A study's child runs still RUNNING on this host end once their process is gone: KILLED when the
    study was interrupted, FAILED (tagged why) when its launcher failed, e.g. the OS killed a worker.

    A job may be gone before it closed its run (killed, or stopped at once by a second Ctrl-C while its
    store was busy); its checkpoint is intact, so either status resumes with the same command.
    Waits up to `wait_seconds` for jobs that are still stopping; returns the runs it ended.
    """
    from pipeline.tracking.runs import end_status  # runs.py imports this module

    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{Tag.PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    deadline = time.monotonic() + wait_seconds
    while True:
        running = [r for r in client.search_runs([experiment_id], query, max_results=1000)
                   if named_on_this_host(r.data.tags)]
        orphans = [r for r in running if process_gone(r.data.tags)]
        if len(orphans) == len(running) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    ended = []
    for run in orphans:
        reason = f"process {run.data.tags['pid']} ended without closing the run ({first_line(error)})"
        if _end_orphan(client, run, end_status(error), reason):
            ended.append(run.info.run_id)
    return ended


def resumable(uri: str, run_id: str) -> bool:
    """Whether a checkpoint's run can be continued: it exists, is not deleted, and ended KILLED or FAILED."""
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False  # deleted for good, or from another store
    return run.info.lifecycle_stage == "active" and run.info.status in ("KILLED", "FAILED")
