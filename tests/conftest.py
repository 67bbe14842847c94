"""Shared fixtures: real configs composed from conf/, a real prepared TFDS dataset, a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import PROJECT_ROOT, register_configs  # noqa: E402

CONF_DIR = PROJECT_ROOT / "conf"
register_configs()


def compose_config(*overrides: str):
    """The config `python -m pipeline.run <overrides>` would get (without Hydra's runtime keys)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def no_inherited_tracking_uri():
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ, so a store chosen by one test
    would leak into the subprocesses of the next; every test starts without one."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the bundled sample prepared once for the whole session."""
    from pipeline.config import DatasetConfig
    from pipeline.data import fetch

    path = tmp_path_factory.mktemp("tfds")
    fetch(DatasetConfig(), str(path))
    return str(path)


def run_cli(*args: str, env: dict | None = None, cwd: Path = PROJECT_ROOT, timeout: float = 600):
    """Runs `python -m <args>` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )


def runs_of(uri: str, experiment: str = "fromlogits"):
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], max_results=1000)
