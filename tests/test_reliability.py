"""Reproducibility, interruption and resume, stale runs, and failures of the store and the disk."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, kill_server, run_cli, runs_of, start_mlflow_server
from pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

TIMING = ("seconds_", "epoch_seconds", "epoch_train_seconds")
# Checkpoints follow each metric batch: short batches give a checkpoint within a few epochs.
FAST_FLUSH = "tracking.flush_seconds=0.3"


def all_metrics(uri: str, run) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(uri)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            for key in run.data.metrics if not key.startswith(TIMING)}


def cli(tmp_path: Path, data_dir: str, uri: str, *overrides: str, name: str = "out"):
    return run_cli("pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / name}",
                   f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, *overrides, env={"MLFLOW_TRACKING_URI": uri})


def test_same_config_and_seed_give_identical_metrics_and_weights(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("first", "second"):
        assert cli(tmp_path, data_dir, uri, "train.epochs=3", "loss=probs_naive", "seed=7", name=name).returncode == 0
    first, second = sorted(runs_of(uri), key=lambda r: r.info.start_time)
    a, b = all_metrics(uri, first), all_metrics(uri, second)
    assert set(a) == set(b) and len(a) > 25
    assert a == b  # every metric, every epoch, bit for bit
    tags = first.data.tags
    assert tags["dataset_sha256"].startswith("246e0c30") and tags["dataset_version"] == "1.0.0"
    assert "tensorflow" in tags["versions"] and "keras==" in tags["versions"]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    expected = "unknown" if status.returncode else str(bool(status.stdout.strip())).lower()
    assert tags["git_dirty"] == expected


def start(tmp_path, data_dir, uri, *overrides, name="out"):
    from pipeline.tracking import prepare_store

    prepare_store(uri, "fromlogits")  # the test reads the store while the run writes it: create it first
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / name}",
         f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, *overrides],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )


def wait_for_training(tmp_path: Path, timeout: float = 120) -> None:
    """Until the run has finished an epoch: its checkpoint (written after every epoch) exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((tmp_path / "checkpoints").glob("*/state.npz")):
            return
        time.sleep(0.2)
    pytest.fail("the run did not finish an epoch in time")


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_result(tmp_path, data_dir):
    config = ["train.epochs=80", "seed=2"]
    reference_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    assert cli(tmp_path, data_dir, reference_uri, *config, "resume=false", name="reference").returncode == 0
    (reference,) = runs_of(reference_uri)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start(tmp_path, data_dir, uri, *config)
    wait_for_training(tmp_path)
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - stopped < 10  # promptly: at the end of the current epoch
    assert process.returncode == 130 and "run the same command again to resume" in stderr
    (killed,) = runs_of(uri)
    done = len(mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "val_nll_float64"))
    assert killed.info.status == "KILLED" and 1 <= done < 80
    assert list((tmp_path / "checkpoints").glob("*/state.npz"))

    resumed = cli(tmp_path, data_dir, uri, *config, name="resumed")
    assert resumed.returncode == 0 and f"resuming run {killed.info.run_id}" in resumed.stdout
    (finished,) = runs_of(uri)  # the same run, not a new one
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert all_metrics(uri, finished)["test_nll"] == all_metrics(reference_uri, reference)["test_nll"]
    assert all_metrics(uri, finished)["val_nll_float64"] == all_metrics(reference_uri, reference)["val_nll_float64"]
    assert not list((tmp_path / "checkpoints").glob("*/state.npz"))  # finished: nothing left to resume


def test_a_run_killed_with_sigkill_is_marked_failed_by_the_next_invocation(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start(tmp_path, data_dir, uri, "train.epochs=400")
    wait_for_training(tmp_path)
    process.kill()
    process.wait(timeout=30)
    (orphan,) = runs_of(uri)
    assert orphan.info.status == "RUNNING"

    nxt = cli(tmp_path, data_dir, uri, "train.epochs=1", "seed=1", "resume=false", name="next")
    assert nxt.returncode == 0 and "marked 1 stale RUNNING run(s) FAILED" in nxt.stdout
    orphan = mlflow.MlflowClient(uri).get_run(orphan.info.run_id)
    assert orphan.info.status == "FAILED" and "ended without closing the run" in orphan.data.tags["failed_reason"]


def test_unreachable_tracking_server_fails_within_seconds(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    result = cli(tmp_path, data_dir, f"http://127.0.0.1:{port}", "train.epochs=50")
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: tracking server http://127.0.0.1:{port} is unreachable")


def test_unwritable_store_is_a_clear_error(tmp_path, data_dir):
    """/proc is a filesystem nobody can create folders on, root included."""
    result = cli(tmp_path, data_dir, "sqlite:////proc/fromlogits-store/mlflow.db", "train.epochs=1")
    assert result.returncode == 2
    assert "error: the MLflow store folder /proc/fromlogits-store is not writable" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_full_disk_while_writing_the_report_leaves_no_partial_report(tmp_path, data_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = run_cli("pipeline.run", "-m", "loss=probs,logits", "seed=0", "train.epochs=1", f"data_dir={data_dir}",
                    "study=full", f"reports_dir={tmp_path / 'reports'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    env={"MLFLOW_TRACKING_URI": uri})
    assert study.returncode == 0
    report = tmp_path / "reports" / "full"
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
        build_report(uri, tmp_path / "reports", study="full")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # the previous report, untouched
    assert [p.name for p in report.parent.iterdir()] == ["full"]  # no partial folder left behind


def interrupt_once(tmp_path, data_dir, uri, *config):
    """A run of `config` stopped by SIGTERM after its first persisted epoch: returns the KILLED run."""
    process = start(tmp_path, data_dir, uri, *config)
    wait_for_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130
    (killed,) = runs_of(uri)
    assert killed.info.status == "KILLED"
    return killed


def test_a_deleted_run_does_not_block_its_configuration(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=80", "seed=3"]
    killed = interrupt_once(tmp_path, data_dir, uri, *config)
    mlflow.MlflowClient(uri).delete_run(killed.info.run_id)
    rerun = cli(tmp_path, data_dir, uri, *config, "train.epochs=2", name="rerun")
    # epochs changed too: a new configuration; the same one must also start over cleanly
    again = cli(tmp_path, data_dir, uri, *config, name="again")
    assert rerun.returncode == 0 and again.returncode == 0, again.stderr[-2000:]
    assert "discarding the checkpoint" in again.stdout and killed.info.run_id in again.stdout
    assert [r.info.status for r in runs_of(uri)] == ["FINISHED", "FINISHED"]


def test_a_checkpoint_only_resumes_into_the_experiment_it_belongs_to(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=80", "seed=4"]
    killed = interrupt_once(tmp_path, data_dir, uri, *config)
    other = cli(tmp_path, data_dir, uri, *config, "tracking.experiment=other", "train.epochs=3", name="other")
    assert other.returncode == 0 and "resuming" not in other.stdout
    (moved,) = runs_of(uri, "other")
    assert moved.info.run_id != killed.info.run_id and moved.info.status == "FINISHED"
    assert mlflow.MlflowClient(uri).get_run(killed.info.run_id).info.status == "KILLED"  # still resumable at home


def test_after_sigkill_the_resumed_run_has_every_epoch_exactly_once(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=150", "seed=5"]
    process = start(tmp_path, data_dir, uri, *config)
    wait_for_training(tmp_path)
    time.sleep(0.5)
    process.kill()
    process.wait(timeout=30)
    resumed = cli(tmp_path, data_dir, uri, *config, name="resumed")
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-2000:]
    (run,) = runs_of(uri)
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_nll_float64")]
    assert sorted(steps) == list(range(1, 151))  # none missing, none twice
    assert run.info.status == "FINISHED" and "failed_reason" not in run.data.tags


@pytest.mark.parametrize("args,expected", [
    (["--study", "it's"], "error: --study=\"it's\" is not accepted: expected 1 to 64 letters"),
    (["--parent-run-id", "deadbeef"], "error: --parent-run-id 'deadbeef' is not a run in this store"),
])
def test_report_cli_bad_input_is_one_line(tmp_path, args, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from pipeline.tracking import prepare_store

    prepare_store(uri, "fromlogits")
    result = run_cli("pipeline.report", *args, "--tracking-uri", uri)
    assert result.returncode == 2 and result.stderr.strip() == expected.strip() or \
        result.stderr.strip().startswith(expected), result.stderr


def test_report_cli_never_creates_a_store_where_none_is(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    result = run_cli("pipeline.report", "--study", "x", "--tracking-uri", f"sqlite:///{missing}")
    assert result.returncode == 2 and f"there is no MLflow store at {missing}" in result.stderr
    assert not missing.parent.exists()


def test_a_tracking_server_that_dies_mid_run_fails_the_run_within_its_limit(tmp_path, data_dir):
    """Killed at the epoch a real server has seen; the run gives up after tracking.give_up_seconds, in one
    line, keeps its checkpoint; once the server is back, the next invocation marks the run FAILED."""
    port = free_port()
    limits = ["tracking.timeout_seconds=2", "tracking.give_up_seconds=8"]
    with start_mlflow_server(tmp_path, port=port) as (url, server):
        from pipeline.tracking import prepare_store

        prepare_store(url, "fromlogits")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'out'}",
             f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, "train.epochs=3000", *limits],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": url})
        wait_for_training(tmp_path)
        kill_server(server)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        gave_up = time.monotonic() - killed
    assert process.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the tracking store did not accept metrics for") and "checkpoint is kept" in last
    assert gave_up < 8 + 2 * 2 + 15  # the limit, one request timeout either side, start-up slack; not minutes
    assert list((tmp_path / "checkpoints").glob("*/state.npz"))

    with start_mlflow_server(tmp_path, port=port) as (url, _):
        nxt = cli(tmp_path, data_dir, url, "train.epochs=1", "seed=1", "resume=false", name="next")
        assert nxt.returncode == 0 and "marked 1 stale RUNNING run(s) FAILED" in nxt.stdout
        (stale,) = [r for r in runs_of(url) if r.data.params.get("seed") == "0"]
        assert stale.info.status == "FAILED"
