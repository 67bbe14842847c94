"""DVC's entry points: `python -m pipeline.dvc_stages {params,fetch,train,evaluate,compare}` (see dvc.yaml).

Each stage reads `params.yaml`, which `dvc exp run` composes from conf/ (DVC's Hydra integration) and
`make params` writes for `dvc repro`; a params.yaml composed from another state of conf/ is refused.
`train` runs every formulation x seed of `grid` as one MLflow study (one process, TensorFlow imported
once), each arm exactly as `python -m pipeline.run` would — trained, evaluated, logged, resumable after
an interruption — and saves the models; `evaluate` recomputes the test metrics from the saved model
files; `compare` writes the study's report. Files go to outputs/dvc/, metrics/ and reports/dvc/ in
DVC's workspace (a temporary copy for queued experiments).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from pipeline.cli import OneLineParser
from pipeline.config import (Backend, BackendConfig, Config, LossConfig, PipelineError, conf_digest, validate,
                             value_problem)
from pipeline.files import write_atomically, write_json

PARAMS = Path("params.yaml")
OUT = Path("outputs/dvc")
MODELS = OUT / "models"
CURVES = OUT / "curves.csv"
RUNS = OUT / "runs.json"
DATASET = OUT / "dataset.json"
METRICS = Path("metrics")  # git-tracked (cache: false), so `dvc exp show` can compare experiments
EVALUATION = METRICS / "evaluate.json"
COMPARISON = METRICS / "compare.json"
REPORT = Path("reports/dvc")
STUDY = "dvc"
CURVE_METRICS = ("train_epoch_loss", "val_nll_float64", "train_clipped_fraction", "grad_norm_ratio")


def load_params() -> Config:
    if not PARAMS.exists():
        raise PipelineError(f"{PARAMS} is missing: run `make params` (or `dvc exp run`, which composes it from conf/)")
    try:
        cfg = validate(OmegaConf.load(PARAMS))
    except OmegaConfBaseException as error:  # a key the config lacks, a value of the wrong type: edited by hand
        where = f"{error.full_key}={error.value!r}: " if isinstance(error, ValidationError) and error.full_key else ""
        raise PipelineError(f"{PARAMS} is not accepted: {where}{value_problem(error)}; compose it from conf/ with "
                            "`make params` (or `dvc exp run -S key=value`)") from None
    if cfg.conf_digest != conf_digest():
        raise PipelineError(f"{PARAMS} was composed from another state of conf/ (conf_digest {cfg.conf_digest} != "
                            f"{conf_digest()}): run `make params` (or use `dvc exp run`) before `dvc repro`")
    return cfg


def arms(cfg: Config, backend: Backend):
    """The config of every formulation x seed of the grid, on one backend."""
    for formulation in cfg.grid.formulations:
        for seed in cfg.grid.seeds:
            yield dataclasses.replace(cfg, loss=LossConfig(formulation), seed=seed, backend=BackendConfig(backend),
                                      study=STUDY)


def arm_label(formulation: str, backend: str) -> str:
    """How an arm is named in DVC's metrics and plots: `probs`, or `probs-jax` on another backend."""
    return formulation if backend == Backend.tensorflow.value else f"{formulation}-{backend}"


def fetch() -> None:
    from pipeline.data import fetch as fetch_dataset

    cfg = load_params()
    from pipeline.data import content_digest

    ref = fetch_dataset(cfg.dataset, cfg.data_dir, cfg.allow_download)
    # What `train` depends on: byte-stable, unlike the prepared files themselves.
    write_json(DATASET, {"name": ref.name, "version": ref.version, "sha256": content_digest(cfg.dataset, cfg.data_dir)})
    print(f"fetch: {ref.name} {ref.version} prepared in {ref.data_dir}")


def train() -> None:
    """Every arm of the grid as one study: each backend's arms in this process if Keras runs that backend
    here, else in a child process (`train-backend`) under the same parent run."""
    from pipeline.keras_backend import run_child, select
    from pipeline.study import PARENT_RUN_ENV
    from pipeline.tracking import Study, prepare_store, tracking_uri

    cfg = load_params()
    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment, cfg.tracking)
    runs = {}
    with Study(uri, experiment_id, STUDY, {"source": "dvc"}) as study:
        for backend in cfg.grid.backends:
            if select(backend.value):
                runs.update(train_backend(backend.value, study.run_id))
                continue
            if run_child("pipeline.dvc_stages", ["train-backend", backend.value], backend.value,
                         {PARENT_RUN_ENV: study.run_id}) != 0:
                raise PipelineError(f"training the {backend.value} arms failed (see above)")
            runs.update(json.loads(backend_runs(backend.value).read_text()))
            backend_runs(backend.value).unlink()
        write_json(RUNS, {"parent_run_id": study.run_id, "runs": runs})
    write_curves(uri, runs)


def backend_runs(backend: str) -> Path:
    return OUT / f".runs-{backend}.json"  # handed from a child process to `train`, then removed


def train_backend(backend: str, parent_run_id: str | None = None) -> dict:
    """The grid's arms on one backend (this process's), each exactly as `python -m pipeline.run` runs it."""
    import os

    from pipeline.interrupt import stop_requested
    from pipeline.record import run_name
    from pipeline.stages import run_configuration
    from pipeline.study import PARENT_RUN_ENV

    cfg = load_params()
    parent_run_id = parent_run_id or os.environ[PARENT_RUN_ENV]
    runs = {}
    for arm in arms(cfg, Backend(backend)):
        if stop_requested.is_set():  # a stop after a run's last epoch, or before the first run: open no further run
            raise KeyboardInterrupt("stopped before the next run")  # no epoch was stopped: not `Interrupted`
        name = run_name(arm)
        result = run_configuration(arm, OUT / "runs" / name, parent_run_id, model_path=MODELS / f"{name}.keras")
        runs[name] = {"run_id": result["run_id"], "formulation": arm.loss.formulation.value, "seed": arm.seed,
                      "backend": backend}
    return runs


def train_backend_in_child(backend: str) -> None:
    """`train-backend BACKEND`: run by `train` in a child process started on that backend."""
    write_json(backend_runs(backend), train_backend(backend))


def write_curves(uri: str, runs: dict) -> None:
    """Per formulation and epoch (by step), the mean over seeds: what `dvc plots show` draws."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from pipeline.report.plots import by_epoch
    from pipeline.report.runs import metric_histories

    client = MlflowClient(uri)
    per_arm: dict[str, list[dict[str, dict[int, float]]]] = {}
    for run in runs.values():
        history = metric_histories(client, run["run_id"], CURVE_METRICS)
        per_arm.setdefault(arm_label(run["formulation"], run["backend"]), []).append(history)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["formulation", "epoch", *CURVE_METRICS])
            for formulation, histories in per_arm.items():
                columns = {key: by_epoch([h[key] for h in histories]) for key in CURVE_METRICS}
                for i, epoch in enumerate(columns[CURVE_METRICS[0]][0]):
                    writer.writerow([formulation, int(epoch), *(float(np.nanmean(columns[k][1][:, i])) for k in CURVE_METRICS)])

    write_atomically(CURVES, write)


def evaluate() -> None:
    """Test metrics recomputed from the saved model files, per run and as the mean per formulation."""
    import keras
    import numpy as np

    from pipeline.data import load
    from pipeline.evaluate import evaluate as evaluate_model
    from pipeline.formulations import formulation
    from pipeline.models import Classifier

    cfg = load_params()
    splits = load(cfg.dataset, cfg.data_dir)
    recorded = json.loads(RUNS.read_text())
    by_formulation: dict[str, list[dict]] = {}
    for name, run in recorded["runs"].items():
        clf = Classifier(keras.models.load_model(MODELS / f"{name}.keras"), formulation(run["formulation"], cfg.dataset.task))
        metrics, _ = evaluate_model(clf, splits.x_test, splits.y_test)
        by_formulation.setdefault(arm_label(run["formulation"], run["backend"]), []).append(metrics)
        print(f"evaluate: {name}: test_nll {metrics['test_nll']:.4f} test_accuracy {metrics['test_accuracy']:.4f}", flush=True)
    # The headline numbers only: `dvc metrics show` fits a terminal; per-run detail is in MLflow and the report.
    write_json(EVALUATION, {f: {k: float(np.mean([m[k] for m in ms])) for k in ("test_accuracy", "test_nll")}
                            for f, ms in by_formulation.items()})


def compare() -> None:
    from pipeline.report import build_report, print_report
    from pipeline.tracking import tracking_uri

    cfg = load_params()
    recorded = json.loads(RUNS.read_text())
    report = build_report(tracking_uri(cfg.tracking.uri), Path(cfg.reports_dir), cfg.tracking.experiment,
                          parent_run_id=recorded["parent_run_id"], out_dir=REPORT)
    write_json(COMPARISON, headline(report))
    print_report(report)


def headline(report) -> dict:
    """Per compared arm, test NLL as a ratio to logits and accuracy as a difference, with intervals."""
    from pipeline.record import Tag

    out = {}
    for result in report.results:
        for c in result.comparisons:
            if c.metric not in ("test_nll", "test_accuracy") or c.difference is None:
                continue
            effect = c.ratio if c.ratio is not None else c.difference
            kind = "ratio" if c.ratio is not None else "diff"
            label = arm_label(c.arm, result.setting.runs[0].tags.get(Tag.BACKEND, Backend.tensorflow.value))
            out.setdefault(label, {})[f"{c.metric}_{kind}"] = {
                "value": effect.estimate, "ci_low": effect.low, "ci_high": effect.high, "shown": c.shown}
    return out


def params(overrides: list[str]) -> None:
    """Writes params.yaml from conf/ (plus Hydra overrides) with DVC's own composer, as `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import PROJECT_ROOT, register_configs
    from pipeline.config.overrides import precheck_overrides

    register_configs()
    problem = precheck_overrides(overrides)  # as the command line's own: nothing is written for a bad one
    if problem:
        raise PipelineError(problem)
    compose_and_dump(PARAMS, str(PROJECT_ROOT / "conf"), None, "config", str(PROJECT_ROOT), overrides)
    print(f"params: wrote {PARAMS} from conf/ {' '.join(overrides)}".rstrip())


STAGES = {"params": params, "fetch": fetch, "train": train, "train-backend": train_backend_in_child, "evaluate": evaluate,
          "compare": compare}


def main(argv: list[str] | None = None) -> int:
    from pipeline.interrupt import caused_by_stop, install_stop_handlers

    parser = OneLineParser(prog="python -m pipeline.dvc_stages", description="DVC stage entry points")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (params); the backend (train-backend)")
    args = parser.parse_args(argv)
    if args.overrides and args.stage not in ("params", "train-backend"):
        parser.error("only `params` takes overrides; the stages read params.yaml")
    install_stop_handlers()
    try:
        if args.stage == "params":
            params(args.overrides)
        elif args.stage == "train-backend":
            STAGES[args.stage](*args.overrides[:1])
        else:
            STAGES[args.stage]()
    except (KeyboardInterrupt, Exception) as error:
        if caused_by_stop(error):
            said = ("any run being trained ended KILLED with its checkpoint, and no further run started; `dvc repro` "
                    "continues from there" if args.stage in ("train", "train-backend") else
                    f"the {args.stage} stage stopped; its outputs are whole or as they were; run it again")
            print(f"interrupted: {said}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            import os

            os._exit(130)
        if isinstance(error, PipelineError):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
