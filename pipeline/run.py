"""`python -m pipeline.run [overrides]`: fetch -> train -> evaluate for one configuration, one MLflow run.

With `-m` (Hydra multirun) every job becomes a child of one study parent run (see pipeline/study.py),
a failing job is recorded as a FAILED run and the sweep goes on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PipelineError, register_configs, validate

register_configs()

from pipeline.study import PARENT_RUN_ENV  # noqa: E402


def run_pipeline(dcfg: DictConfig, parent_run_id: str | None = None) -> dict[str, float]:
    """fetch -> train -> evaluate for one configuration, in one MLflow run; returns the test metrics."""
    cfg = validate(dcfg)  # out-of-range values fail here, before any data or run exists

    from pipeline import stages
    from pipeline.data import fetch, load
    from pipeline.tracking import prepare_store, tracked_run, tracking_uri
    from pipeline.train import configure_determinism

    clock = stages.StageClock()
    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment)
    with clock("data"):
        dataset = fetch(cfg.dataset, cfg.data_dir, cfg.allow_download)
        splits = load(cfg.dataset, cfg.data_dir)
    configure_determinism()

    name = stages.run_name(cfg)
    with tracked_run(uri, experiment_id, name, stages.run_tags(cfg, dataset), parent_run_id=parent_run_id) as run:
        with clock("logging"):
            stages.log_inputs(dcfg, splits)
        with clock("train"):
            result = stages.train_into_run(cfg, splits)
        metrics = stages.evaluate_into_run(result.classifier, splits, clock)
        stages.write_json_atomically(Path(cfg.output_dir) / "metrics.json", {"run_id": run.info.run_id, **metrics})
        clock.log()
    print(stages.summary_line(run.info.run_id, name, result, metrics))
    return metrics


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
    if cfg.output_dir is None:
        cfg.output_dir = HydraConfig.get().runtime.output_dir
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
