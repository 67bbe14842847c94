"""A study = one Hydra multirun: an MLflow parent run, its child runs, and the report at the end.

Registered as a Hydra callback in conf/config.yaml, so it works with every launcher: the parent run
is created in the launching process before any job starts (which also creates the store, the
experiment and the prepared dataset once: parallel first writers race on all three), and its id
reaches the jobs through the environment, which local and SLURM workers inherit. A stop (Ctrl-C, SIGTERM, a
hang-up) is passed on to the jobs; jobs on the launching process's machine also stop if it dies without one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.config import TFDS_VERSION, PipelineError, error_summary, validate
from pipeline.config.overrides import as_first_job, count_jobs, sweep_values
from pipeline.progress import STUDY_JOBS_ENV, STUDY_STARTED_ENV, STUDY_WORKERS_ENV

PARENT_RUN_ENV = "FROMLOGITS_PARENT_RUN_ID"
INTERRUPTED_ATTEMPT_ENV = "FROMLOGITS_INTERRUPTED_ATTEMPT"  # the parent run whose finished runs this study keeps
LAUNCHER_ENV = "FROMLOGITS_LAUNCHER"  # "<pid> <start time>" of the launching process, for jobs on its machine
# What a study tells its jobs (`share_with_jobs`), and a job the process it hands its work to (keras_backend).
STUDY_ENVIRONMENT = (PARENT_RUN_ENV, INTERRUPTED_ATTEMPT_ENV, STUDY_JOBS_ENV, STUDY_WORKERS_ENV, STUDY_STARTED_ENV,
                     LAUNCHER_ENV)

_active: "StudyCallback | None" = None  # the study this process launched, if any
_failed_jobs = 0


def active_study() -> "StudyCallback | None":
    """The study this process launched; None in a launcher's worker process."""
    return _active


def interrupted_attempt() -> str | None:
    """The parent run of this study's interrupted attempt, whose finished runs its jobs keep (in a job)."""
    return os.environ.get(INTERRUPTED_ATTEMPT_ENV) or None


def find_interrupted_attempt(uri: str, experiment_id: str, name: str, parent_run_id: str) -> str | None:
    """The latest earlier study of this name, if it did not complete: it ended KILLED or FAILED (stopped, crashed;
    a dead launcher's study is marked FAILED when the store is opened), or FINISHED with runs that did not (a job
    failed, or was cancelled or preempted on a cluster; its report names them). The attempt this one resumes."""
    from mlflow.tracking import MlflowClient

    from pipeline.record import STUDY_ROLE, Tag

    client = MlflowClient(uri)
    earlier = [run for run in client.search_runs(
        [experiment_id], f"tags.{Tag.ROLE} = '{STUDY_ROLE}' and tags.{Tag.STUDY} = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=2) if run.info.run_id != parent_run_id]
    if not earlier:
        return None
    latest = earlier[0].info
    unfinished = latest.status == "FINISHED" and client.search_runs(
        [experiment_id], f"tags.`{Tag.PARENT}` = '{latest.run_id}' and attributes.status != 'FINISHED'", max_results=1)
    return latest.run_id if latest.status in ("KILLED", "FAILED") or unfinished else None


def end_active_study(error: BaseException) -> None:
    """Ends this process's open study (interrupted: KILLED) before the process exits without atexit."""
    if _active is not None:
        _active.study.close(error)


def end_interrupted_study() -> None:
    """Ctrl-C during a sweep: ends this process's study as interrupted (exit 130), if it launched one."""
    if _active is not None:
        _active.end_interrupted()


def end_failed_study(error: Exception) -> None:
    """The launcher of this process's study failed: ends the study and its orphaned runs FAILED (exit 1),
    if this process launched one."""
    if _active is not None and _active.study.run_id is not None:
        _active.end_failed(error)


def sweep_exit_code() -> int:
    """1 when a job of this process's study failed (its report names it), else 0."""
    return 1 if _failed_jobs else 0


def parallel_workers(config: DictConfig, jobs: int) -> int:
    """How many jobs the launcher runs at once (joblib's n_jobs; -1 = one per core); 1 for the others."""
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
    if n_jobs is None:
        return 1
    cores = os.cpu_count() or 1
    return max(1, min(jobs, cores + 1 + n_jobs if n_jobs < 0 else n_jobs))


def stop_marker(sweep_dir: str | Path, parent_run_id: str) -> Path:
    """The file that says a study was asked to stop: a job that starts after that (a Slurm job still
    queued, one whose start-up the signal missed) finds it and trains nothing. Named after the parent
    run, so rerunning the command into the same sweep folder (to resume) is not stopped by it."""
    return Path(sweep_dir) / f".stop-requested-{parent_run_id}"


def stop_requested_for(parent_run_id: str | None, sweep_dir: str | Path) -> bool:
    """Whether the study this job belongs to was asked to stop (read in a launcher's job)."""
    return parent_run_id is not None and stop_marker(sweep_dir, parent_run_id).exists()


def ended_before_this_job(uri: str, parent_run_id: str | None) -> bool:
    """Whether a cluster job's study has already ended: the job started after its launching process stopped
    waiting for it (Slurm requeued it, after submitit had collected its first attempt; or the launching process
    died and its study was marked FAILED). Such a job trains nothing: its run stays as it was, for the same
    command to resume. Jobs on the launching process's machine are watched instead (`stop_with_launcher`);
    a store that cannot be read here is left to the run, which says so."""
    if parent_run_id is None or os.environ.get(LAUNCHER_ENV):
        return False
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(parent_run_id).info.status != "RUNNING"
    except Exception:  # noqa: BLE001 - see above
        return False


_job_running = threading.Lock()  # held by a job process while it runs a job
_watching = False  # whether this process watches its launching process
_watched_study: str | None = None  # the parent run of the study whose job this process runs (or ran last)


@contextlib.contextmanager
def job() -> Iterator[None]:
    """Around a launcher's job in its process: `stop_with_launcher` lets a running job end its run first."""
    with _job_running:
        yield


def stop_with_launcher(uri: str, parent_run_id: str | None) -> None:
    """In a job process on the launching process's machine (joblib's workers, submitit_local's jobs): when
    the launching process dies without ending its study (SIGKILL, the OOM killer), the job stops at the end
    of its epoch as after Ctrl-C (its run ends KILLED with a checkpoint: the same command resumes it), the
    study's parent run is marked FAILED as stale, and the process exits. Otherwise joblib's workers would
    finish their jobs for nobody and then idle for minutes with TensorFlow loaded. Watches once a second."""
    global _watching, _watched_study
    _watched_study = parent_run_id  # a worker reused by the command's next study watches for that one
    launcher = os.environ.get(LAUNCHER_ENV, "").split()
    if _watching or len(launcher) != 2:
        return
    _watching = True
    threading.Thread(target=_watch_launcher, args=(*launcher, uri), name="launcher-watch", daemon=True).start()


def _watch_launcher(pid: str, started: str, uri: str) -> None:
    from pipeline.interrupt import stop_requested
    from pipeline.processes import process_alive
    from pipeline.tracking import mark_stale_runs

    while process_alive(pid, started):
        time.sleep(1.0)
    stop_requested.set()
    if _job_running.locked():
        print(f"the study's launching process {pid} is gone: this job stops after its epoch", file=sys.stderr,
              flush=True)
    with _job_running:  # the job, if one runs, has ended its run
        with contextlib.suppress(Exception):  # the store may be gone too; the next command marks it then
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            mark_stale_runs(client, client.get_run(_watched_study).info.experiment_id)
        sys.stdout.flush()
        os._exit(130)


LOCAL_JOBS = ("submitit.core._submit", "loky.backend.popen_loky_posix")  # submitit_local's jobs, joblib's workers


def _stop_local_jobs() -> None:
    """Passes a stop request on to this study's jobs that run as processes on this machine."""
    import psutil

    from pipeline.interrupt import RELAYED_STOP

    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(job in part for part in process.cmdline() for job in LOCAL_JOBS):
                process.send_signal(RELAYED_STOP)


SUBMITTED = re.compile(r"(\d+)(?:_\d+)?_submitted\.pkl")  # submitit's record of each job or array task it submitted


def slurm_job_ids(submitit_folder: str) -> list[str]:
    """The Slurm jobs of this sweep, from the `<job id>_submitted.pkl` file submitit writes for each job or
    array task into the sweep's submitit folder (whose `%j`, `%t`, `%A`, `%a` it fills in), as job ids (an
    array's tasks share one)."""
    import glob

    folders = glob.escape(str(Path(submitit_folder).expanduser().absolute()))
    for tag in ("%j", "%t", "%A", "%a"):
        folders = folders.replace(tag, "*")
    names = (Path(f).name for f in glob.glob(os.path.join(folders, "*_submitted.pkl")))
    return sorted({m.group(1) for name in names if (m := SUBMITTED.fullmatch(name))}, key=int)


def _stop_slurm_jobs(submitit_folder: str) -> None:
    """Passes a stop request on to this sweep's Slurm jobs: SIGTERM to their running job steps, which stop
    at the end of the epoch and end their runs KILLED (submitit only logs a SIGTERM that comes while the
    job starts up; the job then finds the stop marker). Jobs still queued find the marker when they start."""
    import subprocess

    ids = slurm_job_ids(submitit_folder)
    if not ids:
        return
    try:
        subprocess.run(["scancel", "--signal=TERM", "--state=RUNNING", *ids], check=True, capture_output=True, text=True,
                       timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        from pipeline.config import first_line

        said = first_line(getattr(error, "stderr", None) or "")  # scancel's own reason, when it gave one
        print(f"could not pass the stop on to Slurm jobs {' '.join(ids)} ({said or first_line(error)}); "
              f"stop them with scancel", file=sys.stderr, flush=True)


def looks_prepared(name: str, version: str | None, data_dir: str) -> bool:
    """Whether TFDS has prepared the dataset (that version, or any when none is configured) in `data_dir`.

    Read from the files, without importing TFDS, which would cost the launching process TensorFlow's
    import (6 s) while its jobs import it anyway. TFDS prepares a version in a temporary folder and
    renames it into place when complete, with its dataset_info.json. If the configured "latest" version
    is not the prepared one, the jobs prepare it, one at a time (pipeline/data.py: fetch).
    """
    folder = Path(data_dir) / name
    versions = [folder / version] if version else [p for p in folder.glob("*") if TFDS_VERSION.fullmatch(p.name)]
    return any((path / "dataset_info.json").is_file() for path in versions)  # not TFDS's *.incomplete* folders


def _import_report_meanwhile() -> None:
    """Imports the report's modules (matplotlib, SciPy, Markdown: about 2 s) while the jobs run, instead
    of after the last one, when this process works alone. A failure is left to the report's own import."""
    import importlib
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("pipeline.report.render")

    threading.Thread(target=load, name="report-import", daemon=True).start()


def study_environment() -> dict[str, str]:
    """The study's variables as this job process sees them."""
    return {key: os.environ[key] for key in STUDY_ENVIRONMENT if key in os.environ}


def share_with_jobs(config: DictConfig, environment: dict[str, str]) -> None:
    """Sets the study's `environment` in this process and, as Hydra's `hydra.job.env_set`, around every job's
    task, whatever the launcher: a worker process that a launcher reuses from an earlier study of the same
    command (`experiment=a,b`) reads this study's values, not those it inherited when it started."""
    from omegaconf import read_write

    os.environ.update(environment)
    with read_write(config.hydra.overrides):  # the overrides every job's config is composed with
        # Quoted: Hydra would read a run id such as 12e45 as a number. The values are ids, numbers and spaces.
        config.hydra.overrides.hydra.extend([f"++hydra.job.env_set.{key}='{value}'" for key, value in environment.items()])


def report_folder(config: DictConfig, cfg) -> Path:
    """Where a study's report goes: <reports_dir>/<study> for a named study, an ad-hoc sweep's in its sweep folder.
    `config`: the study's Hydra config; `cfg`: its validated config."""
    return Path(config.hydra.sweep.dir) / "report" if cfg.study is None else Path(cfg.reports_dir) / cfg.study


def validated_study(config: DictConfig):
    """A study's validated config (as in its first job) from its Hydra config; raises WriteError if its report
    folder is someone else's, which the study would find only once every job had trained. The command's
    pre-check calls it for each study of `experiment=a,b`; the study again as it opens (a folder made meanwhile)."""
    from pipeline.files import refuse_unless_ours

    with as_first_job(config, multirun=True):
        cfg = validate(config)
    refuse_unless_ours(report_folder(config, cfg))
    return cfg


class StudyCallback(Callback):
    def __init__(self) -> None:
        self.study = None
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self._start(config)
        except Exception as error:  # noqa: BLE001 - any failure: no job may run without its study
            # Hydra turns a callback's exception into a warning and runs the jobs anyway: stop here instead.
            if self.study is not None:
                self.study.close(error)  # opened before the failure: FAILED, not left RUNNING
            if isinstance(error, PipelineError):
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(2)
            print(f"error: the study could not start: {error_summary(error)}", file=sys.stderr,
                  flush=True)
            sys.exit(1)

    def _start(self, config: DictConfig) -> None:
        global _active, _failed_jobs
        from pipeline.interrupt import StoppedBeforeStart, forget_relays, stop_requested
        from pipeline.tracking import Study, prepare_store, tracking_uri

        forget_relays()  # an earlier study's, in a command that runs several
        _failed_jobs = 0
        cfg = validated_study(config)
        self.uri = tracking_uri(cfg.tracking.uri)
        experiment_id = prepare_store(self.uri, cfg.tracking.experiment, cfg.tracking)
        if not looks_prepared(cfg.dataset.name, cfg.dataset.version, cfg.data_dir):
            from pipeline.data import fetch

            fetch(cfg.dataset, cfg.data_dir, cfg.allow_download)  # once, before the jobs; fails early offline
        if stop_requested.is_set():  # a stop while this process started up: open nothing
            raise StoppedBeforeStart()
        sweep_params = OmegaConf.select(config, "hydra.sweeper.params")
        preset = OmegaConf.to_container(sweep_params, resolve=False) if sweep_params is not None else {}
        overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # as typed: ${hydra:job.num} is a job's
        _, sweeps = sweep_values([f"{k}={v}" for k, v in preset.items()] + overrides)
        jobs = count_jobs(sweeps)
        self.study = Study(self.uri, experiment_id, cfg.study or "sweep", {"sweep_dir": str(config.hydra.sweep.dir)})
        parent_run_id = self.study.open()
        _active = self
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).log_param(parent_run_id, "sweep", str({**preset, "overrides": overrides}))
        resumed = find_interrupted_attempt(self.uri, experiment_id, self.study.name, parent_run_id) if cfg.resume else None
        workers = parallel_workers(config, jobs)
        environment = {PARENT_RUN_ENV: parent_run_id, INTERRUPTED_ATTEMPT_ENV: resumed or "",
                       STUDY_JOBS_ENV: str(jobs), STUDY_WORKERS_ENV: str(workers), LAUNCHER_ENV: ""}
        self.sweep_dir = str(config.hydra.sweep.dir)
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if "submitit" in launcher or "Joblib" in launcher:  # jobs in processes of their own
            from pipeline.interrupt import relay_stops, shield_started_processes

            shield_started_processes()  # they take a stop once ready for it; submitit's controllers leave it to them
            relay_stops(self._mark_stopped)  # first: a job starting meanwhile finds it
            if "SlurmLauncher" in launcher:  # the terminal's Ctrl-C does not reach jobs on the cluster
                relay_stops(functools.partial(_stop_slurm_jobs, str(config.hydra.launcher.submitit_folder)))
            else:  # a signal to this process alone reaches the jobs too
                relay_stops(_stop_local_jobs)
                from pipeline.processes import process_tags

                me = process_tags()
                environment[LAUNCHER_ENV] = f"{me['pid']} {me['pid_started']}"
        environment[STUDY_STARTED_ENV] = f"{time.time():.3f}"
        share_with_jobs(config, environment)
        self.started = time.monotonic()
        atexit.register(self.study.close, KeyboardInterrupt())  # a sweep that never reaches its end
        if stop_requested.is_set():  # came after the check above, before the relays could pass it on
            self.end_interrupted()
        _import_report_meanwhile()
        print(f"study {self.study.name}: {jobs} jobs, MLflow parent run {parent_run_id} ({self.uri})"
              + (f"; a job whose configuration finished in its unfinished attempt {resumed} keeps that run"
                 if resumed else ""), flush=True)

    def _mark_stopped(self) -> None:
        from pipeline.files import WriteError, write_text

        with contextlib.suppress(WriteError):  # the jobs already running get the signal anyway
            write_text(stop_marker(self.sweep_dir, self.study.run_id), "")

    def _close_with_orphans(self, error: BaseException) -> list[str]:
        """Ends the runs whose process died before closing them (as `end_status(error)` says), then the
        study; not interrupted by a second signal. Returns the runs it ended."""
        from pipeline.interrupt import ending
        from pipeline.tracking import end_orphaned_children

        ended: list[str] = []
        with ending():
            with contextlib.suppress(Exception):  # the store may be what failed; the study still ends
                ended = end_orphaned_children(self.uri, self.study.run_id, error)
            self.study.close(error)
        return ended

    def end_interrupted(self) -> None:
        """The jobs got the signal too; runs their launcher killed before they could close end KILLED
        (resumable), then the study; one line, exit 130."""
        self._close_with_orphans(KeyboardInterrupt())
        print("interrupted: the study ended KILLED; run the same command again to resume its runs",
              file=sys.stderr, flush=True)
        sys.exit(130)

    def end_failed(self, error: Exception) -> None:
        """The launcher failed (the OS killed a worker, a scheduler lost a job): the runs whose process died
        end FAILED with their checkpoints, then the study; one line, exit 1."""
        ended = self._close_with_orphans(error)
        then = (f"{len(ended)} run(s) whose process died ended FAILED; run the same command again to resume them"
                if ended else "run the same command again once that is fixed")
        print(f"error: the study failed: its launcher reported {error_summary(error).rstrip('.')}; {then}",
              file=sys.stderr, flush=True)
        sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global _failed_jobs
        from pipeline.interrupt import caused_by_stop, stop_requested, stopping_at_once
        from pipeline.report import build_report, print_report

        if self.study is None or self.study.run_id is None:
            return  # on_multirun_start failed; Hydra has already shown why
        if stop_requested.is_set():  # Ctrl-C reached the workers too
            self.end_interrupted()
        with as_first_job(config, multirun=True):
            cfg = validate(config)
        out_dir = report_folder(config, cfg)
        report_started = time.monotonic()
        try:
            with stopping_at_once():  # no epoch left to finish: a Ctrl-C now is for the report
                report = build_report(self.uri, Path(cfg.reports_dir), parent_run_id=self.study.run_id, out_dir=out_dir,
                                      at_study_end=True)
        except (KeyboardInterrupt, Exception) as error:
            if caused_by_stop(error):
                self._close_with_orphans(KeyboardInterrupt())
                print("interrupted: the study's jobs had all ended; its report stopped (the report folder is whole or as "
                      "it was) and the study ended KILLED: run the same command again to write the report (it keeps the "
                      "finished runs)", file=sys.stderr, flush=True)
                sys.exit(130)
            self.study.close(error)
            print(f"error: the study's report failed: {error}", file=sys.stderr, flush=True)
            # Hydra turns a callback's exception into a warning; a failed report must fail the command.
            sys.exit(1)
        from mlflow.tracking import MlflowClient

        print_report(report)
        print(f"study took {time.monotonic() - self.started:.0f} s", flush=True)
        _failed_jobs = len(report.failed)
        try:
            MlflowClient(self.uri).log_metric(self.study.run_id, "seconds_report", time.monotonic() - report_started)
            self.study.close()
        except Exception as error:  # noqa: BLE001 - Hydra would make it a warning, exit 0, and the study KILLED at exit
            self.study.close(error)  # FAILED if the store takes it now; the same command keeps its finished runs
            print(f"error: the study's end could not be recorded in the store ({error_summary(error)}); its runs "
                  "and report are kept: run the same command again to record it", file=sys.stderr, flush=True)
            sys.exit(1)
        os.environ.pop(PARENT_RUN_ENV, None)
