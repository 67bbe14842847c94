"""`python -m pipeline.run [overrides]`: fetch -> train -> evaluate for one configuration, one MLflow run.

With `-m` (Hydra multirun) every job becomes a child of one study parent run (see pipeline/study.py),
a failing job is recorded as a FAILED run and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

# Before TensorFlow is imported anywhere: its C++ INFO lines drown the pipeline's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Config, PipelineError, register_configs, validate

register_configs()

from pipeline.study import PARENT_RUN_ENV  # noqa: E402


def run_tags(cfg: Config, dataset_version: str, dataset_checksum: str | None) -> dict[str, str]:
    from pipeline.tracking import git_state

    tags = {
        "formulation": cfg.loss.formulation.value,
        "dataset": cfg.dataset.name,
        "dataset_version": dataset_version,
        "task": cfg.dataset.task.value,
        "seed": str(cfg.seed),
        "precision": cfg.precision.policy.value,
        **git_state(),
    }
    if dataset_checksum:
        tags["dataset_sha256"] = dataset_checksum
    if cfg.study:
        tags["study"] = cfg.study
    return tags


def log_model(clf, x_example) -> str:
    """Logs the probability-returning model with a signature; returns its model URI."""
    import mlflow
    from mlflow.models import infer_signature

    import keras
    import tensorflow as tf

    served = clf.served_model()
    signature = infer_signature(x_example, served.predict(x_example, verbose=0))
    # Stated, not inferred: MLflow's inference re-imports the model in a subprocess (~5 s per run).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    return mlflow.tensorflow.log_model(served, name="model", signature=signature, pip_requirements=requirements).model_uri


def run_pipeline(dcfg: DictConfig, parent_run_id: str | None = None) -> dict[str, float]:
    """Runs every stage for one configuration; returns the test metrics."""
    cfg = validate(dcfg)  # out-of-range values fail here, before any data or run exists

    import mlflow

    from pipeline.data import fetch, load
    from pipeline.evaluate import evaluate_test
    from pipeline.tracking import MetricBuffer, flatten, prepare_store, tracked_run, tracking_uri
    from pipeline.train import configure_determinism, train

    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment)
    dataset = fetch(cfg.dataset, cfg.data_dir, cfg.allow_download)
    splits = load(cfg.dataset, cfg.data_dir)
    configure_determinism()

    run_name = f"{cfg.loss.formulation.value}-seed{cfg.seed}"
    tags = run_tags(cfg, dataset.version, dataset.checksum)
    with tracked_run(uri, experiment_id, run_name, tags, parent_run_id=parent_run_id) as active:
        client = mlflow.MlflowClient(uri)
        run_id = active.info.run_id
        mlflow.log_params(flatten(dcfg))
        mlflow.log_text(OmegaConf.to_yaml(dcfg, resolve=True), "config.yaml")
        mlflow.log_params({"train_examples": len(splits.x_train), "val_examples": len(splits.x_val),
                           "test_examples": len(splits.x_test)})

        metrics_log = MetricBuffer(client, run_id)
        try:
            result = train(cfg, splits, on_epoch_end=lambda epoch, m: metrics_log.log(m, step=epoch))
        finally:
            metrics_log.flush()
        mlflow.set_tags({
            "effective_from_logits": str(result.effective_from_logits).lower(),
            "output_dtype": result.output_dtype,
            "diverged": str(result.diverged).lower(),
        })
        mlflow.log_metric("probe_loss", result.probe_loss)

        test_metrics, reliability = evaluate_test(result.classifier, splits)
        mlflow.log_dict(reliability, "reliability.json")
        test_metrics["epochs_completed"] = float(result.epochs_completed)
        mlflow.log_metrics(test_metrics)
        log_model(result.classifier, splits.x_test[:5])
        write_json_atomically(Path(cfg.output_dir) / "metrics.json", {"run_id": run_id, **test_metrics})
    print(
        f"run {run_id} ({run_name}, effective_from_logits={str(result.effective_from_logits).lower()}"
        f"{', DIVERGED' if result.diverged else ''}): test_accuracy {test_metrics['test_accuracy']:.4f}  "
        f"test_nll {test_metrics['test_nll']:.4f}  test_ece {test_metrics['test_ece']:.4f}  "
        f"test_brier {test_metrics['test_brier']:.4f}"
    )
    return test_metrics


def write_json_atomically(path: Path, payload: dict) -> None:
    """Readers never see half a file: write to a temporary sibling, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(payload, tmp, indent=2, sort_keys=True)
    os.replace(tmp.name, path)


def record_sweep_failure(cfg: DictConfig, parent_run_id: str | None, error: BaseException) -> None:
    """Puts a job that failed before its run opened on record, so the study's summary can name it."""
    if getattr(error, "mlflow_run_id", None):
        return  # tracked_run already ended the job's own run FAILED with the error
    from pipeline.tracking import prepare_store, record_failed_job, tracking_uri

    uri = tracking_uri(OmegaConf.select(cfg, "tracking.uri"))
    experiment_id = prepare_store(uri, OmegaConf.select(cfg, "tracking.experiment", default="fromlogits"))
    overrides = " ".join(HydraConfig.get().overrides.task)
    tags = {"formulation": str(OmegaConf.select(cfg, "loss.formulation")), "seed": str(OmegaConf.select(cfg, "seed"))}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    record_failed_job(uri, experiment_id, f"failed: {overrides}", tags, error)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    in_sweep = HydraConfig.get().mode is RunMode.MULTIRUN
    parent_run_id = os.environ.get(PARENT_RUN_ENV) if in_sweep else None
    try:
        metrics = run_pipeline(cfg, parent_run_id)
    except Exception as error:
        if in_sweep:  # other jobs go on; the study's summary reports this one from MLflow
            record_sweep_failure(cfg, parent_run_id, error)
            print(f"job failed: {error}", file=sys.stderr)
            return None
        if isinstance(error, PipelineError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
    return metrics["test_nll"]


if __name__ == "__main__":
    main()
