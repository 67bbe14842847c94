"""Running one configuration: fetch -> train -> evaluate, logged into one MLflow run, resumable.

`run_configuration` is what `python -m pipeline.run` does for each job (resume policy included). The
stage functions it calls — `log_inputs`, `train_into_run`, `evaluate_into_run` — log into the active
MLflow run; the DVC entry point (pipeline/dvc_stages.py) calls them too, one stage per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.entities import Metric, RunTag

from pipeline.config import Config, first_line
from pipeline.data import Splits, fetch, load
from pipeline.files import exclusive, write_json
from pipeline.models import Classifier
from pipeline.progress import EpochProgress
from pipeline.record import MODEL_NAME, DatasetRef, RunRecord, Tag, changed_provenance, run_record
from pipeline.tracking import (MetricBuffer, discard_unfinished_models, has_finished_model, last_logged_steps,
                               logged_models, out_of_space, prepare_store, resumable, tracked_run, tracking_uri,
                               unlogged)
from pipeline.interrupt import interruptible
from pipeline.train import Checkpoint, TrainResult, configure_determinism, train

# --- one configuration, end to end ----------------------------------------------------------------------


def checkpoint_folder(cfg: Config, record: RunRecord) -> Path:
    """Where a configuration's checkpoint lives: keyed by what is trained and where it is recorded."""
    return Path(cfg.checkpoints_dir) / record.tags[Tag.CONFIG_DIGEST][:16]


def previous_attempt(uri: str, folder: Path) -> str | None:
    """The run an interrupted attempt of this configuration left (KILLED or FAILED), if it can go on."""
    marker, state = folder / "run.json", folder / "state.npz"
    if not (marker.exists() and state.exists()):
        return None
    try:
        run_id = json.loads(marker.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # damaged outside the pipeline, which writes it whole
        print(f"discarding the checkpoint in {folder}: its run.json cannot be read ({first_line(error)})", flush=True)
        return None
    if resumable(uri, run_id):
        return run_id
    print(f"discarding the checkpoint in {folder}: its run {run_id} was deleted or cannot be continued",
          flush=True)
    return None


def finished_in_attempt(uri: str, experiment_id: str, attempt_run_id: str, record: RunRecord):
    """The FINISHED run of this configuration among the children of a study's earlier attempt, if any."""
    from mlflow.tracking import MlflowClient

    digest = record.tags[Tag.CONFIG_DIGEST]
    query = (f"tags.`{Tag.PARENT}` = '{attempt_run_id}' and tags.{Tag.CONFIG_DIGEST} = '{digest}' "
             "and attributes.status = 'FINISHED'")
    found = MlflowClient(uri).search_runs([experiment_id], query, max_results=1)
    return found[0] if found else None


def run_configuration(cfg: Config, output_dir: Path, parent_run_id: str | None = None, job: int | None = None,
                      model_path: Path | None = None, interrupted_attempt: str | None = None) -> dict:
    """fetch -> train -> evaluate for one configuration, in one MLflow run; returns the run's id
    (`run_id`) and its test metrics.

    An interrupted run (SIGINT/SIGTERM/SIGHUP) ends KILLED with a checkpoint of its last persisted epoch;
    running the same configuration again continues it in the same MLflow run (unless `resume=false`).
    A run this configuration FINISHED in the study's `interrupted_attempt` (its parent run) is kept, not
    trained again: it moves under `parent_run_id`. Two identical commands at once never share a checkpoint
    or a kept run: the second trains from scratch in a folder of its own. `model_path`: also save the
    trained Keras model there (DVC's output).
    """
    clock = StageClock()
    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment, cfg.tracking)
    with clock("data"):
        dataset = fetch(cfg.dataset, cfg.data_dir, cfg.allow_download)
        splits = load(cfg.dataset, cfg.data_dir)
    configure_determinism()
    record = run_record(cfg, dataset)

    folder = checkpoint_folder(cfg, record)
    with exclusive(folder.with_name(f"{folder.name}.lock")) as owned:
        if not owned:
            folder = folder.with_name(f"{folder.name}-pid{os.getpid()}")
            print(f"another process is running this configuration; this one trains on its own ({folder})", flush=True)
        kept = (finished_in_attempt(uri, experiment_id, interrupted_attempt, record)
                if interrupted_attempt and parent_run_id and cfg.resume and owned else None)
        if kept:  # moved under this attempt while this process holds the configuration: no one else moves it
            mlflow.MlflowClient(uri).set_tag(kept.info.run_id, Tag.PARENT, parent_run_id)
            metrics = {k: v for k, v in kept.data.metrics.items() if k.startswith("test_")}
            write_json(output_dir / "metrics.json", {"run_id": kept.info.run_id, **metrics})
            print(f"kept run {kept.info.run_id} ({record.name}): it finished in the study's unfinished attempt",
                  flush=True)
            return {"run_id": kept.info.run_id, **metrics}
        resume_id = previous_attempt(uri, folder) if cfg.resume and owned else None
        checkpoint = Checkpoint(folder / "state.npz")
        unreadable = checkpoint.unreadable() if resume_id else None
        if not resume_id or unreadable:  # an unreadable one: its run trains again from the first epoch
            checkpoint.remove()
        with tracked_run(uri, experiment_id, record.name, record.tags, parent_run_id=parent_run_id,
                         run_id=resume_id) as run:
            run_id = run.info.run_id
            write_json(folder / "run.json", {"run_id": run_id})
            if resume_id:  # its params and inputs were logged by the first attempt
                changed = changed_provenance(run.data.tags, record.tags)  # the run's tags as this attempt found them
                print(f"resuming run {resume_id} " + (
                    f"from its first epoch: its checkpoint {checkpoint.path} cannot be read ({unreadable}); the epochs "
                    "it stored are trained again, not sent again" if unreadable else f"from its checkpoint ({folder})") + (
                    f"; its earlier epochs were made with another {', '.join(changed)} (its {Tag.EARLIER_PROVENANCE} "
                    "tag keeps them)" if changed else ""), flush=True)
            else:
                with clock("logging"):
                    log_inputs(cfg, record, dataset, splits)
            first_epoch = checkpoint.epoch() + 1 if checkpoint.exists() else 1
            # What an earlier attempt stored: its process may have died after a write its checkpoint
            # does not know of (an epoch's metrics, the evaluation, the model); none is written twice.
            logged = last_logged_steps(mlflow.MlflowClient(), run_id) if resume_id else {}
            progress = EpochProgress(record.name, cfg.train.epochs, first_epoch=first_epoch, job=job)
            with clock("train"):
                result = interruptible(lambda: train_into_run(cfg, run_id, splits, checkpoint, progress, logged))
            metrics = evaluate_into_run(result.classifier, splits, clock, logged)
            if model_path:
                model_path.parent.mkdir(parents=True, exist_ok=True)
                result.classifier.model.save(model_path)
            write_json(output_dir / "metrics.json", {"run_id": run_id, **metrics})
            clock.log(logged)
        shutil.rmtree(folder, ignore_errors=True)  # finished: nothing to resume
    print(summary_line(run_id, record.name, result, metrics), flush=True)
    return {"run_id": run_id, **metrics}


# --- the stages, each logging into the active run -------------------------------------------------------


def log_inputs(cfg: Config, record: RunRecord, dataset: DatasetRef, splits: Splits) -> None:
    """The run's params (the typed config, flattened), its config file, and its dataset as an MLflow input."""
    from omegaconf import OmegaConf

    sizes = {"split.train_examples": len(splits.x_train), "split.val_examples": len(splits.x_val),
             "split.test_examples": len(splits.x_test)}
    mlflow.log_params({**record.params, **sizes})
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), "config.yaml")  # typed, unlike the params
    digest = dataset.checksum or hashlib.sha256(splits.x_train.tobytes() + splits.y_train.tobytes()).hexdigest()
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    # Named explicitly: from a bare file URI MLflow would warn that two source types could match.
    source = get_dataset_source_from_json(json.dumps({"uri": Path(dataset.data_dir, dataset.name, dataset.version).as_uri()}),
                                          "local")
    data = mlflow.data.from_numpy(splits.x_train, targets=splits.y_train, name=dataset.name, digest=digest[:8],
                                  source=source)
    tags = {"version": dataset.version, "sha256": digest, **{k.split(".")[1]: str(v) for k, v in sizes.items()}}
    for attempt in range(3):
        try:
            mlflow.log_input(data, context="training", tags=tags)
            return
        except Exception as error:  # an MlflowException or SQLAlchemy's IntegrityError, by store
            # Parallel jobs' first log_input of one dataset race to create its row (SQLite: UNIQUE constraint
            # failed); the loser finds the row on the next try.
            if "UNIQUE constraint" not in str(error) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def train_into_run(cfg: Config, run_id: str, splits: Splits, checkpoint: Checkpoint | None = None,
                   progress: Callable[[int, dict], None] | None = None, logged: dict[str, int] | None = None
                   ) -> TrainResult:
    """Trains, sending per-epoch metrics to run `run_id` in batches; a checkpoint is saved only after a
    batch is persisted. Steps already `logged` (`last_logged_steps`: a resumed run's store may have got
    further than its checkpoint) are not sent again, so each epoch is logged exactly once."""
    client = mlflow.MlflowClient()
    metrics_log = MetricBuffer(client, run_id, flush_seconds=cfg.tracking.flush_seconds,
                               give_up_seconds=cfg.tracking.give_up_seconds, logged=logged)

    def on_epoch_end(epoch: int, metrics: dict, stopping: bool) -> bool:
        metrics_log.log(metrics, step=epoch)
        if progress:
            progress(epoch, metrics)
        if metrics_log.due() or stopping or epoch == cfg.train.epochs:
            metrics_log.flush()
            return True
        return False

    try:
        result = train(cfg, splits, on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    finally:
        with contextlib.suppress(Exception):
            metrics_log.flush()  # a diverged or failed run keeps the epochs it finished
    now = int(time.time() * 1000)
    totals = {"probe_loss": result.probe_loss, "epochs_completed": float(result.epochs_completed)}
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in unlogged(totals, 0, logged).items()],
        tags=[RunTag(Tag.EFFECTIVE_FROM_LOGITS, str(result.effective_from_logits).lower()),
              RunTag(Tag.OUTPUT_DTYPE, result.output_dtype), RunTag(Tag.DIVERGED, str(result.diverged).lower())],
    )
    return result


def log_model(clf: Classifier, x_example) -> str:
    """Logs the probability-returning model with a signature; returns its model URI."""
    import keras
    import tensorflow as tf
    from mlflow.models import infer_signature

    served = clf.served_model()
    signature = infer_signature(x_example, keras.ops.convert_to_numpy(served(x_example)))  # not predict(): no tf.data graph
    # Stated, not inferred: MLflow's inference re-imports the model in a subprocess (~5 s per run).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    backend = keras.config.backend()
    if backend != "tensorflow":  # where the model is to run on the backend it was trained on
        from importlib.metadata import version

        requirements.append(f"{'jax[cpu]' if backend == 'jax' else backend}=={version(backend)}")
    return mlflow.tensorflow.log_model(served, name=MODEL_NAME, signature=signature, pip_requirements=requirements).model_uri


class StageClock:
    """Wall time per stage of a run, logged as `seconds_<stage>` (benchmarks/ reads them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def log(self, logged: dict[str, int] | None = None) -> None:
        """Logs the times, but those an earlier attempt of the run already `logged`."""
        mlflow.log_metrics(unlogged({f"seconds_{stage}": value for stage, value in self.seconds.items()}, 0, logged))


def evaluate_into_run(clf: Classifier, splits: Splits, clock: StageClock | None = None,
                      logged: dict[str, int] | None = None) -> dict[str, float]:
    """Evaluates on the test split and logs the metrics, the reliability table and the model into the
    active run, but what an earlier attempt of the run already `logged`."""
    from pipeline.evaluate import evaluate

    clock = clock or StageClock()
    with clock("evaluate"):
        metrics, reliability = evaluate(clf, splits.x_test, splits.y_test)
    with clock("logging"):
        new = unlogged(metrics, 0, logged)
        mlflow.log_metrics(new)
        mlflow.log_dict(reliability, "reliability.json")  # the same file again, if it was there
        client, run = mlflow.MlflowClient(), mlflow.active_run()
        # A resumed run: an earlier attempt may have logged the model, or died logging it (left unfinished).
        earlier = logged_models(client, run, MODEL_NAME) if logged else []
        # The model is logged after the test metrics: only an attempt that stored those may have logged it.
        if "test_nll" in new or not has_finished_model(earlier):
            for model_id in discard_unfinished_models(client, earlier):  # the one logged next stays alone
                client.delete_logged_model(model_id)
            try:
                log_model(clf, splits.x_test[:5])
            except Exception as error:
                if out_of_space(error):  # its half-written files hold the room the run needs to end FAILED
                    discard_unfinished_models(client, logged_models(client, run, MODEL_NAME))
                raise
    return metrics


def summary_line(run_id: str, name: str, result: TrainResult, metrics: dict[str, float]) -> str:
    return (f"run {run_id} ({name}, effective_from_logits={str(result.effective_from_logits).lower()}"
            f"{', DIVERGED' if result.diverged else ''}): test_accuracy {metrics['test_accuracy']:.4f}  "
            f"test_nll {metrics['test_nll']:.4f}  test_ece {metrics['test_ece']:.4f}  test_brier {metrics['test_brier']:.4f}")


def record_job_failure(dcfg, parent_run_id: str | None, overrides: str, error: BaseException) -> None:
    """Says that a sweep job failed and, if it failed before its run opened, puts it on record, so the
    study's report names it."""
    import sys

    print(f"job failed: {error}", file=sys.stderr, flush=True)
    from pipeline.config import ConfigError, validate
    from pipeline.record import identity_tags
    from pipeline.tracking import record_failed_job
    from pipeline.tracking.runs import recorded_by

    if recorded_by(error):
        return  # tracked_run already ended the job's own run FAILED with the error
    try:
        cfg = validate(dcfg)
    except ConfigError:
        return  # the pre-check rejects such values before a sweep starts; nothing sensible to record
    uri = tracking_uri(cfg.tracking.uri)
    tags = identity_tags(cfg) | ({Tag.PARENT: parent_run_id} if parent_run_id else {})
    record_failed_job(uri, prepare_store(uri, cfg.tracking.experiment, cfg.tracking), f"failed: {overrides}", tags, error)
