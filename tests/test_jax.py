"""The backend axis: the JAX loop computes what `model.fit` computes on JAX, and a sweep mixing backends
under the default launcher puts each job on its backend with no step for the user (the cluster launcher:
tests/test_launchers.py; DVC's grid.backends: tests/test_dvc.py). Keras picks its backend once per
process, so JAX runs happen in subprocesses here."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from conftest import assert_loop_matches_fit, run_cli, runs_of, study_runs

pytestmark = pytest.mark.slow


def test_jax_loop_matches_model_fit_on_jax(data_dir):
    assert_loop_matches_fit("jax", data_dir)


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("backends")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The default launcher (joblib, one worker per core): each worker runs jobs of either backend. Parallel
    # first writers into a fresh store also race on SQLite's schema and the dataset's row (the study creates
    # the store first; a job that loses the dataset race finds the row on its next try).
    result = run_cli("pipeline.run", "-m", "backend=tensorflow,jax", "loss=probs,probs_naive", "seed=0",
                     "train.epochs=2", f"data_dir={data_dir}", "study=mixed", f"hydra.sweep.dir={root / 'sweep'}",
                     f"reports_dir={root / 'reports'}", f"output_dir={root / 'metrics'}/${{hydra:job.num}}",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, root, result


def test_a_parallel_sweep_mixing_backends_runs_each_job_on_its_backend_and_loses_no_run(mixed_sweep):
    uri, root, _ = mixed_sweep
    parent, children = study_runs(uri)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" and "test_nll" in r.data.metrics for r in children)
    effective = {(r.data.tags["backend"], r.data.tags["formulation"]): r.data.tags["effective_from_logits"] for r in children}
    # Probed per run: Keras rescues the note's original code on TensorFlow only (logits: test_launchers.py).
    assert effective == {("tensorflow", "probs"): "true", ("tensorflow", "probs_naive"): "false",
                         ("jax", "probs"): "false", ("jax", "probs_naive"): "false"}
    jax_runs = [r for r in children if r.data.tags["backend"] == "jax"]
    assert all("jax==" in r.data.tags["versions"] for r in jax_runs)
    by_arm = {r.data.tags["formulation"]: r.data.metrics["test_nll"] for r in jax_runs}
    assert by_arm["probs"] == by_arm["probs_naive"]  # on JAX the note's original code trains exactly like probs_naive
    report = (root / "reports" / "mixed" / "report.md").read_text()
    assert "## Setting: backend.name=jax" in report and "## Setting: backend.name=tensorflow" in report
    # The jax jobs ran in a worker of the other backend (both joblib workers began with tensorflow's), which
    # once composed the job's config again, where ${hydra:job.num} does not resolve: each job's own folder.
    written = [json.loads((root / "metrics" / str(job) / "metrics.json").read_text())["run_id"] for job in range(4)]
    assert sorted(written) == sorted(r.info.run_id for r in children)


def test_a_jax_trained_model_loads_back_and_predicts_as_evaluated(mixed_sweep, data_dir):
    uri, _, _ = mixed_sweep
    from pipeline.config import DatasetConfig
    from pipeline.data import load

    (run,) = [r for r in runs_of(uri) if r.data.tags.get("backend") == "jax" and r.data.tags.get("formulation") == "probs"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    splits = load(DatasetConfig(), data_dir)
    probabilities = np.asarray(model.predict(splits.x_test))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == splits.y_test) == run.data.metrics["test_accuracy"]
    signature = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model").signature
    assert signature is not None
