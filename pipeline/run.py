"""`python -m pipeline.run [overrides]`: the Hydra entry point — one configuration, or with `-m` a study
(with `-m experiment=a,b`, the studies a and b in turn, in this process: the second reuses the first's
launcher workers, their imports done).

This module only parses, dispatches and maps outcomes to exit codes: 0 done, 2 bad input (one line,
nothing run), 130 interrupted, 1 a sweep in which a job failed (after its report) or whose launcher
failed (one line). Running one configuration is `pipeline.stages.run_configuration`; a study's parent
run and report are `pipeline.study.StudyCallback`.
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
from pipeline.config.overrides import precheck_overrides

register_configs()

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    from pipeline import study

    with study.job():
        return run_job(dcfg)


def run_job(dcfg: DictConfig) -> float | None:
    """One configuration (a study's job, or a single run); returns its test NLL (Hydra's sweep return value)."""
    from pipeline import study
    from pipeline.keras_backend import run_elsewhere, select

    from pipeline.interrupt import Interrupted, caused_by_stop, install_stop_handlers, stop_requested

    in_sweep = HydraConfig.get().mode is RunMode.MULTIRUN
    in_worker = in_sweep and study.active_study() is None  # a launcher's worker process, not the launching one
    parent_run_id = os.environ.get(study.PARENT_RUN_ENV) if in_sweep else None
    if in_worker:
        install_stop_handlers(notice=None)  # a launcher's worker: Ctrl-C reaches it too; the launcher says so
        if stop_requested.is_set() or study.stop_requested_for(parent_run_id, HydraConfig.get().sweep.dir):
            return None  # the sweep was interrupted: start nothing new
    job = HydraConfig.get().job.num if in_sweep else None
    output_dir = Path(dcfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(dcfg)
        if in_worker:
            from pipeline.tracking import tracking_uri

            uri = tracking_uri(cfg.tracking.uri)
            study.stop_with_launcher(uri, parent_run_id)
            if study.ended_before_this_job(uri, parent_run_id):
                print(f"this job's study (parent run {parent_run_id}) has ended: the job started after it (requeued by "
                      "the cluster?) and trains nothing; run the study's command again to resume its run",
                      file=sys.stderr, flush=True)
                return None
        if not select(cfg.backend.name.value):  # this process already runs another Keras backend
            answer = run_elsewhere(cfg.backend.name.value, OmegaConf.to_container(dcfg, resolve=True),
                                   list(HydraConfig.get().overrides.task), output_dir, parent_run_id, job)
            return answer.get("test_nll")
        from pipeline import stages

        metrics = stages.run_configuration(cfg, output_dir, parent_run_id, job,
                                           interrupted_attempt=study.interrupted_attempt() if in_sweep else None)
    except (KeyboardInterrupt, Exception) as error:
        if caused_by_stop(error):
            print("interrupted: the run ended KILLED with its persisted epochs and a checkpoint; "
                  "run the same command again to resume it", file=sys.stderr, flush=True)
            if in_worker and isinstance(error, Interrupted):
                return None  # stopped at an epoch boundary; the launching process ends the study KILLED
            study.end_active_study(KeyboardInterrupt())
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)  # the training thread may still be inside TensorFlow: do not wait for it
        if in_sweep:  # other jobs go on; the study's report names this one from MLflow
            from pipeline import stages

            stages.record_job_failure(dcfg, parent_run_id, " ".join(HydraConfig.get().overrides.task), error)
            return None
        if isinstance(error, PipelineError):
            from pipeline import run_folder

            run_folder.refused()
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        raise
    return metrics["test_nll"]


def launch(argv: list[str]) -> int:
    """One Hydra invocation in this process (a run, or one study) with command-line arguments `argv`;
    returns its exit code, unless it ends with SystemExit (Hydra's, or the study's own: bad input,
    interrupted, failed)."""
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import study
    from pipeline.interrupt import stop_requested

    sys.argv[1:] = argv
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: joblib has killed its workers, whose runs are left open
        study.end_interrupted_study()
        raise
    except Exception as error:
        from pipeline.run_folder import unwritable

        problem = unwritable(error)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if stop_requested.is_set():
            study.end_interrupted_study()
        study.end_failed_study(error)  # e.g. joblib's TerminatedWorkerError when the OS killed a worker
        raise
    finally:
        GlobalHydra.instance().clear()  # the next study of the command initializes it again
    return study.sweep_exit_code()


def not_started_line(names: list[str | None], done: list[str | None], multirun: bool) -> str:
    """What a command stopped before its study or studies `names` opened says, after the studies `done`."""
    if names == [None]:
        return f"interrupted: the {'sweep' if multirun else 'run'} was not started; nothing ran"
    return (f"interrupted: not started: {', '.join(names)}; the same command runs {'it' if len(names) == 1 else 'them'}"
            + (f" after {', '.join(done)}" if done else ""))


if __name__ == "__main__":
    from pipeline.config.overrides import studies_of
    from pipeline.interrupt import RUN_NOTICE, STUDY_NOTICE, StoppedBeforeStart, install_stop_handlers, stop_requested

    multirun = "-m" in sys.argv or "--multirun" in sys.argv
    if multirun:  # Hydra's parser takes -m only before the overrides; users also type it after some
        sys.argv[1:] = ["-m", *(arg for arg in sys.argv[1:] if arg not in ("-m", "--multirun"))]
    install_stop_handlers(STUDY_NOTICE if multirun else RUN_NOTICE)
    problem = precheck_overrides(sys.argv[1:])  # with experiment=a,b, each preset with the other overrides
    studies: dict = {None: sys.argv[1:]}
    if multirun and not problem:
        try:
            studies = studies_of(sys.argv[1:])
        except PipelineError as error:
            problem = str(error)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    # Errors outside a job (a launcher's, e.g. submitit's jobs interrupted; Hydra's own, writing the run's folder)
    # reach `launch`'s handler, not Hydra's report.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    names = list(studies)
    for done, name in enumerate(names, start=1):
        try:
            if stop_requested.is_set():  # Ctrl-C while starting up, or during the previous study's report
                raise StoppedBeforeStart()
            code = launch(studies[name])
        except StoppedBeforeStart as exit_:  # here or as the study was about to open
            print(not_started_line(names[done - 1:], names[:done - 1], multirun), file=sys.stderr, flush=True)
            sys.exit(exit_.code)
        except SystemExit as exit_:
            code = exit_.code
        except KeyboardInterrupt:  # stopped at once before or after a study, none open
            print("interrupted", file=sys.stderr, flush=True)
            code = EXIT_INTERRUPTED
        if code:
            if done < len(names):
                print(f"not started: {', '.join(names[done:])}, as study {name} ended with exit code {code}; the same "
                      f"command runs {'it' if done + 1 == len(names) else 'them'} after {name}", file=sys.stderr, flush=True)
            sys.exit(code)
