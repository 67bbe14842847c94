"""DVC drives the same stages: `dvc repro` runs them, skips them when nothing changed, reruns only what
a change affects; `dvc exp run -S` composes conf/ with Hydra. Real DVC in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import run_with_a_stop_pending, runs_of, study_runs, wait_for_first_epoch
from pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

VENV_BIN = str(Path(sys.executable).parent)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def sh(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **(env or {})})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's tracked and new files (not its data, outputs or store) in a fresh git repository."""
    root = tmp_path_factory.mktemp("dvcrepo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    sh("git", "init", "-q", cwd=root)
    # A tiny default study, edited into conf/ as a researcher would, then `make params`.
    edit(root / "conf" / "train" / "default.yaml", "epochs: 100", "epochs: 1")
    edit(root / "conf" / "config.yaml", "seeds: [0, 1, 2, 3, 4]", "seeds: [0]")
    edit(root / "conf" / "config.yaml", "backends: [tensorflow]", "backends: [tensorflow, jax]")
    sh("python", "-m", "pipeline.dvc_stages", "params", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny study", cwd=root)
    return root


def test_params_yaml_is_up_to_date_with_conf(tmp_path):
    """params.yaml is generated from conf/ (`make params`); a stale one fails here."""
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    sh("python", "-m", "pipeline.dvc_stages", "params", cwd=tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (PROJECT_ROOT / "params.yaml").read_text(), \
        "params.yaml is out of date with conf/: run `make params`"


@pytest.mark.parametrize("edited,expected", [
    ("trian:\n  epochs: 3\n", "Key 'trian' not in 'Config'"),
    ("train:\n  epochs: ten\n", "train.epochs='ten': expected a whole number"),
])
def test_a_hand_edited_params_yaml_is_one_line_naming_what_is_wrong(tmp_path, edited, expected):
    from conftest import run_cli

    (tmp_path / "params.yaml").write_text(edited)
    result = run_cli("pipeline.dvc_stages", "fetch", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: params.yaml is not accepted: {expected}; compose it from conf/ with `make params` "
        "(or `dvc exp run -S key=value`)"]


def test_params_refuses_a_bad_override_in_one_line_and_writes_nothing(tmp_path):
    from conftest import run_cli

    result = run_cli("pipeline.dvc_stages", "params", "loss=../experiment/atlas", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: loss=../experiment/atlas is not accepted: expected one of logits, probs, probs_naive"]
    assert not (tmp_path / "params.yaml").exists()


def test_repro_runs_all_stages_then_nothing(repo):
    first = sh("dvc", "repro", cwd=repo)
    assert ran(first.stdout) == ["fetch", "train", "evaluate", "compare"]
    for path in ["metrics/evaluate.json", "metrics/compare.json", "reports/dvc/report.html",
                 "outputs/dvc/curves.csv"]:
        assert (repo / path).exists(), path
    runs = runs_of(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    children = [r for r in runs if r.data.tags.get("role") != "study"]
    assert sorted((r.data.tags["backend"], r.data.tags["formulation"], r.data.tags["effective_from_logits"])
                  for r in children) == [("jax", "logits", "true"), ("jax", "probs", "false"), ("jax", "probs_naive", "false"),
                                         ("tensorflow", "logits", "true"), ("tensorflow", "probs", "true"),
                                         ("tensorflow", "probs_naive", "false")]
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1  # one study across both backends
    assert all(r.info.status == "FINISHED" and "test_nll" in r.data.metrics for r in children)
    assert "test_nll" in sh("dvc", "metrics", "show", "--json", cwd=repo).stdout
    assert "val_nll_float64" in sh("dvc", "plots", "show", "--json", cwd=repo).stdout

    assert ran(sh("dvc", "repro", cwd=repo).stdout) == []


def test_re_preparing_the_data_does_not_retrain(repo):
    lock = (repo / "dvc.lock").read_text()
    shutil.rmtree(repo / "data" / "tfds")
    assert ran(sh("dvc", "repro", cwd=repo).stdout) == ["fetch"]  # the content digest is the same
    assert "outputs/dvc/dataset.json" in lock and (repo / "dvc.lock").read_text().count("md5") == lock.count("md5")


def test_an_edit_to_any_pipeline_module_makes_its_stages_stale(repo):
    module = repo / "pipeline" / "tracking" / "runs.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        status = sh("dvc", "status", "--json", cwd=repo).stdout
        assert all(stage in status for stage in ("fetch", "train", "evaluate", "compare")), status
    finally:
        module.write_text(original)
    assert sh("dvc", "status", "--json", cwd=repo).stdout.strip() == "{}"


def test_a_stale_params_yaml_stops_repro_in_one_line(repo):
    conf = repo / "conf" / "train" / "default.yaml"
    original = conf.read_text()
    edit(conf, "epochs: 1", "epochs: 2")
    try:
        result = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
        assert result.returncode != 0
        assert "error: params.yaml was composed from another state of conf/" in result.stderr
        assert "run `make params`" in result.stderr and "Traceback" not in result.stderr
        assert "Running stage 'train'" not in result.stdout
    finally:
        conf.write_text(original)


def test_exp_run_composes_conf_and_reruns_only_what_a_train_parameter_affects(repo):
    result = sh("dvc", "exp", "run", "-S", "train.epochs=2", "-S", "model=seed_sigmoid", "-S", "grid.backends=[tensorflow]",
                cwd=repo)
    # fetch depends on conf/ (to refuse a stale params.yaml) and may run; it prepares nothing new.
    assert [stage for stage in ran(result.stdout) if stage != "fetch"] == ["train", "evaluate", "compare"]
    params = (repo / "params.yaml").read_text()
    assert "epochs: 2" in params and "activation: sigmoid" in params
    assert "- 0\n" in params and "- 1\n" not in params  # the committed tiny grid, composed from conf/ + -S
    first = experiment_named_in(result.stdout)

    second = sh("dvc", "exp", "run", "-S", "grid.backends=[tensorflow]", "-S", "grid.formulations=[probs,logits]", cwd=repo)
    assert "train" in ran(second.stdout)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    experiments = {exp["name"]: exp for commit in shown for exp in commit.get("experiments") or []}
    assert {first, experiment_named_in(second.stdout)} <= set(experiments)
    for name in (first, experiment_named_in(second.stdout)):  # test NLL and accuracy per arm, per experiment
        (rev,) = experiments[name]["revs"]
        arms = rev["data"]["metrics"]["metrics/evaluate.json"]["data"]
        assert {"logits", "probs"} <= set(arms), arms
        assert all({"test_nll", "test_accuracy"} <= set(values) for values in arms.values())

    sh("dvc", "exp", "apply", first, cwd=repo)  # back to the first experiment's params, metrics and outputs
    assert ran(sh("dvc", "repro", cwd=repo).stdout) == []  # nothing to rerun: every output was restored


def experiment_named_in(output: str) -> str:
    """The name `dvc exp run` gave its experiment ("Ran experiment(s): <name>")."""
    (line,) = [line for line in output.splitlines() if line.startswith("Ran experiment")]
    return line.split(":", 1)[1].strip()


def test_ctrl_c_of_repro_ends_the_runs_killed_and_the_next_repro_resumes_them(repo):
    sh("python", "-m", "pipeline.dvc_stages", "params", "train.epochs=200", "grid.formulations=[logits]",
       "grid.backends=[tensorflow]", "tracking.flush_seconds=0.3", cwd=repo)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        wait_for_first_epoch(repo / "outputs" / "checkpoints", timeout=180)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: dvc and the stage's process
        _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    (killed,) = [r for r in runs_of(uri) if r.info.status == "KILLED" and r.data.tags.get("role") != "study"]
    assert killed.data.params["train.epochs"] == "200"
    assert {r.info.status for r in runs_of(uri) if r.data.tags.get("role") == "study"
            and r.info.run_id == killed.data.tags["mlflow.parentRunId"]} == {"KILLED"}

    again = sh("dvc", "repro", cwd=repo)
    assert f"resuming run {killed.info.run_id}" in again.stdout
    resumed = mlflow.MlflowClient(uri).get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and "test_nll" in resumed.data.metrics
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "val_nll_float64")]
    assert sorted(steps) == list(range(1, 201))
    # No half-finished duplicate: the configuration has exactly the one run, now complete.
    assert [r.info.run_id for r in runs_of(uri) if r.data.params.get("train.epochs") == "200"] == [killed.info.run_id]


def test_a_stop_before_the_train_stages_next_run_opens_no_run(repo):
    """A stop that came after a run's last epoch (or before the first run) opened the next run, which then stopped
    after its first epoch, KILLED. Here SIGINT is pending when the stage installs its handlers: the stage's study
    ends KILLED with no run, in one line, exit 130."""
    stopped = run_with_a_stop_pending([sys.executable, "-m", "pipeline.dvc_stages", "train"], repo)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("interrupted: any run being trained ended KILLED"), \
        stopped.stderr
    study, children = study_runs(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}", latest=True)
    assert study.info.status == "KILLED" and children == []
