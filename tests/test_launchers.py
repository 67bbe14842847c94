"""Studies under Hydra's parallel and cluster launchers, and against a real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import run_cli, runs_of

pytestmark = pytest.mark.slow


def study_runs(uri: str):
    runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def sweep(tmp_path: Path, data_dir: str, uri: str, *overrides: str):
    result = run_cli("pipeline.run", "-m", "train.epochs=1", f"data_dir={data_dir}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cluster_launcher_logs_every_child_under_one_parent(tmp_path, data_dir):
    """submitit_local runs each job as its own process, as submitit_slurm does on a cluster."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep(tmp_path, data_dir, uri, "loss=probs,logits,probs_naive", "seed=0", "hydra/launcher=submitit_local",
          "hydra.launcher.timeout_min=10")
    parent, children = study_runs(uri)
    assert sorted(r.data.tags["formulation"] for r in children) == ["logits", "probs", "probs_naive"]
    assert all(r.info.status == "FINISHED" and "test_nll" in r.data.metrics for r in children)
    assert parent.info.status == "FINISHED" and "test_nll.logits" in parent.data.metrics


EIGHT_PARALLEL = ["loss=probs,logits", "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8"]


def test_eight_parallel_jobs_into_a_fresh_store_lose_no_run(tmp_path, data_dir):
    """Parallel first writers crash SQLite's schema creation; the study creates the store first."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    sweep(tmp_path, data_dir, uri, *EIGHT_PARALLEL)
    parent, children = study_runs(uri)
    assert len(children) == 8 and all(r.info.status == "FINISHED" and "test_nll" in r.data.metrics for r in children)
    assert parent.info.status == "FINISHED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # MLflow 3's server otherwise starts ~8 background job workers (GenAI features) on 2 cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not become healthy in 90 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_eight_parallel_jobs_against_a_real_mlflow_server_round_trip(tmp_path, data_dir, mlflow_server):
    result = sweep(tmp_path, data_dir, mlflow_server, "loss=probs,logits,probs_naive", "seed=0,1,2", "study=served",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=8", f"reports_dir={tmp_path / 'reports'}")
    parent, children = study_runs(mlflow_server)
    assert len(children) == 9 and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" and "test_nll" in r.data.metrics for r in children)
    child = next(r for r in children if r.data.tags["formulation"] == "probs_naive" and r.data.tags["seed"] == "0")
    assert child.data.params["loss.formulation"] == "probs_naive" and child.data.tags["effective_from_logits"] == "false"
    history = mlflow.MlflowClient(mlflow_server).get_metric_history(child.info.run_id, "val_nll_float64")
    assert [m.step for m in history] == [1]

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/model")
    probabilities = np.asarray(model.predict(np.zeros((3, 784), np.float32)))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    report = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report/report.md",
                                                      dst_path=str(tmp_path / "download")))
    assert "Study `served`" in report.read_text()
    assert "report:" in result.stdout
