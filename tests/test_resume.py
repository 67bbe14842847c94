"""Stopping and resuming one run: SIGTERM, a second signal, SIGKILL, deleted and moved runs, two identical
commands (sweeps: test_sweep_interruptions.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import all_metrics, run_one, runs_of, start_one, wait_for_first_epoch
from pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_result(tmp_path, data_dir):
    config = ["train.epochs=80", "seed=2"]
    reference_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    assert run_one(tmp_path, data_dir, reference_uri, *config, "resume=false", name="reference").returncode == 0
    (reference,) = runs_of(reference_uri)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_one(tmp_path, data_dir, uri, *config)
    wait_for_first_epoch(tmp_path / "checkpoints")
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - stopped < 10  # promptly: at the end of the current epoch
    assert process.returncode == 130 and "run the same command again to resume" in stderr
    (killed,) = runs_of(uri)
    done = len(mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "val_nll_float64"))
    assert killed.info.status == "KILLED" and 1 <= done < 80
    assert list((tmp_path / "checkpoints").glob("*/state.npz"))

    resumed = run_one(tmp_path, data_dir, uri, *config, name="resumed")
    assert resumed.returncode == 0 and f"resuming run {killed.info.run_id}" in resumed.stdout
    (finished,) = runs_of(uri)  # the same run, not a new one
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    # Same config and seed: every metric of every epoch equal, bit for bit, across the interruption.
    resumed_metrics, reference_metrics = all_metrics(uri, finished), all_metrics(reference_uri, reference)
    assert set(resumed_metrics) == set(reference_metrics) and len(reference_metrics) > 25
    assert resumed_metrics == reference_metrics
    assert not list((tmp_path / "checkpoints").glob("*/state.npz"))  # finished: nothing left to resume
    tags = finished.data.tags
    assert tags["dataset_sha256"].startswith("246e0c30") and tags["dataset_version"] == "1.0.0"
    assert "tensorflow" in tags["versions"] and "keras==" in tags["versions"]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    assert tags["git_dirty"] == ("unknown" if status.returncode else str(bool(status.stdout.strip())).lower())


def interrupt_once(tmp_path, data_dir, uri, *config):
    """A run of `config` stopped by SIGTERM after its first persisted epoch: returns the KILLED run."""
    process = start_one(tmp_path, data_dir, uri, *config)
    wait_for_first_epoch(tmp_path / "checkpoints")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130
    (killed,) = runs_of(uri)
    assert killed.info.status == "KILLED"
    return killed


def test_a_checkpoint_resumes_only_where_it_belongs_and_a_deleted_run_does_not_block_its_configuration(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=80", "seed=4"]
    killed = interrupt_once(tmp_path, data_dir, uri, *config)
    other = run_one(tmp_path, data_dir, uri, *config, "tracking.experiment=other", "train.epochs=3", name="other")
    assert other.returncode == 0 and "resuming" not in other.stdout
    (moved,) = runs_of(uri, "other")
    assert moved.info.run_id != killed.info.run_id and moved.info.status == "FINISHED"
    assert mlflow.MlflowClient(uri).get_run(killed.info.run_id).info.status == "KILLED"  # still resumable at home

    mlflow.MlflowClient(uri).delete_run(killed.info.run_id)
    again = run_one(tmp_path, data_dir, uri, *config, name="again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "discarding the checkpoint" in again.stdout and killed.info.run_id in again.stdout
    (fresh,) = runs_of(uri)
    assert fresh.info.run_id != killed.info.run_id and fresh.info.status == "FINISHED"


def test_a_damaged_checkpoint_is_trained_again_not_a_traceback_on_every_rerun(tmp_path, data_dir):
    """A checkpoint cut short outside the pipeline (a full disk as it was copied, a disk error): every rerun of its
    configuration failed with numpy's traceback, exit 1, its run FAILED. Now the run trains again from the first
    epoch, each epoch stored once (the steps the store has are not sent again)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=80", "seed=6"]
    killed = interrupt_once(tmp_path, data_dir, uri, *config)
    (state,) = (tmp_path / "checkpoints").glob("*/state.npz")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    again = run_one(tmp_path, data_dir, uri, *config, name="again")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"resuming run {killed.info.run_id} from its first epoch: its checkpoint {state} cannot be read (" in again.stdout
    (finished,) = runs_of(uri)
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(finished.info.run_id, "val_nll_float64")]
    assert sorted(steps) == list(range(1, 81))  # none missing, none twice


def test_a_checkpoint_whose_run_json_is_damaged_is_discarded_in_one_line(tmp_path, capsys):
    """Its run cannot be known: json's traceback on every rerun; now its configuration starts a new run."""
    from pipeline.stages import previous_attempt

    (tmp_path / "state.npz").write_bytes(b"")
    (tmp_path / "run.json").write_text('{"run_id": "12')  # cut short
    assert previous_attempt(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) is None
    assert capsys.readouterr().out.startswith(f"discarding the checkpoint in {tmp_path}: its run.json cannot be read (")


# `pipeline.run` SIGKILLed where the OOM killer can strike between two writes: "checkpoint" kills it as it
# is about to save its 6th checkpoint (epoch 6's metrics are in the store, its checkpoint is not);
# "model" kills it once its model is logged (its test metrics and model are in the store, the run is open).
KILLED_BETWEEN_WRITES = """
import os, runpy, signal, sys
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "checkpoint":
    from pipeline.train import Checkpoint
    saves, save = [], Checkpoint.save
    def killing_save(self, model, optimizer, epoch):
        saves.append(epoch)
        if len(saves) == 6:
            kill()
        save(self, model, optimizer, epoch)
    Checkpoint.save = killing_save
elif sys.argv[1] == "model-files":  # the model's files stored, its logging not finished: left PENDING
    from mlflow import MlflowClient
    upload = MlflowClient.log_model_artifacts
    MlflowClient.log_model_artifacts = lambda *args: (upload(*args), kill())
else:
    import pipeline.stages
    log_model = pipeline.stages.log_model
    pipeline.stages.log_model = lambda *args: (log_model(*args), kill())
sys.argv[0:2] = ["pipeline/run.py"]
runpy.run_module("pipeline.run", run_name="__main__", alter_sys=True)
"""


def test_after_sigkill_between_two_writes_the_run_resumes_with_every_epoch_and_its_model_once(tmp_path, data_dir):
    """Killed between storing an epoch's metrics and its checkpoint, then while logging its model (its files
    stored, the model left PENDING), then between logging its model and closing the run: each next invocation
    marks the orphaned RUNNING run FAILED and continues it; the epochs trained again are not logged again, nor the
    evaluation and the model. The unfinished model is removed, files and record, when the complete one is logged:
    it stayed beside it, PENDING, in the run's and the experiment's models."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=20", "seed=7", "tracking.flush_seconds=0"]  # every epoch: send, then checkpoint
    client = mlflow.MlflowClient(uri)
    for attempt, where in enumerate(["checkpoint", "model-files", "model"]):
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_BETWEEN_WRITES, where, f"data_dir={data_dir}",
             f"hydra.run.dir={tmp_path / where}", f"checkpoints_dir={tmp_path / 'checkpoints'}", *config],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        (orphan,) = runs_of(uri)
        assert orphan.info.status == "RUNNING"  # nobody could close it
        assert attempt == 0 or "marked 1 stale RUNNING run(s) FAILED" in killed.stdout
    history = lambda key: client.get_metric_history(orphan.info.run_id, key)  # noqa: E731
    assert len(history("test_nll")) == 1 and max(m.step for m in history("val_nll_float64")) == 20

    resumed = run_one(tmp_path, data_dir, uri, *config, name="resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "marked 1 stale RUNNING run(s) FAILED" in resumed.stdout
    assert f"resuming run {orphan.info.run_id}" in resumed.stdout
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED" and "failed_reason" not in run.data.tags
    per_epoch = [key for key in run.data.metrics if history(key)[-1].step > 0]
    assert len(per_epoch) > 10
    for key in per_epoch:
        assert sorted(m.step for m in history(key)) == list(range(1, 21)), key  # none missing, none twice
    for key in set(run.data.metrics) - set(per_epoch):
        assert len(history(key)) == 1, key  # the evaluation's and the run's totals: once
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.status.name for m in models] == ["READY"]
    folders = {path.name for path in (tmp_path / "artifacts" / "models").iterdir()}
    assert folders == {models[0].model_id}, "the unfinished model's files are removed"


def test_a_second_signal_stops_at_once_inside_a_long_compiled_epoch(tmp_path, data_dir):
    """One example per step through two 1,500-unit layers: an epoch takes minutes, stopping takes seconds."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_one(tmp_path, data_dir, uri, "train.batch_size=1", "model.hidden_units=[1500,1500]", "train.epochs=2")
    deadline = time.monotonic() + 120
    while not runs_of(uri) and time.monotonic() < deadline:  # the run is open: training is about to start
        time.sleep(0.2)
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    second = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - second < 15, "the second signal did not stop the run at once"
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGINT: stopping after this epoch" in stderr and "SIGINT again: stopping now" in stderr
    assert "Traceback" not in stderr
    (run,) = runs_of(uri)
    assert run.info.status == "KILLED"


def test_a_second_signal_that_lands_in_a_finalizer_is_not_lost():
    """Python swallows an exception raised in a finalizer (a SQLAlchemy weakref callback, a __del__) and prints
    "Exception ignored"; the second signal's stop is raised again in the main thread's own code instead."""
    script = """if True:
        import os, signal, sys, time
        from pipeline.interrupt import install_stop_handlers
        install_stop_handlers()

        class Finalized:
            def __del__(self):  # the second SIGINT arrives while this runs
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here, inside the finalizer

        os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this epoch
        time.sleep(0.2)
        try:
            Finalized()
            for _ in range(50):
                time.sleep(0.1)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("SIGINT again: stopping now") == 1, result.stderr


def test_two_identical_commands_at_once_share_nothing(tmp_path, data_dir):
    """The second finds the configuration's checkpoint folder taken and trains in one of its own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["train.epochs=40", "seed=6"]
    processes = [start_one(tmp_path, data_dir, uri, *config, name="runs/${now:%H-%M-%S-%f}") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("another process is running this configuration" in out for out, _ in outputs) == 1
    runs = runs_of(uri)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.metrics["test_nll"] == runs[1].data.metrics["test_nll"]  # same seed, same result
    written = sorted((tmp_path / "runs").glob("*/metrics.json"))
    assert len(written) == 2  # each its own output folder
    assert {json.loads(p.read_text())["run_id"] for p in written} == {r.info.run_id for r in runs}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]  # both cleaned up after themselves


def test_a_run_resumed_with_another_cpu_or_code_keeps_where_its_earlier_epochs_were_made(tmp_path, capsys):
    """A resumed run took the last attempt's commit, packages and CPU tags and lost the first's: a run half
    trained elsewhere (another machine's kernels round differently) looked made in one place. The earlier
    provenance is kept in a tag of its own, and a report lists it with the run's name."""
    from pipeline.record import PROVENANCE, Tag, provenances
    from pipeline.tracking import prepare_store
    from pipeline.tracking.runs import tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = prepare_store(uri, "fromlogits")
    first = {Tag.GIT_COMMIT: "a" * 40, Tag.GIT_DIRTY: "false", Tag.VERSIONS: "tensorflow==2.21.0", Tag.CPU: "cpu A (avx2)"}
    with tracked_run(uri, experiment_id, "logits-seed0", first) as run:
        run_id = run.info.run_id
    with tracked_run(uri, experiment_id, "logits-seed0", first, run_id=run_id):
        pass  # resumed where it began: nothing to keep
    assert Tag.EARLIER_PROVENANCE not in mlflow.MlflowClient(uri).get_run(run_id).data.tags
    second = {**first, Tag.CPU: "cpu B (sse4.1)"}
    third = {**second, Tag.GIT_COMMIT: "c" * 40}
    for tags in (second, third):
        with tracked_run(uri, experiment_id, "logits-seed0", tags, run_id=run_id):
            pass
    kept = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert {t: kept[t] for t in PROVENANCE} == third  # the last attempt's, which evaluated and logged the model
    assert json.loads(kept[Tag.EARLIER_PROVENANCE]) == [first, second]
    assert provenances(kept) == [third, first, second]

    from pipeline.report import Report
    from pipeline.report.findings import provenance
    from pipeline.report.runs import RunData, Setting
    from pipeline.report import analyse

    runs = [RunData(run_id, "logits-seed0", "FINISHED", "logits", 0, {**kept, "formulation": "logits"}, {}, {"test_nll": 1.0}),
            RunData("other", "logits-seed1", "FINISHED", "logits", 1, {**third, "formulation": "logits"}, {}, {"test_nll": 1.0})]
    environment = Report("s", "parent", "1", [analyse(Setting({}, runs))], [], [], {}).environment
    assert environment[Tag.CPU] == ["cpu A (avx2)", "cpu B (sse4.1)"] and environment[Tag.GIT_COMMIT] == ["a" * 40, "c" * 40]
    assert environment["resumed_elsewhere"] == ["logits-seed0"]
    assert provenance(environment).endswith(
        " 1 run was resumed with another commit, package set or CPU than an earlier attempt of it had: logits-seed0.")
