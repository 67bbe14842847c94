"""The third backend: Keras on PyTorch (an optional extra). Its loop computes what `model.fit` computes on
torch, a study on it probes what its loss really consumed, and its model loads back through MLflow.
Keras picks its backend once per process, so torch runs happen in subprocesses here."""

from __future__ import annotations

import importlib.util

import mlflow
import numpy as np
import pytest

from conftest import assert_loop_matches_fit, compose_config, run_cli, study_runs
from pipeline.config import ConfigError, validate

torch_installed = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                     reason="PyTorch is not installed (pip install -e '.[torch]')")


def test_without_pytorch_backend_torch_is_refused_in_one_line_naming_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"backend='torch' is not accepted: expected tensorflow or jax: .*pip install"):
        validate(compose_config("backend=torch"))
    with pytest.raises(ConfigError, match=r"grid.backends=\['tensorflow', 'torch'\] is not accepted"):
        validate(compose_config("grid.backends=[tensorflow,torch]"))
    assert validate(compose_config("backend=jax")).backend.name.value == "jax"


@torch_installed
@pytest.mark.slow
def test_torch_loop_matches_model_fit_on_torch(data_dir):
    assert_loop_matches_fit("torch", data_dir)


@torch_installed
@pytest.mark.slow
def test_a_torch_study_probes_no_rescue_and_its_model_loads_back(tmp_path, data_dir):
    """The note's original code on torch trains exactly like probs_naive, as on JAX."""
    from pipeline.config import DatasetConfig
    from pipeline.data import load

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("pipeline.run", "-m", "backend=torch", "loss=probs,logits,probs_naive", "seed=0", "train.epochs=2",
                     "hydra/launcher=basic", f"data_dir={data_dir}", "study=torch", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     f"reports_dir={tmp_path / 'reports'}", env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = study_runs(uri)
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["backend"] == "torch" for r in children)
    assert all("torch==" in r.data.tags["versions"] for r in children)
    runs = {r.data.tags["formulation"]: r for r in children}
    assert {k: r.data.tags["effective_from_logits"] for k, r in runs.items()} == {
        "probs": "false", "logits": "true", "probs_naive": "false"}
    assert runs["probs"].data.metrics["test_nll"] == runs["probs_naive"].data.metrics["test_nll"]
    assert len(mlflow.MlflowClient(uri).get_metric_history(runs["logits"].info.run_id, "val_nll_float64")) == 2

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{runs['logits'].info.run_id}/model")
    splits = load(DatasetConfig(), data_dir)
    probabilities = np.asarray(model.predict(splits.x_test))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == splits.y_test) == runs["logits"].data.metrics["test_accuracy"]
