"""`python -m pipeline.run [overrides]`: fetch -> train -> evaluate for one configuration, one MLflow run.

With `-m` (Hydra multirun) every job becomes a child of one study parent run (see pipeline/study.py),
a failing job is recorded as a FAILED run and the sweep goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PipelineError, register_configs, validate

register_configs()

from pipeline.study import PARENT_RUN_ENV  # noqa: E402


def checkpoint_dir(dcfg: DictConfig, root: str) -> Path:
    """Where a configuration's checkpoint lives: keyed by everything that changes what is trained."""
    what = OmegaConf.to_container(dcfg, resolve=True)
    for where in ("output_dir", "reports_dir", "checkpoints_dir", "tracking", "study", "resume"):
        what.pop(where, None)
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / key


def resumable_run(uri: str, folder: Path) -> str | None:
    """The run an interrupted attempt of this configuration left (KILLED or FAILED), if any."""
    import mlflow

    marker = folder / "run.json"
    if not (marker.exists() and (folder / "state.npz").exists()):
        return None
    run_id = json.loads(marker.read_text())["run_id"]
    try:
        status = mlflow.MlflowClient(uri).get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None  # the run was deleted, or the checkpoint belongs to another store
    return run_id if status in ("KILLED", "FAILED") else None


def run_pipeline(dcfg: DictConfig, parent_run_id: str | None = None, job: int | None = None) -> dict[str, float]:
    """fetch -> train -> evaluate for one configuration, in one MLflow run; returns the test metrics.

    An interrupted run (SIGINT/SIGTERM) ends KILLED with a checkpoint of its last epoch; running the
    same configuration again continues it in the same MLflow run (unless `resume=false`).
    """
    cfg = validate(dcfg)  # out-of-range values fail here, before any data or run exists

    from pipeline import stages
    from pipeline.data import fetch, load
    from pipeline.progress import EpochProgress
    from pipeline.tracking import prepare_store, tracked_run, tracking_uri
    from pipeline.train import Checkpoint, configure_determinism

    clock = stages.StageClock()
    uri = tracking_uri(cfg.tracking.uri)
    experiment_id = prepare_store(uri, cfg.tracking.experiment)
    with clock("data"):
        dataset = fetch(cfg.dataset, cfg.data_dir, cfg.allow_download)
        splits = load(cfg.dataset, cfg.data_dir)
    configure_determinism()

    folder = checkpoint_dir(dcfg, cfg.checkpoints_dir)
    resume_id = resumable_run(uri, folder) if cfg.resume else None
    checkpoint = Checkpoint(folder / "state.npz")
    if not resume_id:
        checkpoint.remove()
    name = stages.run_name(cfg)
    with tracked_run(uri, experiment_id, name, stages.run_tags(cfg, dataset), parent_run_id=parent_run_id,
                     run_id=resume_id) as run:
        stages.write_json_atomically(folder / "run.json", {"run_id": run.info.run_id})
        if resume_id:  # its params and config were logged by the first attempt
            print(f"resuming run {resume_id} from its checkpoint ({folder})", flush=True)
        else:
            with clock("logging"):
                stages.log_inputs(dcfg, splits)
        first_epoch = checkpoint.epoch() + 1 if resume_id else 1
        progress = EpochProgress(name, cfg.train.epochs, first_epoch=first_epoch, job=job)
        with clock("train"):
            result = stages.train_into_run(cfg, splits, checkpoint, progress)
        metrics = stages.evaluate_into_run(result.classifier, splits, clock)
        stages.write_json_atomically(Path(cfg.output_dir) / "metrics.json", {"run_id": run.info.run_id, **metrics})
        clock.log()
    shutil.rmtree(folder, ignore_errors=True)  # finished: nothing to resume
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
        metrics = run_pipeline(cfg, parent_run_id, HydraConfig.get().job.num if in_sweep else None)
    except KeyboardInterrupt:
        print("interrupted: the run ended KILLED with its finished epochs and a checkpoint; "
              "run the same command again to resume it", file=sys.stderr, flush=True)
        if in_sweep:
            raise  # stops the sweep; the study's parent run ends KILLED
        sys.exit(130)
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


def composition_error(override: str, error: Exception) -> str:
    """Hydra's multi-line composition error as one line naming the value and what is accepted."""
    from hydra.errors import MissingConfigException

    message = str(error)
    if isinstance(error, MissingConfigException) and "Available options in" in message:
        options = [line.strip() for line in message.split("Available options in", 1)[1].splitlines()[1:]
                   if line.startswith("\t") and "provider=" not in line]
        return f"{override} is not accepted: expected one of {', '.join(options)}"
    cause = error.__cause__ or error
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{override} is not accepted: {first}"


def precheck_overrides(argv: list[str]) -> str | None:
    """Composes the command line's config overrides before Hydra does; returns a one-line error or None.

    Hydra reports a bad override over several lines with a hint about HYDRA_FULL_ERROR; researchers
    should instead read which value is wrong and what is accepted. Every value of a sweep is checked,
    so a typo in the fifth value fails before the first job starts.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from pipeline.config import PROJECT_ROOT

    candidates = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except OverrideParseException as error:
        return f"cannot parse the overrides: {str(error).splitlines()[0]}"
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        trials = [(line, fixed) for line in fixed] + [
            (f"{o.get_key_element()}={value}", [*fixed, f"{o.get_key_element()}={value}"])
            for o in parsed if o.is_sweep_override() for value in o.sweep_string_iterator()
        ]
        for override, overrides in trials or [("(defaults)", [])]:
            try:
                cfg = compose(config_name="config", overrides=overrides)
            except Exception as error:  # noqa: BLE001 - every composition error becomes one line
                return composition_error(override, error)
            try:
                validate(cfg)
            except PipelineError as error:
                return str(error)
    return None


def request_stop(signum, frame):
    """SIGINT/SIGTERM: stop at the end of the current epoch (its checkpoint saved, the run KILLED);
    a second signal stops at once."""
    from pipeline.train import stop_requested

    if stop_requested.is_set():
        raise KeyboardInterrupt
    stop_requested.set()
    print(f"\n{signal.Signals(signum).name}: stopping after this epoch (again to stop now)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    problem = precheck_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
