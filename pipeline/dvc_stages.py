"""DVC's entry points: `python -m pipeline.dvc_stages {fetch,train,evaluate,compare}` (see dvc.yaml).

Each stage reads `params.yaml`, which `dvc exp run` composes from conf/ (DVC's Hydra integration) and
`make params` writes for `dvc repro`. `train` trains every formulation x seed of `grid` in one process
(TensorFlow imported once) as one MLflow study; `evaluate` reopens those runs to add test metrics and
models; `compare` writes the study's report. Files go to outputs/dvc/ and reports/dvc/ in the working
directory, which is DVC's workspace (a temporary copy for queued experiments).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import Config, LossConfig, PipelineError, validate

PARAMS = Path("params.yaml")
OUT = Path("outputs/dvc")
MODELS = OUT / "models"
CURVES = OUT / "curves"
RUNS = OUT / "runs.json"
EVALUATION = OUT / "evaluate.json"
COMPARISON = OUT / "compare.json"  # the report's summary numbers, as DVC metrics
REPORT = Path("reports/dvc")
CURVE_METRICS = ("train_epoch_loss", "val_nll_float64", "train_clipped_fraction", "grad_norm_ratio")


def load_params() -> tuple[Config, object]:
    if not PARAMS.exists():
        raise PipelineError(f"{PARAMS} is missing: run `make params` (or `dvc exp run`, which composes it from conf/)")
    raw = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(PARAMS))
    return validate(raw), raw


def arms(cfg: Config):
    """The config of every formulation x seed of the grid."""
    for formulation in cfg.grid.formulations:
        for seed in cfg.grid.seeds:
            yield dataclasses.replace(cfg, loss=LossConfig(formulation), seed=seed, study="dvc")


def fetch() -> None:
    from pipeline.data import fetch as fetch_dataset

    cfg, _ = load_params()
    ref = fetch_dataset(cfg.dataset, cfg.data_dir, cfg.allow_download)
    print(f"fetch: {ref.name} {ref.version} prepared in {ref.data_dir}")


def _setup(cfg: Config):
    from pipeline.data import fetch as fetch_dataset, load
    from pipeline.tracking import prepare_store, tracking_uri
    from pipeline.train import configure_determinism

    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment)
    dataset = fetch_dataset(cfg.dataset, cfg.data_dir, allow_download=False)  # prepared by the fetch stage
    configure_determinism()
    return uri, experiment_id, dataset, load(cfg.dataset, cfg.data_dir)


def _write_curves(histories: dict[str, list[list[dict]]]) -> None:
    """Per formulation, the per-epoch mean over seeds: what `dvc plots show` draws."""
    import numpy as np

    CURVES.mkdir(parents=True, exist_ok=True)
    for formulation, runs in histories.items():
        epochs = max(len(h) for h in runs)
        with open(CURVES / f"{formulation}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *CURVE_METRICS])
            for e in range(epochs):
                rows = [h[e] for h in runs if len(h) > e]
                writer.writerow([e + 1, *(float(np.mean([r[k] for r in rows])) for k in CURVE_METRICS)])


def train() -> None:
    from pipeline import stages
    from pipeline.tracking import end_run, start_study, tracked_run

    cfg, raw = load_params()
    uri, experiment_id, dataset, splits = _setup(cfg)
    parent = start_study(uri, experiment_id, "dvc", {"source": "dvc"})
    MODELS.mkdir(parents=True, exist_ok=True)
    runs, histories = {}, {}
    try:
        for arm in arms(cfg):
            name = stages.run_name(arm)
            arm_raw = OmegaConf.merge(raw, {"loss": {"formulation": arm.loss.formulation.value}, "seed": arm.seed, "study": "dvc"})
            with tracked_run(uri, experiment_id, name, stages.run_tags(arm, dataset), parent_run_id=parent) as run:
                stages.log_inputs(arm_raw, splits)
                result = stages.train_into_run(arm, splits)
            result.classifier.model.save(MODELS / f"{name}.keras")
            runs[name] = {"run_id": run.info.run_id, "formulation": arm.loss.formulation.value, "seed": arm.seed}
            histories.setdefault(arm.loss.formulation.value, []).append(result.history)
            print(f"train: {name} ({result.epochs_completed} epochs) -> run {run.info.run_id}", flush=True)
    except BaseException:
        from mlflow.entities import RunStatus

        end_run(uri, parent, RunStatus.FAILED)
        raise
    end_run(uri, parent)
    _write_curves(histories)
    stages.write_json_atomically(RUNS, {"parent_run_id": parent, "runs": runs})


def evaluate() -> None:
    import keras
    import numpy as np

    from pipeline import stages
    from pipeline.formulations import formulation
    from pipeline.models import Classifier
    from pipeline.tracking import tracked_run

    cfg, _ = load_params()
    uri, experiment_id, _, splits = _setup(cfg)
    recorded = json.loads(RUNS.read_text())
    per_run, by_formulation = {}, {}
    for name, run in recorded["runs"].items():
        clf = Classifier(keras.models.load_model(MODELS / f"{name}.keras"), formulation(run["formulation"], cfg.dataset.task))
        with tracked_run(uri, experiment_id, run_id=run["run_id"]):
            metrics = stages.evaluate_into_run(clf, splits)
        per_run[name] = metrics
        by_formulation.setdefault(run["formulation"], []).append(metrics)
        print(f"evaluate: {name}: test_nll {metrics['test_nll']:.4f} test_accuracy {metrics['test_accuracy']:.4f}", flush=True)
    means = {f: {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} for f, ms in by_formulation.items()}
    stages.write_json_atomically(EVALUATION, {"mean": means, "runs": per_run})


def compare() -> None:
    from pipeline.compare import compare as compare_study, print_comparison
    from pipeline.stages import write_json_atomically
    from pipeline.tracking import tracking_uri

    cfg, _ = load_params()
    recorded = json.loads(RUNS.read_text())
    outcome = compare_study(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment,
                            parent_run_id=recorded["parent_run_id"], out_dir=REPORT)
    write_json_atomically(COMPARISON, outcome["summary"])
    print_comparison(outcome)


def params(overrides: list[str]) -> None:
    """Writes params.yaml from conf/ (plus Hydra overrides) with DVC's own composer, as `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import PROJECT_ROOT

    compose_and_dump(PARAMS, str(PROJECT_ROOT / "conf"), None, "config", str(PROJECT_ROOT), overrides)
    print(f"params: wrote {PARAMS} from conf/ {' '.join(overrides)}".rstrip())


STAGES = {"params": params, "fetch": fetch, "train": train, "evaluate": evaluate, "compare": compare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.dvc_stages", description="DVC stage entry points")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (params only)")
    args = parser.parse_args(argv)
    if args.overrides and args.stage != "params":
        parser.error("only `params` takes overrides; the stages read params.yaml")
    try:
        STAGES[args.stage](*([args.overrides] if args.stage == "params" else []))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
