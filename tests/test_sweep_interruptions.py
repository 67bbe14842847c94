"""Stopping and resuming a parallel sweep: Ctrl-C to its terminal or its launching process, a worker or the
launching process killed hard (a file of its own, so the test workers share the slow files evenly)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import (FAST_FLUSH, interrupt_sweep, report_held_while_drawn, run_with_a_stop_pending, runs_of,
                      start_training_sweep, study_runs, wait_until_drawing)
from pipeline.config import PROJECT_ROOT
from pipeline.processes import process_alive

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c", "launching-process-only"])
def test_ctrl_c_stops_a_parallel_sweep_in_one_line_per_job(tmp_path, whole_group):
    """Ctrl-C reaches joblib's workers too; a SIGINT to the launching process alone is relayed to them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped = interrupt_sweep(tmp_path, uri, "train.epochs=400", whole_group=whole_group)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert "Traceback" not in stopped.stderr and len(lines) <= 1 + 2 + 1, lines  # the notice, one per job, the study
    assert lines[-1].startswith("interrupted: the study ended KILLED")
    parent, children = study_runs(uri)
    assert parent.info.status == "KILLED" and children and all(r.info.status == "KILLED" for r in children)


@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c", "launching-process-only"])
def test_a_second_ctrl_c_stops_a_parallel_sweep_at_once_and_leaves_every_run_resumable(tmp_path, whole_group):
    """Ctrl-C twice ("again to stop now"): joblib gives up on its workers, whose runs would stay RUNNING;
    the command still ends in one line (exit 130, no traceback), every run KILLED with its checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped = interrupt_sweep(tmp_path, uri, "train.epochs=400", whole_group=whole_group, times=2)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("interrupted: the study ended KILLED"), stopped.stderr[-3000:]
    parent, children = study_runs(uri)
    assert parent.info.status == "KILLED"
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in children), \
        [(r.info.run_name, r.info.status) for r in children]
    assert len(list((tmp_path / "checkpoints").glob("*/state.npz"))) == 2


def test_a_terminal_that_hangs_up_stops_a_parallel_sweep_as_ctrl_c_does(tmp_path):
    """An ssh connection that drops, or a terminal window closed, hangs up the sweep's terminal: SIGHUP to its
    process group, and writing to the terminal fails (EIO). That killed the launching process and its workers
    outright, their runs left RUNNING; now it stops the sweep as Ctrl-C does, with no terminal to say so to."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    controller, terminal = pty.openpty()
    try:
        process = start_training_sweep(tmp_path, uri, "train.epochs=400", terminal=terminal)
    finally:
        os.close(terminal)
    try:
        shown, deadline = b"", time.monotonic() + 1
        while time.monotonic() < deadline:  # what it has shown so far (a pseudo-terminal holds only so much)
            if select.select([controller], [], [], 0.1)[0]:
                shown += os.read(controller, 65536)
        assert b"study" in shown, shown[-2000:]  # the sweep's terminal is this one
        os.close(controller)  # it hangs up
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    parent, children = study_runs(uri)
    assert parent.info.status == "KILLED"
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in children), \
        [(r.info.run_name, r.info.status) for r in children]
    assert len(list((tmp_path / "checkpoints").glob("*/state.npz"))) == 2  # each resumes from its last epoch


@pytest.mark.parametrize("multirun", [True, False], ids=["sweep", "run"])
def test_ctrl_c_while_a_command_starts_runs_nothing(tmp_path, data_dir, multirun):
    """A Ctrl-C that came while a study command started up (before its study opened) was acknowledged ("stopping
    the study …") and then lost: the stop reached no job, so the whole study trained, and only then ended KILLED
    (a single run opened and trained an epoch). Here SIGINT is pending when the command installs its handlers, the
    earliest it can be taken: nothing is opened or trained, one line, exit 130."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    what = ["-m", "loss=probs,logits", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else [
        "loss=probs", f"hydra.run.dir={tmp_path / 'run'}"]
    command = [sys.executable, "-m", "pipeline.run", *what, "seed=0", "train.epochs=400", FAST_FLUSH, f"data_dir={data_dir}",
               f"reports_dir={tmp_path / 'reports'}", f"checkpoints_dir={tmp_path / 'checkpoints'}", f"tracking.uri={uri}"]
    stopped = run_with_a_stop_pending(command, PROJECT_ROOT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"interrupted: the {'sweep' if multirun else 'run'} was not started; nothing ran", lines
    assert "Traceback" not in stopped.stderr and len(lines) == 2, lines  # the notice, then that line
    assert runs_of(uri) == []


def test_ctrl_c_between_the_studies_of_a_command_starts_no_further_study(tmp_path, data_dir):
    """`experiment=a,b` runs its studies in turn. A Ctrl-C after the first study's jobs (while its report is
    written, or as it ends) opened the next study anyway, which then ended KILLED: the stop is for the command."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "pipeline.run", "-m", "experiment=seed_logistic,seed_mnist",
               "hydra.sweeper.params.loss=logits", "hydra.sweeper.params.seed=0", "train.epochs=2",
               f"data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}/${{study}}",
               f"reports_dir={tmp_path / 'reports'}", f"checkpoints_dir={tmp_path / 'checkpoints'}", f"tracking.uri={uri}"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:  # the first study's last line
            if line.startswith("study took"):
                process.send_signal(signal.SIGINT)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: not started: seed_mnist; the same command runs it after seed_logistic"
    assert "study seed_mnist" not in stdout
    studies = {r.info.run_name: r.info.status for r in runs_of(uri) if r.data.tags.get("role") == "study"}
    assert studies == {"study-seed_logistic": "FINISHED"}


def test_ctrl_c_while_a_study_writes_its_report_stops_at_once_and_the_same_command_writes_it(tmp_path, data_dir):
    """Once a study's jobs had ended, a Ctrl-C said "stopping the study after the current epoch of its jobs", then
    let the report finish and exited 0: the stop was lost. Now it stops the report at once (nothing half-written),
    ends the study KILLED with its runs FINISHED, says so in one line (exit 130), and the same command writes the
    report, keeping the run instead of training it again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reports = tmp_path / "reports"
    arguments = ["-m", "experiment=seed_logistic", "hydra.sweeper.params.loss=logits", "hydra.sweeper.params.seed=0",
                 "train.epochs=2", f"data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"reports_dir={reports}",
                 f"checkpoints_dir={tmp_path / 'checkpoints'}", f"tracking.uri={uri}"]
    drawing = tmp_path / "drawing"
    process = subprocess.Popen(report_held_while_drawn(drawing, "pipeline.run", *arguments), cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_drawing(drawing, process)  # the jobs have ended; the report is inside its staging folder
        assert list(tmp_path.glob("reports/.seed_logistic.partial-*"))
        os.killpg(process.pid, signal.SIGINT)  # the terminal's Ctrl-C: the idle workers get it too
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert lines == ["interrupted: the study's jobs had all ended; its report stopped (the report folder is whole or as it "
                     "was) and the study ended KILLED: run the same command again to write the report (it keeps the "
                     "finished runs)"], lines
    assert list(reports.iterdir()) == []
    study, (run,) = study_runs(uri)
    assert (study.info.status, run.info.status) == ("KILLED", "FINISHED")

    again = subprocess.run([sys.executable, "-m", "pipeline.run", *arguments], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"kept run {run.info.run_id}" in again.stdout + again.stderr
    assert (reports / "seed_logistic" / "report.html").is_file()
    assert [r.info.run_id for r in runs_of(uri) if r.data.tags.get("role") != "study"] == [run.info.run_id]


def test_a_sweep_whose_worker_then_whose_launcher_is_killed_resumes_every_epoch_exactly_once(tmp_path):
    """A flaky machine kills a sweep twice; each time the same command picks up where it stopped.

    1. The OOM killer SIGKILLs one of joblib's workers mid-run: joblib gives up on the sweep and kills the
       other worker. The command ends in one line (exit 1), not joblib's traceback; the dead workers' runs
       end FAILED with their checkpoints, not RUNNING; the study FAILED.
    2. The same command resumes them; then its launching process is SIGKILLed, which gives it no chance to
       stop its study. joblib's workers notice within a second: their runs stop at the end of the epoch and
       end KILLED with a checkpoint, the dead study's parent run is marked FAILED, and the workers exit
       instead of idling for minutes with TensorFlow loaded.
    3. The same command finishes both runs, with every epoch exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 150  # about 4 s of training a run here, several times the second the jobs take to notice
    client = mlflow.MlflowClient(uri)
    logged = lambda run_id: len(client.get_metric_history(run_id, "val_nll_float64"))  # noqa: E731

    process = start_training_sweep(tmp_path, uri, epochs=epochs)
    _, running = study_runs(uri)
    victim = next(r for r in running if r.info.status == "RUNNING")
    os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the study failed: its launcher reported TerminatedWorkerError: "), last
    assert "ended FAILED; run the same command again" in last, last
    parent, children = study_runs(uri)
    assert parent.info.status == "FAILED" and len(children) == 2
    assert client.get_run(victim.info.run_id).info.status == "FAILED"
    assert "ended without closing the run" in client.get_run(victim.info.run_id).data.tags["failed_reason"]
    assert not [r.info.run_name for r in children if r.info.status == "RUNNING"]
    unfinished = {r.info.run_id: logged(r.info.run_id) for r in children if r.info.status != "FINISHED"}
    assert victim.info.run_id in unfinished

    again = subprocess.Popen(process.args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "MLFLOW_TRACKING_URI": uri}, start_new_session=True)
    deadline = time.monotonic() + 180
    while not all(client.get_run(run_id).info.status == "RUNNING" and logged(run_id) > before
                  for run_id, before in unfinished.items()):
        if time.monotonic() > deadline or again.poll() is not None:
            os.killpg(again.pid, signal.SIGKILL)
            pytest.fail(f"the runs did not resume: {again.communicate(timeout=60)[1][-3000:]}")
        time.sleep(0.2)
    again.kill()
    # The workers inherited the command's output: it closes when the last of them has exited.
    _, stderr = again.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("the study's launching process") == len(unfinished), stderr[-3000:]  # one line per job
    parent, children = study_runs(uri, latest=True)
    assert parent.info.status == "FAILED"
    resumed = [r for r in children if r.info.run_id in unfinished]
    assert len(resumed) == len(unfinished) and all(r.info.status == "KILLED" for r in resumed)
    assert all(0 < logged(r.info.run_id) < epochs for r in resumed)
    assert not any(process_alive(r.data.tags["pid"], r.data.tags["pid_started"]) for r in resumed)
    assert len(list((tmp_path / "checkpoints").glob("*/state.npz"))) == len(unfinished)

    finished = subprocess.run(process.args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert all(f"resuming run {run_id}" in finished.stdout for run_id in unfinished)
    for run_id in unfinished:
        steps = [m.step for m in client.get_metric_history(run_id, "val_nll_float64")]
        assert sorted(steps) == list(range(1, epochs + 1))  # none missing, none twice
        assert client.get_run(run_id).info.status == "FINISHED"
