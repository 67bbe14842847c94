"""The pipeline's stages, each logging into the active MLflow run.

`pipeline.run` (Hydra, one configuration) and `pipeline.dvc_stages` (DVC, one stage per process) both
call these; they differ only in how they obtain the config and open the runs.

    fetch     TFDS download_and_prepare (pipeline/data.py)
    train     log_inputs + train_into_run: params, tags, per-epoch metrics and diagnostics
    evaluate  evaluate_into_run: test metrics, reliability bins, the probability-returning model
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlflow
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Config
from pipeline.data import DatasetRef, Splits
from pipeline.models import Classifier
from pipeline.tracking import MetricBuffer, flatten, git_state
from pipeline.train import Checkpoint, TrainResult, train


def run_name(cfg: Config) -> str:
    return f"{cfg.loss.formulation.value}-seed{cfg.seed}"


def run_tags(cfg: Config, dataset: DatasetRef) -> dict[str, str]:
    tags = {
        "formulation": cfg.loss.formulation.value,
        "dataset": cfg.dataset.name,
        "dataset_version": dataset.version,
        "task": cfg.dataset.task.value,
        "seed": str(cfg.seed),
        "precision": cfg.precision.policy.value,
        "versions": package_versions(),
        **git_state(),
    }
    if dataset.checksum:
        tags["dataset_sha256"] = dataset.checksum
    if cfg.study:
        tags["study"] = cfg.study
    return tags


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("tensorflow", "tensorflow-cpu", "keras", "tensorflow-datasets", "numpy", "mlflow", "hydra-core"):
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return " ".join(found)


def log_inputs(dcfg: DictConfig, splits: Splits) -> None:
    """The resolved config (as params and as a file) and the split sizes."""
    mlflow.log_params(flatten(dcfg))
    mlflow.log_text(OmegaConf.to_yaml(dcfg, resolve=True), "config.yaml")
    mlflow.log_params({"train_examples": len(splits.x_train), "val_examples": len(splits.x_val),
                       "test_examples": len(splits.x_test)})


def train_into_run(cfg: Config, splits: Splits, checkpoint: Checkpoint | None = None,
                   progress: Callable[[int, dict], None] | None = None) -> TrainResult:
    run_id = mlflow.active_run().info.run_id
    metrics_log = MetricBuffer(mlflow.MlflowClient(), run_id)

    def on_epoch_end(epoch: int, metrics: dict) -> None:
        metrics_log.log(metrics, step=epoch)
        if progress:
            progress(epoch, metrics)

    try:
        result = train(cfg, splits, on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    finally:
        metrics_log.flush()  # an interrupted run keeps the epochs it finished
    mlflow.set_tags({
        "effective_from_logits": str(result.effective_from_logits).lower(),
        "output_dtype": result.output_dtype,
        "diverged": str(result.diverged).lower(),
    })
    mlflow.log_metrics({"probe_loss": result.probe_loss, "epochs_completed": float(result.epochs_completed)})
    return result


def log_model(clf: Classifier, x_example) -> str:
    """Logs the probability-returning model with a signature; returns its model URI."""
    import keras
    import tensorflow as tf
    from mlflow.models import infer_signature

    served = clf.served_model()
    signature = infer_signature(x_example, served.predict(x_example, verbose=0))
    # Stated, not inferred: MLflow's inference re-imports the model in a subprocess (~5 s per run).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    return mlflow.tensorflow.log_model(served, name="model", signature=signature, pip_requirements=requirements).model_uri


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

    def log(self) -> None:
        mlflow.log_metrics({f"seconds_{stage}": value for stage, value in self.seconds.items()})


def evaluate_into_run(clf: Classifier, splits: Splits, clock: StageClock | None = None) -> dict[str, float]:
    from pipeline.evaluate import evaluate

    clock = clock or StageClock()
    with clock("evaluate"):
        metrics, reliability = evaluate(clf, splits.x_test, splits.y_test)
    with clock("logging"):
        mlflow.log_metrics(metrics)
        mlflow.log_dict(reliability, "reliability.json")
        log_model(clf, splits.x_test[:5])
    return metrics


def summary_line(run_id: str, name: str, result: TrainResult, metrics: dict[str, float]) -> str:
    return (f"run {run_id} ({name}, effective_from_logits={str(result.effective_from_logits).lower()}"
            f"{', DIVERGED' if result.diverged else ''}): test_accuracy {metrics['test_accuracy']:.4f}  "
            f"test_nll {metrics['test_nll']:.4f}  test_ece {metrics['test_ece']:.4f}  test_brier {metrics['test_brier']:.4f}")


def write_json_atomically(path: Path, payload: dict) -> None:
    """Readers never see half a file: write to a temporary sibling, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(payload, tmp, indent=2, sort_keys=True)
    os.replace(tmp.name, path)
