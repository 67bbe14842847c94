"""Shared fixtures: real configs composed from conf/, a real prepared TFDS dataset, a real MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import PROJECT_ROOT, register_configs  # noqa: E402

CONF_DIR = PROJECT_ROOT / "conf"
register_configs()


def compose_config(*overrides: str, hydra: bool = False):
    """The config `python -m pipeline.run <overrides>` would get (without Hydra's runtime keys; with its `hydra`
    node, e.g. the launcher's settings, if `hydra`)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


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


def study_runs(uri: str, experiment: str = "fromlogits", latest: bool = False):
    """The store's one study parent run (or, `latest`, the one started last) and its children."""
    runs = runs_of(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    if latest:
        parents = [max(parents, key=lambda r: r.info.start_time)]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_mlflow_server(folder: Path, *args: str, port: int | None = None, env: dict | None = None):
    """A real `mlflow server` on 127.0.0.1 over a SQLite store in `folder` (none with `--artifacts-only`: a server of
    artifacts alone); yields (URL, process), stops it after."""
    port = port or free_port()
    store = [] if "--artifacts-only" in args else ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), *store,
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its workers die with it
        # MLflow 3's server otherwise starts ~8 background job workers (GenAI features) on 2 cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
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
        kill_server(server)
        pytest.fail("mlflow server did not become healthy in 90 s")
    try:
        yield url, server
    finally:
        kill_server(server)


def kill_server(server: subprocess.Popen) -> None:
    """SIGKILL to the server and its worker processes (killing the parent alone leaves a worker serving)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    with start_mlflow_server(tmp_path) as (url, _):
        yield url


LOOP_WEIGHT_TOLERANCE = 1e-5  # measured 0.0 on every backend: same batches, same loss object, same Adam


def assert_loop_matches_fit(backend: str, data_dir: str) -> None:
    """The pipeline's loop on `backend` against `model.fit` on it, for every formulation and task
    (`python -m pipeline.loops.equivalence` in a process started on that backend)."""
    result = subprocess.run([sys.executable, "-m", "pipeline.loops.equivalence", data_dir], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(cases) == 6 and {c["backend"] for c in cases} == {backend}
    for case in cases:
        for fast_loss, fit_loss in case["losses"]:
            assert fast_loss == pytest.approx(fit_loss, rel=1e-5), case
        assert case["max_abs_weight_diff"] <= LOOP_WEIGHT_TOLERANCE, case
        assert case["max_abs_optimizer_diff"] <= LOOP_WEIGHT_TOLERANCE, case


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


# --- one configuration run as a user runs it, to the end or in the background ---------------------------

TIMING = ("seconds_", "epoch_seconds", "epoch_train_seconds")
# Checkpoints follow each metric batch: short batches give a checkpoint within a few epochs.
FAST_FLUSH = "tracking.flush_seconds=0.3"


def all_metrics(uri: str, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history but timings, as (step, value) sorted by step."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            for key in run.data.metrics if not key.startswith(TIMING)}


def run_one(tmp_path: Path, data_dir: str, uri: str, *overrides: str, name: str = "out"):
    """`python -m pipeline.run` of one configuration in `tmp_path` (checkpoints there too), to the end."""
    return run_cli("pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / name}",
                   f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, *overrides, env={"MLFLOW_TRACKING_URI": uri})


def start_one(tmp_path, data_dir, uri, *overrides, name="out"):
    """The same, started in the background; returns the process."""
    from pipeline.tracking import prepare_store

    prepare_store(uri, "fromlogits")  # the test reads the store while the run writes it: create it first
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / name}",
         f"checkpoints_dir={tmp_path / 'checkpoints'}", FAST_FLUSH, *overrides],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )


def wait_for_first_epoch(checkpoints: Path, runs: int = 1, timeout: float = 120,
                         process: subprocess.Popen | None = None) -> None:
    """Until `runs` runs have finished an epoch: their checkpoints (written after an epoch) exist in `checkpoints`.
    Fails at once if `process`, the command training them, ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(checkpoints.glob("*/state.npz"))) >= runs:
            return
        if process is not None and process.poll() is not None:
            pytest.fail(f"the command ended (exit {process.returncode}) before {runs} run(s) finished an epoch")
        time.sleep(0.2)
    pytest.fail(f"{runs} run(s) did not finish an epoch in {timeout:.0f} s")


# `python -m <module> <args>` whose report, once its drawing is inside the new report's staging folder, says so
# (touches the file argv[1]) and then takes a minute: a stop sent then lands while the report is drawn, however
# loaded the machine (drawn at full speed, a loaded machine's test could send it after the report was written).
_REPORT_HELD_WHILE_DRAWN = """
import runpy, sys, time
from pathlib import Path
import pipeline.report.render as render
write, drawing, module = render.write, Path(sys.argv[1]), sys.argv[2]
def held_write(report, folder):
    drawing.touch()
    time.sleep(60)
    write(report, folder)
render.write = held_write
sys.argv[0:3] = [module]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def report_held_while_drawn(drawing: Path, module: str, *args: str) -> list[str]:
    """The command `python -m <module> <args>` whose report touches `drawing` inside its staging folder, then
    waits there a minute (`wait_until_drawing`)."""
    return [sys.executable, "-c", _REPORT_HELD_WHILE_DRAWN, str(drawing), module, *args]


def wait_until_drawing(drawing: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the report of a `report_held_while_drawn` command is being drawn: `drawing` exists. Fails with
    `process`'s stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not drawing.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)


def in_terminal(terminal: int) -> dict:
    """Popen's arguments for a command run in a terminal: the pseudo-terminal `terminal` (the side a shell would
    hold) as its standard streams and its controlling terminal, in a session of its own, as an ssh login gives."""
    import fcntl
    import termios

    return {"stdin": terminal, "stdout": terminal, "stderr": terminal, "start_new_session": True,
            "preexec_fn": lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)}


def start_training_sweep(tmp_path: Path, uri: str, *overrides: str, epochs: int = 400,
                         terminal: int | None = None) -> subprocess.Popen:
    """Starts a sweep of two `epochs`-epoch jobs in a session of its own (in the pseudo-terminal `terminal`, if given;
    its output captured otherwise); returns it once both runs train."""
    from pipeline.tracking import prepare_store

    prepare_store(uri, "fromlogits")
    command = [sys.executable, "-m", "pipeline.run", "-m", "loss=probs,logits", "seed=0", f"train.epochs={epochs}", FAST_FLUSH,
               f"hydra.sweep.dir={tmp_path / 'sweep'}", f"reports_dir={tmp_path / 'reports'}",
               f"checkpoints_dir={tmp_path / 'checkpoints'}", *overrides]
    streams = (in_terminal(terminal) if terminal is not None
               else {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "start_new_session": True})
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                               **streams)
    try:
        wait_for_first_epoch(tmp_path / "checkpoints", runs=2, timeout=180, process=process)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        print(f"the sweep's stderr:\n{(stderr or '')[-5000:]}", file=sys.stderr)  # shown with the failure
        raise
    return process


def run_with_a_stop_pending(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `command` with SIGINT sent before it starts and held pending (blocked) until the process unblocks it
    as it installs its stop handlers: a Ctrl-C at the earliest moment it can be taken, at the same point each time."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}))
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def interrupt_sweep(tmp_path: Path, uri: str, *overrides: str, whole_group: bool = True,
                    times: int = 1) -> subprocess.CompletedProcess:
    """Starts a sweep of 400-epoch jobs and, once two of its runs train, sends SIGINT to its whole process
    group, as Ctrl-C in a terminal does (or, not `whole_group`, to the launching process alone, as `kill -INT`
    does), `times` times 20 ms apart (an impatient user); returns the finished process with
    its output."""
    process = start_training_sweep(tmp_path, uri, *overrides)
    for sent in range(times):
        if sent:
            time.sleep(0.02)
        if whole_group:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        else:
            process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
