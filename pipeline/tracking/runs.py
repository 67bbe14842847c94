"""The life of a run and of a study, and its per-epoch metrics sent in batches.

A run or study is never left RUNNING by this process: one rule (`end_status`) ends it FINISHED,
FAILED (exception) or KILLED (interruption), for the Hydra entry point and the DVC stages alike.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.interrupt import Interrupted, caused_by_stop, stop_requested
from pipeline.record import STUDY_ROLE, Tag, resumed_provenance
from pipeline.config import PipelineError, first_line
from pipeline.files import WriteError
from pipeline.processes import process_tags
from pipeline.tracking.store import (LEFT_FOR_NEXT_COMMAND, NO_SUCH_RUN, TrackingUnavailable, is_server,
                                     not_answering, one_quick_request)


def end_status(error: BaseException | None) -> str:
    """FINISHED without an error, KILLED for an interruption (`caused_by_stop`), FAILED for anything else."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if caused_by_stop(error):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:5000]


@contextlib.contextmanager
def tracked_run(uri: str, experiment_id: str, run_name: str | None = None, tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run (new, or `run_id` resumed) that ends as `end_status` says, never RUNNING."""
    mlflow.set_tracking_uri(uri)
    tags = {**(tags or {}), **process_tags()}
    if parent_run_id:
        tags[Tag.PARENT] = parent_run_id
    if run_id:
        run = mlflow.start_run(run_id=run_id)
        earlier = resumed_provenance(run.data.tags, tags)  # the tags below are this attempt's
        if earlier:
            tags[Tag.EARLIER_PROVENANCE] = earlier
        mlflow.set_tags(tags)
        client = MlflowClient(uri)
        for stale_tag in (Tag.FAILED_REASON, Tag.ERROR):  # the earlier attempt's failure is history now
            with contextlib.suppress(MlflowException):
                client.delete_tag(run_id, stale_tag)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    try:
        yield run
    except BaseException as raised:
        # A server that did not answer, or was given up on, gets no error tag and one quick request to end the
        # run: each request to a server that hangs waits out its timeout again.
        away = server_away(uri, raised)
        if not caused_by_stop(raised):
            if not away:
                with contextlib.suppress(Exception):
                    mlflow.set_tag(Tag.ERROR, describe(raised))
            on_record(raised, run.info.run_id)
        try:
            with one_quick_request() if away else contextlib.nullcontext():
                mlflow.end_run(end_status(raised))
            ended = ""
        except Exception:  # noqa: BLE001 - the store is why the run failed; the next command ends it
            ended = f"; the run could not be ended either: {LEFT_FOR_NEXT_COMMAND}"
        if away:
            said = str(raised) if isinstance(raised, StoreNotAnswering) else (
                f"the tracking store did not answer ({first_line(raised)}); {CHECKPOINT_KEPT}")
            raise on_record(StoreNotAnswering(f"{said}{ended}"), run.info.run_id) from None
        if out_of_space(raised) and not isinstance(raised, WriteError):  # a file of ours names itself
            raise on_record(TrackingUnavailable(
                f"the MLflow store {uri} is out of space ({first_line(raised)}); free space there and run the same "
                f"command again (an interrupted run's checkpoint is kept){ended}"), run.info.run_id) from None
        raise
    try:
        mlflow.end_run(end_status(None))
    except Exception as error:
        if not server_away(uri, error):
            raise
        raise on_record(StoreNotAnswering(f"the tracking store did not answer as the run ended ({first_line(error)}); "
                                          f"{CHECKPOINT_KEPT}; the run could not be ended: {LEFT_FOR_NEXT_COMMAND}"),
                        run.info.run_id) from None


def server_away(uri: str, error: BaseException) -> bool:
    """`error` says that the tracking server at `uri` did not answer, or was given up on (`StoreNotAnswering`)."""
    return is_server(uri) and (isinstance(error, StoreNotAnswering) or not_answering(error))


def on_record(error: BaseException, run_id: str) -> BaseException:
    """`error`, marked as on record in run `run_id` (ended by it): a sweep then opens no FAILED run of its own for it."""
    error.mlflow_run_id = run_id
    return error


def recorded_by(error: BaseException) -> str | None:
    """The run that recorded `error` (`on_record`), if one did."""
    return getattr(error, "mlflow_run_id", None)


def out_of_space(error: BaseException) -> bool:
    """A full disk under the store, as SQLite or the filesystem reports it (also when wrapped by MLflow)."""
    chain = [error, error.__cause__, error.__context__]
    return any(getattr(e, "errno", None) == errno.ENOSPC or "database or disk is full" in str(e)
               or "No space left on device" in str(e) for e in chain if e is not None)


def record_failed_job(uri: str, experiment_id: str, run_name: str, tags: dict[str, str], error: BaseException) -> str:
    """A FAILED run for a sweep job that failed before its run was opened (missing data, a bad class)."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, Tag.ERROR: describe(error)})
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return run.info.run_id


class Study:
    """A study's parent run (tag role=study); its children carry its id as mlflow.parentRunId.

    `open` creates it, `close(error)` ends it by `end_status`; as a context manager (DVC) the error is
    whatever left the block, and the Hydra callback calls both itself.
    """

    def __init__(self, uri: str, experiment_id: str, name: str, tags: dict[str, str] | None = None):
        self.uri, self.experiment_id, self.name, self.tags = uri, experiment_id, name, tags or {}
        self.run_id: str | None = None

    def open(self) -> str:
        run = MlflowClient(self.uri).create_run(
            self.experiment_id, run_name=f"study-{self.name}",
            tags={Tag.ROLE: STUDY_ROLE, Tag.STUDY: self.name, **process_tags(), **self.tags})
        self.run_id = run.info.run_id
        return self.run_id

    def close(self, error: BaseException | None = None) -> None:
        if self.run_id:
            with contextlib.suppress(Exception) if error is not None else contextlib.nullcontext():
                MlflowClient(self.uri).set_terminated(self.run_id, end_status(error))
            self.run_id = None

    def __enter__(self) -> "Study":
        self.open()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)


# --- metrics, batched ----------------------------------------------------------------------------------


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each metric the store holds for run `run_id` (what an earlier attempt logged)."""
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def unlogged(metrics: dict[str, float], step: int, logged: dict[str, int] | None) -> dict[str, float]:
    """The `metrics` of `step` that the store lacks, given its `last_logged_steps` (None: a new run)."""
    logged = logged or {}
    return {key: value for key, value in metrics.items() if key not in logged or step > logged[key]}


def logged_models(client: MlflowClient, run: Run, name: str) -> list:
    """`run`'s models named `name`, whatever their status."""
    return client.search_logged_models([run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'")


def discard_unfinished_models(client: MlflowClient, models: list) -> list[str]:
    """Removes the files of those of `models` (`logged_models`) whose logging did not finish (not READY), where
    they are local, and marks them FAILED: a model write that filled the disk would otherwise keep the space the
    run then needs to end FAILED. Only a model's own folder (named after its id) is touched. Returns their ids."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.utils.file_utils import local_file_uri_to_path

    unfinished = [model for model in models if model.status != LoggedModelStatus.READY]
    for model in unfinished:
        if model.artifact_location.startswith("file:"):
            files = Path(local_file_uri_to_path(model.artifact_location))
            if files.parent.name == model.model_id:
                shutil.rmtree(files.parent, ignore_errors=True)
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return [model.model_id for model in unfinished]


def has_finished_model(models: list) -> bool:
    """Whether one of `models` (`logged_models`) finished its logging (READY; a writer that died midway leaves
    it PENDING)."""
    from mlflow.entities import LoggedModelStatus

    return any(model.status == LoggedModelStatus.READY for model in models)


class RunDeleted(PipelineError):
    """The run this process logs to was deleted (the MLflow UI's Delete) or removed (`mlflow gc`): no retry helps."""


def raise_if_deleted(client: MlflowClient, run_id: str, error: Exception) -> None:
    """Raises RunDeleted if `error`, from logging to `run_id`, came from that run being deleted or removed; the
    store answered, so the error is a client error (MLflow refuses a deleted run's metrics as an invalid value)."""
    if not (isinstance(error, MlflowException) and error.error_code in NO_SUCH_RUN):
        return
    try:
        deleted = client.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException as lookup:
        deleted = lookup.error_code == "RESOURCE_DOES_NOT_EXIST"
    except Exception:  # noqa: BLE001 - the store went away meanwhile: left to the retries
        deleted = False
    if deleted:
        raise RunDeleted(f"run {run_id} was deleted from the MLflow store while this command logged to it (in the "
                         f"MLflow UI?); nothing more can be logged to it: restore it (mlflow runs restore --run-id "
                         f"{run_id}) and run the same command again") from None


class StoreNotAnswering(TrackingUnavailable):
    """The store did not answer a run's request, or refused its metrics for `give_up_seconds` (`MetricBuffer.flush`)."""


CHECKPOINT_KEPT = "the run's checkpoint is kept: run the same command again when the store is back"


class MetricBuffer:
    """Collects per-epoch metrics and sends them in batches (SQLite logging costs ~65 ms a call).

    A failed send keeps the metrics and is retried at the next flush; once the store has failed for
    `give_up_seconds` in a row, from the start of the first failed request, `flush` raises StoreNotAnswering.

    `logged`: the last step of each metric already in the store (`last_logged_steps`), for a resumed run;
    those steps are not sent again. A process can die after a batch is stored and before the checkpoint of
    its last epoch is written; the resumed run trains those epochs again from the checkpoint before, and
    the store keeps each step once.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_seconds: float = 5.0, give_up_seconds: float = 45.0,
                 logged: dict[str, int] | None = None):
        self.client, self.run_id = client, run_id
        self.flush_seconds, self.give_up_seconds = flush_seconds, give_up_seconds
        self.logged = logged
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.failing_since: float | None = None
        self.gave_up: StoreNotAnswering | None = None  # once given up on, the store is not waited for again

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in unlogged(metrics, step, self.logged).items()]

    def due(self) -> bool:
        return time.monotonic() - self.last_flush >= self.flush_seconds

    def flush(self) -> None:
        """Sends every pending metric, retrying with back-off until `give_up_seconds` have passed."""
        if self.gave_up is not None:
            raise self.gave_up
        delay = 1.0
        while self.pending:
            try:
                while self.pending:
                    # A request to a server that hangs fails only after its timeout: the window opens when it was sent.
                    sent = time.monotonic()
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])  # at most 1000 a call
                    self.pending = self.pending[1000:]
                self.failing_since = None
            except Exception as error:  # noqa: BLE001 - any failure to reach the store is retried, then reported
                if stop_requested.is_set():  # asked to stop while the store is away: do not wait for it
                    raise Interrupted(f"stopped while the tracking store was unreachable ({first_line(error)})") from None
                raise_if_deleted(self.client, self.run_id, error)
                self.failing_since = self.failing_since or sent
                waited = time.monotonic() - self.failing_since
                if waited >= self.give_up_seconds:
                    self.gave_up = StoreNotAnswering(
                        f"the tracking store did not accept metrics for {waited:.0f} s ({first_line(error)}); "
                        f"{CHECKPOINT_KEPT}")
                    raise self.gave_up from None
                time.sleep(min(delay, self.give_up_seconds - waited))
                delay *= 2
        self.last_flush = time.monotonic()
