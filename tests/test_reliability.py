"""Failures of the store, the tracking server and the disk, and the report CLI's bad input."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (FAST_FLUSH, free_port, kill_server, report_held_while_drawn, run_cli, run_one, runs_of,
                      start_mlflow_server, start_one, wait_for_first_epoch, wait_until_drawing)
from pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_unreachable_tracking_server_fails_within_seconds(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    result = run_one(tmp_path, data_dir, f"http://127.0.0.1:{port}", "train.epochs=50")
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: tracking server http://127.0.0.1:{port} is unreachable")


def test_unwritable_store_is_a_clear_error(tmp_path, data_dir):
    """/proc is a filesystem nobody can create folders on, root included."""
    result = run_one(tmp_path, data_dir, "sqlite:////proc/fromlogits-store/mlflow.db", "train.epochs=1")
    assert result.returncode == 2
    assert "error: the MLflow store folder /proc/fromlogits-store is not writable" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("database", ["mlruns-here/mlflow.db", "~/mlflow.db"])
def test_a_store_with_a_relative_path_is_refused_before_anything_is_made(tmp_path, monkeypatch, database):
    """sqlite:///<relative path> (three slashes, or a '~' no shell expanded): the folder and the database were made,
    then MLflow failed on the artifacts' location ("relative path can't be expressed as a file URI")."""
    from pipeline.tracking import TrackingUnavailable, prepare_store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingUnavailable) as error:
        prepare_store(f"sqlite:///{database}", "fromlogits")
    assert str(error.value) == (f"tracking URI 'sqlite:///{database}' is not accepted: its database path {database!r} "
                                "is relative; expected an absolute one, sqlite:////<folder>/mlflow.db (four slashes)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["deleted", "removed for good"])
def test_metrics_for_a_run_deleted_while_it_trains_fail_at_once_naming_it(tmp_path, how):
    """A run deleted in the MLflow UI while it trained (or a study's parent run, at its report): every flush
    was retried for give_up_seconds (45 s) as if the store were away, then said "run the same command again when
    the store is back", though the store was fine. Retries cannot mend it: one line at once, saying what can."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MetricBuffer, RunDeleted, TrackingUnavailable, prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(prepare_store(uri, "fromlogits")).info.run_id
    if how == "deleted":
        client.delete_run(run_id)
    else:  # `mlflow gc` removes a deleted run from the store: its id is then unknown, as a made-up one is
        run_id = "0" * 32
    buffer = MetricBuffer(client, run_id, give_up_seconds=20)
    buffer.log({"loss": 1.0}, step=1)
    with pytest.raises(RunDeleted) as error:
        buffer.flush()
    assert not isinstance(error.value, TrackingUnavailable)
    assert str(error.value) == (
        f"run {run_id} was deleted from the MLflow store while this command logged to it (in the MLflow UI?); "
        f"nothing more can be logged to it: restore it (mlflow runs restore --run-id {run_id}) and run the same "
        "command again")
    working = client.create_run(client.get_experiment_by_name("fromlogits").experiment_id).info.run_id
    buffer = MetricBuffer(client, working)  # a run that is there takes the metrics as before
    buffer.log({"loss": 1.0}, step=1)
    buffer.flush()
    assert [m.value for m in client.get_metric_history(working, "loss")] == [1.0]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_store_is_one_line_and_left_as_it_is(tmp_path, damage):
    from pipeline.tracking import TrackingUnavailable, prepare_store

    database = tmp_path / "mlflow.db"
    prepare_store(f"sqlite:///{database}", "fromlogits")
    content = database.read_bytes()
    database.write_bytes(content[: len(content) // 3] if damage == "truncated" else b"not a database" * 100)
    damaged = database.read_bytes()
    with pytest.raises(TrackingUnavailable, match=f"the MLflow store sqlite:///{database} cannot be") as error:
        prepare_store(f"sqlite:///{database}", "fromlogits")
    assert "\n" not in str(error.value)
    assert database.read_bytes() == damaged  # nothing "repaired" or recreated over the user's file


def test_a_run_refused_for_its_store_keeps_no_run_folder(tmp_path, data_dir):
    """Hydra writes a run's folder (configs, log) before the run opens its store: a run refused there (exit 2,
    nothing ran) left that folder behind. What this command wrote goes; a colleague's file beside it stays."""
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"not a database" * 100)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("kept")
    for folder in (tmp_path / "new" / "run", shared):
        result = run_cli("pipeline.run", "train.epochs=1", f"data_dir={data_dir}", f"hydra.run.dir={folder}",
                         f"checkpoints_dir={tmp_path / 'checkpoints'}", env={"MLFLOW_TRACKING_URI": f"sqlite:///{database}"})
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow store sqlite:///{database} cannot be")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in shared.iterdir()) == ["notes.txt"] and (shared / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "checkpoints").exists()
    assert database.read_bytes() == b"not a database" * 100


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), unmounted after the test; skipped where mounting is not allowed."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


OPEN_A_STUDY = """
import sys, time
from pipeline.tracking import Study, prepare_store
while time.time() < float(sys.argv[2]):  # both processes past their imports, then at once
    time.sleep(0.001)
Study(sys.argv[1], prepare_store(sys.argv[1], "fromlogits"), "at-once").open()
"""


def test_two_commands_on_a_new_store_at_once_both_open_their_study(tmp_path):
    """Each would create the SQLite store's tables; MLflow's migrations racing failed one of them ('table
    latest_metrics already exists', 'duplicate column name: step'), in 4 of 4 tries before the fix."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    start = time.time() + 8
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_A_STUDY, uri, str(start)], cwd=PROJECT_ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-1500:] for e in errors]
    assert len([r for r in runs_of(uri) if r.data.tags.get("role") == "study"]) == 2


@pytest.mark.parametrize("fills, epochs, room_kib", [("metrics", 300, 40), ("model", 2, 90)])
def test_a_full_disk_under_the_store_is_one_line_and_leaves_no_run_running(tmp_path, data_dir, small_disk, fills,
                                                                          epochs, room_kib):
    """The disk fills while the run sends metrics, or while it writes its model's files. The model's case left
    the run RUNNING: its half-written files took the last of the room SQLite needed to end the run FAILED."""
    import mlflow

    from pipeline.tracking import prepare_store

    uri = f"sqlite:///{small_disk / 'mlruns' / 'mlflow.db'}"
    prepare_store(uri, "fromlogits")
    free_kib = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    (small_disk / "filler").write_bytes(b"\0" * 1024 * (free_kib - room_kib))  # the store's next writes find no room
    result = run_one(tmp_path, data_dir, uri, f"train.epochs={epochs}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: the MLflow store {uri} is out of space ((sqlite3.OperationalError) database or disk is full); "
        "free space there and run the same command again (an interrupted run's checkpoint is kept)"]
    (small_disk / "filler").unlink()
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED"  # ended, not left RUNNING
    models = mlflow.MlflowClient(uri).search_logged_models([run.info.experiment_id])
    if fills == "model":  # the case this parameter is for happened: the model's logging was under way
        assert [m.status.name for m in models] == ["FAILED"] and "test_nll" in run.data.metrics
        assert not list(small_disk.glob("mlruns/artifacts/models/*")), "the unfinished model's files are removed"


FILL_THE_DISK_THEN_FAIL = """
import errno, os, sys
from pipeline.tracking import prepare_store
from pipeline.tracking.runs import tracked_run
uri, filler = sys.argv[1:3]
try:
    with tracked_run(uri, prepare_store(uri, "fromlogits"), run_name="full") as run:
        print(run.info.run_id, flush=True)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        for size in (4096, 1):  # the disk fills to the last byte while the run is open: no room to end it
            try:
                while True:
                    os.write(fd, b"\\0" * size)
            except OSError:
                pass
        raise OSError(errno.ENOSPC, "No space left on device")
except Exception as error:
    print(error, flush=True)
"""


def test_a_run_that_cannot_be_ended_on_a_full_disk_says_so_and_the_next_command_ends_it(small_disk):
    """The disk under the store fills completely while a run is open: the run fails, and SQLite has no room to
    record its end either. The one line says so, and the next command on the store ends the run FAILED."""
    from pipeline.tracking import prepare_store

    uri = f"sqlite:///{small_disk / 'mlruns' / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", FILL_THE_DISK_THEN_FAIL, uri, str(small_disk / "filler")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, message = done.stdout.strip().splitlines()
    assert message.startswith(f"the MLflow store {uri} is out of space ("), message
    assert message.endswith("; the run could not be ended either: the next command on this store, on this machine, "
                            "marks it FAILED"), message
    (run,) = runs_of(uri)
    assert run.info.run_id == run_id and run.info.status == "RUNNING"  # as the message says: not ended

    (small_disk / "filler").unlink()
    prepare_store(uri, "fromlogits")  # what the next command on this store does first
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags["failed_reason"].startswith("stale: process ") and "ended without closing the run" in \
        run.data.tags["failed_reason"]


def test_a_full_disk_under_the_data_dir_is_one_line_and_keeps_no_part_of_the_dataset(small_disk):
    from pipeline.config import DatasetConfig
    from pipeline.data import DatasetUnavailable, fetch

    free_kib = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    (small_disk / "filler").write_bytes(b"\0" * 1024 * (free_kib - 100))  # less than the prepared sample needs
    data_dir = small_disk / "tfds"
    with pytest.raises(DatasetUnavailable) as error:
        fetch(DatasetConfig(), str(data_dir))
    message = str(error.value)
    assert message.startswith(f"cannot prepare mnist_sample in {data_dir} (") and "No space left on device" in message
    assert message.endswith("nothing of it was kept: fix that (e.g. free space there) or set data_dir= to another folder")
    assert [f.name for f in data_dir.rglob("*") if f.is_file()] == [".mnist_sample.lock"]


def test_a_full_disk_under_the_checkpoints_is_named_as_such_not_as_the_store(tmp_path, data_dir, small_disk):
    """The store has room; the checkpoint folder does not. The one line says which file could not be written."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    free_kib = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    (small_disk / "filler").write_bytes(b"\0" * 1024 * (free_kib - 40))  # less than a checkpoint
    result = run_one(tmp_path, data_dir, uri, "train.epochs=5", f"checkpoints_dir={small_disk / 'checkpoints'}")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: could not write {small_disk / 'checkpoints'}/") and "state.npz" in line, line
    assert line.endswith("No space left on device; its previous version, if any, is unchanged"), line
    (small_disk / "filler").unlink()
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]


def test_a_run_folder_on_a_full_disk_is_one_line_and_keeps_only_what_was_there(tmp_path, data_dir, small_disk):
    """Hydra makes the run's folder and writes its configs and log before the run starts; on a full disk that
    was Hydra's traceback, exit 1, and empty files left behind. Now one line, exit 2, no run, and the folders
    and files this command made are gone while a colleague's file in the same folder stays."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = small_disk / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("kept")
    free_kib = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    (small_disk / "filler").write_bytes(b"\0" * 1024 * free_kib)
    # A folder to make, named as the default one is (from Hydra's own config), and one that exists.
    for typed, folder in ((shared / "new" / "${hydra:runtime.choices.loss}", shared / "new" / "logits"), (shared, shared)):
        result = run_cli("pipeline.run", "train.epochs=1", f"data_dir={data_dir}", f"hydra.run.dir={typed}",
                         env={"MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines() == [
            f"error: could not write the run's folder {folder} (No space left on device); nothing ran and nothing "
            "of it was kept: fix that (e.g. free space there) or set hydra.run.dir= to another folder"]
        assert sorted(p.name for p in shared.iterdir()) == ["notes.txt"] and (shared / "notes.txt").read_text() == "kept"
    assert runs_of(uri) == []


def test_a_sweep_folder_on_a_full_disk_fails_the_study_in_one_line(tmp_path, data_dir, small_disk):
    """Hydra writes each job's config into the sweep folder before the job starts; on a full disk that fails
    in the launcher, outside any job. One line and exit 1, not Hydra's traceback; the study ends FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    free_kib = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    (small_disk / "filler").write_bytes(b"\0" * 1024 * free_kib)
    result = run_cli("pipeline.run", "-m", "loss=probs,logits", "seed=0", "train.epochs=1", f"data_dir={data_dir}",
                     "hydra/launcher=basic", f"reports_dir={tmp_path / 'reports'}", f"hydra.sweep.dir={small_disk / 'sweep'}",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: the study failed: its launcher reported OSError: [Errno 28] No space left on device; "
                    "run the same command again once that is fixed"), last
    assert [(r.data.tags.get("role"), r.info.status) for r in runs_of(uri)] == [("study", "FAILED")]


@pytest.fixture(scope="module")
def reported_study(tmp_path_factory, data_dir) -> tuple[str, Path]:
    """A finished two-run study `reported` and its report folder; the tests that use it leave both as they are."""
    folder = tmp_path_factory.mktemp("reported")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    study = run_cli("pipeline.run", "-m", "loss=probs,logits", "seed=0", "train.epochs=1", f"data_dir={data_dir}",
                    "hydra/launcher=basic", "study=reported", f"reports_dir={folder / 'reports'}",
                    f"hydra.sweep.dir={folder / 'sweep'}", env={"MLFLOW_TRACKING_URI": uri})
    assert study.returncode == 0, study.stderr[-3000:]
    return uri, folder / "reports" / "reported"


def test_a_full_disk_while_writing_the_report_leaves_no_partial_report(reported_study, monkeypatch):
    uri, report = reported_study
    before = {p.name: p.read_bytes() for p in report.iterdir()}

    from pipeline.files import WriteError
    from pipeline.report import build_report

    real_write_text = Path.write_text

    def disk_full_on_html(self, *args, **kwargs):
        if "report.html" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_on_html)
    with pytest.raises(WriteError, match="No space left on device"):
        build_report(uri, report.parent, study="reported")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # the previous report, untouched
    assert [p.name for p in report.parent.iterdir()] == ["reported"]  # no partial folder left behind


def test_ctrl_c_while_a_report_is_rebuilt_is_one_line_and_leaves_the_report_as_it_was(reported_study, tmp_path):
    """`python -m pipeline.report` stopped while it draws the new report: it printed Python's KeyboardInterrupt
    traceback; now one line, exit 130, and the previous report is as it was, with no partial folder beside it."""
    import signal

    uri, report = reported_study
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    drawing = tmp_path / "drawing"
    command = report_held_while_drawn(drawing, "pipeline.report", "--study", "reported", "--tracking-uri", uri,
                                      "--out", str(report))
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_drawing(drawing, process)
    assert list(report.parent.glob(f".{report.name}.partial-*"))  # inside the new report's staging folder
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the report folder is whole or as it was"), stderr
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert [p.name for p in report.parent.iterdir()] == ["reported"]


def test_a_stop_that_code_turns_into_another_error_still_ends_the_command_as_interrupted(tmp_path):
    """A Ctrl-C that lands while a C extension is being imported (matplotlib's Agg backend, as the report starts
    drawing) comes out of the import as "ImportError: initialization failed": the report command then printed that
    traceback and exited 1. An error raised once a stop was asked for is the stop: one line, exit 130."""
    script = tmp_path / "stopped.py"
    script.write_text(
        "import os, signal, time\n"
        "from pipeline.cli import run_command\n"
        "def main():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(30)\n"
        "    except KeyboardInterrupt:\n"
        "        raise ImportError('initialization failed')  # what pybind11's module init makes of it\n"
        "    return 0\n"
        "run_command(main, 'nothing was written')\n")
    result = subprocess.run([sys.executable, str(script)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["interrupted: nothing was written"]


STOPPED_WHILE_LOGGING = """
import os, runpy, signal, sys, time
import pipeline.stages as stages

log_model = stages.log_model

def stopped_in_an_import(clf, x_example):  # the model logging's first import, as a Ctrl-C twice lands there
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first stop: after this epoch (training has ended)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # the second: at once
        time.sleep(30)
    except KeyboardInterrupt:
        raise ImportError("initialization failed")  # what a C extension's module init makes of it
    return log_model(clf, x_example)

stages.log_model = stopped_in_an_import
sys.argv[0] = "pipeline.run"
runpy.run_module("pipeline.run", run_name="__main__")
"""


def test_a_second_stop_that_code_turns_into_another_error_ends_the_run_killed(tmp_path, data_dir):
    """The same in a run: a second Ctrl-C (stop at once) landing in an import while the run logs its model was
    an ImportError, so the run ended FAILED with that error and the command printed its traceback (exit 1).
    An error once a stop at once was delivered is the stop: the run ends KILLED, one line, exit 130; and the same
    command resumes it to FINISHED. After only the first stop (after this epoch), an error is still an error."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_WHILE_LOGGING)
    overrides = [f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'out'}", f"checkpoints_dir={tmp_path / 'checkpoints'}",
                 "train.epochs=2"]
    result = subprocess.run([sys.executable, str(script), *overrides], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ImportError" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: the run ended KILLED"), result.stderr[-3000:]
    (run,) = runs_of(uri)
    assert run.info.status == "KILLED" and "error" not in run.data.tags
    again = run_one(tmp_path, data_dir, uri, "train.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED"


AS_TYPED = ["--study", "it's"]  # the one case run as a user types it


@pytest.mark.parametrize("args,expected", [
    (AS_TYPED, "error: --study=\"it's\" is not accepted: expected 1 to 64 letters"),
    (["--study", ""], "error: --study='' is not accepted: expected 1 to 64 letters"),
    (["--parent-run-id", "deadbeef"], "error: --parent-run-id 'deadbeef' is not a run in this store"),
    # "$RUN" with RUN unset: it was "give --study NAME or --parent-run-id ID", though the option was given
    (["--parent-run-id", ""], "error: --parent-run-id='' is not accepted: it is empty; expected the id of a study's "
                              "parent run"),
    # argparse's own errors: its usage block came first, and an unknown option was not told what is accepted
    (["--stuyd", "x"], "error: unrecognized arguments: --stuyd x; usage: python -m pipeline.report [-h] [--study STUDY] "
                       "[--parent-run-id PARENT_RUN_ID]"),
    ([], "error: give --study NAME or --parent-run-id ID; usage: python -m pipeline.report [-h] [--study STUDY]"),
    # A report folder that cannot be: named before anything is read (it was "could not write to /dev/null: File exists")
    (["--study", "x", "--out", "/dev/null/report"], "error: --out='/dev/null/report' is not accepted: /dev/null is not a "
                                                    "folder; expected a folder that exists or can be created and written"),
    (["--study", "x", "--out", "/proc/fromlogits-report"], "error: --out='/proc/fromlogits-report' is not accepted: /proc "),
    (["--study", "x", "--out", ""], "error: --out='' is not accepted: it is empty; expected the path of a folder"),
])
def test_report_cli_bad_input_is_one_line(tmp_path, args, expected, capsys):
    """The first case as a user types it; the others through the same main(), in this process."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from pipeline.report.__main__ import main
    from pipeline.tracking import prepare_store

    prepare_store(uri, "fromlogits")
    capsys.readouterr()  # MLflow's notices about creating the store: the test's, not the command's
    if args is AS_TYPED:
        result = run_cli("pipeline.report", *args, "--tracking-uri", uri)
        code, stderr = result.returncode, result.stderr
    else:
        try:
            code = main([*args, "--tracking-uri", uri])
        except SystemExit as exit_:  # argparse's errors exit from inside parse_args
            code = exit_.code
        stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), stderr


def test_report_cli_never_creates_a_store_where_none_is(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    result = run_cli("pipeline.report", "--study", "x", "--tracking-uri", f"sqlite:///{missing}")
    assert result.returncode == 2 and f"there is no MLflow store at {missing}" in result.stderr
    assert not missing.parent.exists()



def test_report_cli_refuses_an_empty_store_uri_which_read_the_local_store(capsys):
    """--tracking-uri "$SERVER" with SERVER unset reported on the project's local store as if none was given."""
    from pipeline.report.__main__ import main

    assert main(["--study", "seed_mnist", "--tracking-uri", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --tracking-uri='' is not accepted: it is empty; expected a store's URI (sqlite:///<file>, "
        "http://<host>:<port>, …), or leave it out for $MLFLOW_TRACKING_URI, else the local store"]


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_tracking_uri_variable_is_refused_not_read_as_the_local_store(monkeypatch, capsys, empty):
    """`export MLFLOW_TRACKING_URI=$SERVER` with SERVER unset: runs, studies and reports went to the local store
    as if the variable were unset. A tracking.uri given on the command line still wins over it."""
    from pipeline.report.__main__ import main
    from pipeline.tracking import TrackingUnavailable, tracking_uri

    expected = (f"MLFLOW_TRACKING_URI={empty!r} is not accepted: it is set but empty; expected a store's URI "
                "(sqlite:///<file>, http://<host>:<port>, …), or the variable unset for the local store in mlruns/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty)
    with pytest.raises(TrackingUnavailable, match=re.escape(expected)):
        tracking_uri()
    assert tracking_uri("sqlite:////elsewhere/mlflow.db") == "sqlite:////elsewhere/mlflow.db"
    assert main(["--study", "seed_mnist"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected}"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri().endswith("/mlruns/mlflow.db")


def test_a_tracking_server_that_hangs_as_the_run_ends_is_one_line_and_the_same_command_ends_the_run(tmp_path, data_dir):
    """The server stops answering once the run's model is written: whichever of the run's last requests (the model's,
    the stage timings, the run's end) meets it, the run fails in one line, exit 2, with its checkpoint kept. It was
    MLflow's traceback, exit 1, and the run left RUNNING. Once the server answers, the same command ends the run
    FINISHED, the same run."""
    import mlflow

    with start_mlflow_server(tmp_path) as (url, server):
        from pipeline.tracking import prepare_store

        prepare_store(url, "fromlogits")
        process = start_one(tmp_path, data_dir, url, "train.epochs=2", "tracking.timeout_seconds=2")
        deadline = time.monotonic() + 120
        while not list((tmp_path / "artifacts").glob("**/MLmodel")):
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.02)
        os.killpg(server.pid, signal.SIGSTOP)
        stdout, stderr = process.communicate(timeout=120)
        os.killpg(server.pid, signal.SIGCONT)
        assert process.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: the tracking store did not answer"), last
        assert "the run's checkpoint is kept: run the same command again when the store is back" in last, last
        assert list((tmp_path / "checkpoints").glob("*/state.npz"))

        again = run_one(tmp_path, data_dir, url, "train.epochs=2", "tracking.timeout_seconds=2")
        assert again.returncode == 0, again.stderr[-3000:]
        (run,) = runs_of(url)
        assert f"resuming run {run.info.run_id}" in again.stdout
        assert run.info.status == "FINISHED" and "test_nll" in run.data.metrics
        # A model the hang left unfinished is not kept beside the one the same command logged.
        models = mlflow.MlflowClient(url).search_logged_models([run.info.experiment_id],
                                                               filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.status.name for m in models] == ["READY"]


def test_a_run_whose_end_the_server_does_not_answer_says_so_in_one_line(tmp_path, monkeypatch):
    """The last request of a run that trained and logged everything: ending it. A server that hangs right then made
    MLflow's traceback; now one line says the run is stored but not ended, and what ends it."""
    import mlflow

    from pipeline.tracking import prepare_store, tracked_run
    from pipeline.tracking.runs import StoreNotAnswering

    with start_mlflow_server(tmp_path) as (url, server):
        experiment_id = prepare_store(url, "fromlogits")  # sets the pipeline's request limits: shortened below
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(StoreNotAnswering) as raised:
            with tracked_run(url, experiment_id, "ends-unanswered") as run:
                os.killpg(server.pid, signal.SIGSTOP)
        os.killpg(server.pid, signal.SIGCONT)
        assert str(raised.value).startswith("the tracking store did not answer as the run ended (API request to ")
        assert str(raised.value).endswith("; the run's checkpoint is kept: run the same command again when the store is "
                                          "back; the run could not be ended: the next command on this store, on this "
                                          "machine, marks it FAILED")
        assert mlflow.MlflowClient(url).get_run(run.info.run_id).info.status == "RUNNING"  # as the line says
        assert mlflow.active_run() is None  # nothing left for MLflow's exit handler to wait on


def test_a_report_whose_artifact_server_does_not_answer_fails_in_one_line_not_without_its_diagrams(tmp_path,
                                                                                                     monkeypatch):
    """Runs' artifacts served by a server of their own (`mlflow server --artifacts-only`), which hangs while the
    report reads them: each run's reliability.json read as missing, and the report was drawn without its
    reliability diagrams, saying nothing (MLflow reports a file it could not download as one it could not find).
    Now the report fails in one line saying what did not answer."""
    import mlflow

    from pipeline.report.runs import read_study
    from pipeline.tracking import TrackingUnavailable

    with start_mlflow_server(tmp_path / "a", "--artifacts-only") as (artifacts_url, artifact_server), \
            start_mlflow_server(tmp_path / "t", "--no-serve-artifacts", "--default-artifact-root",
                                f"{artifacts_url}/api/2.0/mlflow-artifacts/artifacts") as (url, _):
        client = mlflow.MlflowClient(url)
        experiment_id = client.create_experiment("fromlogits")
        parent = client.create_run(experiment_id, tags={"role": "study", "study": "served"}).info.run_id
        child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "formulation": "logits",
                                                       "seed": "0"}).info.run_id
        client.log_dict(child, {"count": [1]}, "reliability.json")
        client.set_terminated(child)
        assert read_study(url, "fromlogits", parent_run_id=parent).finished[0].reliability == {"count": [1]}
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.killpg(artifact_server.pid, signal.SIGSTOP)
        with pytest.raises(TrackingUnavailable, match=f"^the tracking store did not answer while the report read the "
                                                      f"runs of parent run {parent} \\(API request to "):
            read_study(url, "fromlogits", parent_run_id=parent)


def test_a_parent_run_the_server_does_not_return_is_not_called_missing(tmp_path, monkeypatch):
    """A study's report looks its parent run up by id. A server that did not answer made the study end with "the
    study's report failed: --parent-run-id '…' is not a run in this store": a wrong reason, of a run that exists."""
    import mlflow

    from pipeline.report.runs import StudyNotFound, find_parent
    from pipeline.tracking import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with start_mlflow_server(tmp_path) as (url, server):
        client = mlflow.MlflowClient(url)
        run_id = client.create_run(client.create_experiment("fromlogits")).info.run_id
        assert find_parent(client, "fromlogits", None, run_id)[0].info.run_id == run_id
        with pytest.raises(StudyNotFound, match="--parent-run-id '0123456789abcdef0123456789abcdef' is not a run"):
            find_parent(client, "fromlogits", None, "0123456789abcdef0123456789abcdef")
        os.killpg(server.pid, signal.SIGSTOP)
        with pytest.raises(TrackingUnavailable, match=f"^the tracking store did not return run {run_id} \\(API request .*…\\)$"):
            find_parent(client, "fromlogits", None, run_id)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_tracking_server_that_dies_or_hangs_mid_run_fails_the_run_within_its_limit(tmp_path, data_dir, fault):
    """Killed, or stopped (a frozen machine, a network that drops packets: requests time out instead of being
    refused), at the epoch a real server has seen; the run gives up after tracking.give_up_seconds, in one line,
    keeps its checkpoint; once the server is back, the next invocation marks the run FAILED.
    A hung server took 146 s with the defaults (45 s): the window opened only once the first request had timed
    out, the last flush of the failed run waited a whole window again, and the run then spent a request on tagging
    and another on ending its run on the store it had given up on (and MLflow's exit handler a third)."""
    port = free_port()
    timeout, give_up = 2, 8
    limits = [f"tracking.timeout_seconds={timeout}", f"tracking.give_up_seconds={give_up}"]
    with start_mlflow_server(tmp_path, port=port) as (url, server):
        from pipeline.tracking import prepare_store

        prepare_store(url, "fromlogits")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'out'}",
             f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, "train.epochs=3000", *limits],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": url})
        wait_for_first_epoch(tmp_path / "checkpoints")
        if fault == "dies":
            kill_server(server)
        else:
            os.killpg(server.pid, signal.SIGSTOP)  # the server and its worker (their own process group)
        failed = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        gave_up = time.monotonic() - failed
    assert process.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the tracking store did not accept metrics for") and "checkpoint is kept" in last
    assert last.endswith("; the run could not be ended either: the next command on this store, on this machine, "
                         "marks it FAILED")
    # The limit, the request under way (a timeout, tried twice), one quick request ending the run, the exit.
    assert gave_up < give_up + 2 * timeout + 1 + 3, gave_up
    assert list((tmp_path / "checkpoints").glob("*/state.npz"))
    if fault == "hangs":
        return  # what follows is the same for both: the next command finds the run's process gone

    with start_mlflow_server(tmp_path, port=port) as (url, _):
        nxt = run_one(tmp_path, data_dir, url, "train.epochs=1", "seed=1", "resume=false", name="next")
        assert nxt.returncode == 0 and "marked 1 stale RUNNING run(s) FAILED" in nxt.stdout
        (stale,) = [r for r in runs_of(url) if r.data.params.get("seed") == "0"]
        assert stale.info.status == "FAILED"
