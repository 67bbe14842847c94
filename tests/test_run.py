"""`python -m pipeline.run` end to end, as a user runs it: real Hydra, real TFDS, real MLflow store."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import PROJECT_ROOT, run_cli, runs_of
from pipeline.record import ISA_CAPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    result = run_cli(
        "pipeline.run", "train.epochs=2", "loss=probs", f"data_dir={data_dir}", f"hydra.run.dir={root / 'out'}",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(uri)
    return uri, run, root, result


def test_run_is_complete_in_mlflow(finished_run):
    uri, run, root, result = finished_run
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["formulation"] == "probs" and tags["dataset"] == "mnist_sample" and tags["task"] == "multiclass"
    assert tags["seed"] == "0" and tags["effective_from_logits"] == "true"
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["dataset_sha256"].startswith("246e0c30")
    assert f", {platform.machine()}: " in tags["cpu"]  # the processor: it decides the kernels, hence round-off
    assert params["loss.formulation"] == "probs" and params["train.epochs"] == "2" and params["model.hidden_units"] == "[25, 15]"
    for key in ["test_accuracy", "test_nll", "test_ece", "test_brier"]:
        assert np.isfinite(metrics[key])
    assert metrics["test_accuracy"] > 0.6
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_nll_float64")
    assert [m.step for m in history] == [1, 2]
    written = json.loads((root / "out" / "metrics.json").read_text())
    assert written["test_nll"] == pytest.approx(metrics["test_nll"]) and written["run_id"] == run.info.run_id
    assert run.info.run_id in result.stdout


def test_a_cap_on_the_cpus_vector_instructions_is_part_of_the_recorded_cpu():
    """ONEDNN_MAX_CPU_ISA changes which kernels TensorFlow runs, so the numbers a chaotic setting ends with."""
    describe = [sys.executable, "-c", "from pipeline.record import cpu_description; print(cpu_description())"]
    uncapped = {k: v for k, v in os.environ.items() if k not in ISA_CAPS}
    plain = subprocess.run(describe, capture_output=True, text=True, check=True, env=uncapped).stdout.strip()
    capped = subprocess.run(describe, capture_output=True, text=True, check=True,
                            env={**uncapped, "ONEDNN_MAX_CPU_ISA": "SSE41"}).stdout.strip()
    assert f", {platform.machine()}: " in plain and "ONEDNN_MAX_CPU_ISA" not in plain
    assert capped == f"{plain} ONEDNN_MAX_CPU_ISA=SSE41"


def test_a_default_run_prints_nothing_that_reads_as_an_error(finished_run):
    """TensorFlow's import-time C++ notices (I0000/E0000 lines, absl's pre-init warning) are held back."""
    _, _, _, result = finished_run
    output = (result.stdout + result.stderr).splitlines()
    noise = [line for line in output if re.match(r"[EIWF]\d{4} ", line) or "absl::InitializeLog" in line
             or "Traceback" in line or "retracing" in line or line.startswith(("ERROR", "WARNING"))]
    assert noise == [], noise


def test_a_process_leaves_out_what_tensorflow_and_keras_import_for_features_it_never_uses():
    """TFLite's jax, Keras's scikit-learn and matplotlib are held back from those importers only (about 3 s of every
    process's start); imported by anything else they load as usual, and Keras goes on without its wrappers."""
    import subprocess
    import sys

    script = ("import sys, pipeline, pipeline.stages; "
              "held = sorted(m for m in ('jax', 'matplotlib', 'sklearn') if m not in sys.modules); "
              "import jax, matplotlib.pyplot, sklearn; from keras.src.wrappers import fixes; "
              "print(held, fixes.sklearn is None, jax.numpy.ones(2).sum())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["['jax',", "'matplotlib',", "'sklearn']", "True", "2.0"]


def test_logged_model_loads_back_and_predicts_probabilities(finished_run, data_dir):
    uri, run, _, _ = finished_run
    from pipeline.config import DatasetConfig
    from pipeline.data import load

    mlflow.set_tracking_uri(uri)
    splits = load(DatasetConfig(), data_dir)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    probabilities = np.asarray(model.predict(splits.x_test[:50]))
    assert probabilities.shape == (50, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean(probabilities.argmax(axis=1) == splits.y_test[:50])
    assert accuracy > 0.5
    import yaml

    config = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/config.yaml")).read_text())
    assert config["loss"]["formulation"] == "probs"


BAD_INPUT = [
    ("loss=prob", "loss=prob is not accepted: expected one of logits, probs, probs_naive"),
    ("experiment=nope", "experiment=nope is not accepted: expected one of atlas, backends, high_lr, mixed_float16, raw_pixels, seed_logistic, seed_mnist"),
    ("train.epochs=0", "train.epochs=0 is not accepted: expected a whole number > 0"),
    ("train.batch_size=0", "train.batch_size=0 is not accepted: expected a whole number > 0"),
    ("train.learning_rate=-1e-3", "train.learning_rate=-0.001 is not accepted: expected a finite number > 0"),
    # Not a number to train or wait with: inf trained to NaN in one step (a DIVERGED run, exit 0).
    ("train.learning_rate=inf", "train.learning_rate=inf is not accepted: expected a finite number > 0"),
    ("tracking.timeout_seconds=inf", "tracking.timeout_seconds=inf is not accepted: expected a finite number > 0"),
    ("tracking.flush_seconds=nan", "tracking.flush_seconds=nan is not accepted: expected a finite number >= 0"),
    ("tracking.give_up_seconds=inf", "tracking.give_up_seconds=inf is not accepted: expected a finite number >= "),
    ("dataset.validation_fraction=1", "dataset.validation_fraction=1.0 is not accepted: expected a number in [0, 1)"),
    ("train.epochs=ten", "train.epochs=ten is not accepted: expected a whole number"),
    # OmegaConf's "Value '1.5' of type 'float' could not be converted to Integer", said as the pipeline says it
    ("seed=1.5", "seed=1.5 is not accepted: expected a whole number"),
    ("seed=1e400", "seed=1e400 is not accepted: expected a whole number"),
    ("train.epoch=3", "train.epoch=3 is not accepted: Key 'epoch' not in 'TrainConfig'"),
    ("dataset=mnist_sample_binary dataset.classes=[0,1,2]", "dataset.classes=[0, 1, 2] is not accepted: expected two distinct class ids"),
    ("-m loss=probs,prob seed=0,1", "loss=prob is not accepted: expected one of logits, probs, probs_naive"),
    ("-m train.epochs=3,0", "train.epochs=0 is not accepted: expected a whole number > 0"),
    # Names that would become paths, and seeds numpy cannot take: refused before anything runs.
    ("study=../../some-folder", "study='../../some-folder' is not accepted: expected 1 to 64 letters, digits"),
    ("study=", "study='' is not accepted: expected 1 to 64 letters"),
    ("study=" + "x" * 300, "study='" + "x" * 300 + "' is not accepted: expected 1 to 64 letters"),
    ("tracking.experiment=", "tracking.experiment='' is not accepted: expected 1 to 64 letters"),
    ("seed=-1", "seed=-1 is not accepted: expected a whole number in [0, 4294967296)"),
    ("seed=99999999999", "seed=99999999999 is not accepted: expected a whole number in [0, 4294967296)"),
    # Folders the run would write into that cannot be folders: refused before anything runs.
    ("checkpoints_dir=/dev/null/x", "checkpoints_dir='/dev/null/x' is not accepted: /dev/null is not a folder; "
                                    "expected a folder that exists or can be created and written"),
    ("-m reports_dir=/dev/null", "reports_dir='/dev/null' is not accepted: /dev/null is not a folder"),
    ("data_dir=/dev/null/tfds", "data_dir='/dev/null/tfds' is not accepted: /dev/null is not a folder; "
                                "expected a folder that exists or can be created"),
    ("output_dir=/dev/null", "output_dir='/dev/null' is not accepted: /dev/null is not a folder"),
    ("hydra.run.dir=/dev/null/run", "hydra.run.dir='/dev/null/run' is not accepted: /dev/null is not a folder"),
    ("-m hydra.sweep.dir=/dev/null/sweep", "hydra.sweep.dir='/dev/null/sweep' is not accepted: /dev/null is not a folder"),
    # An empty folder path would be the project root (data_dir=: the dataset was written there) or Hydra's start.
    ("data_dir=", "data_dir='' is not accepted: it is empty; expected the path of a folder"),
    ("checkpoints_dir=''", "checkpoints_dir='' is not accepted: it is empty; expected the path of a folder"),
    ("-m reports_dir=", "reports_dir='' is not accepted: it is empty; expected the path of a folder"),
    ("output_dir=", "output_dir='' is not accepted: it is empty; expected the path of a folder"),
    ("hydra.run.dir=", "hydra.run.dir='' is not accepted: it is empty; expected the path of a folder"),
    # '~' quoted past the shell (or from a YAML file) is not a home folder here: it was made as a folder named '~'.
    ("checkpoints_dir='~/ck'", f"checkpoints_dir='~/ck' is not accepted: '~' is not expanded here, so it would be a "
                               f"folder named '~' in {PROJECT_ROOT}; expected the path written out, e.g. {Path.home()}/ck"),
    ("data_dir='~'", f"data_dir='~' is not accepted: '~' is not expanded here, so it would be a folder named '~' in "
                     f"{PROJECT_ROOT}; expected the path written out, e.g. {Path.home()}"),
    ("-m hydra.sweep.dir='~nobody-here/sweeps'", "hydra.sweep.dir='~nobody-here/sweeps' is not accepted: '~' is not "
                                                 "expanded here, so it would be a folder named '~nobody-here' in "),
    ("output_dir='~/o'", "output_dir='~/o' is not accepted: '~' is not expanded here"),
    ("-m reports_dir='~/r'", "reports_dir='~/r' is not accepted: '~' is not expanded here"),
    # An empty store (tracking.uri=$SERVER with SERVER unset) went to the local store as if none was given.
    ("tracking.uri=", "tracking.uri='' is not accepted: it is empty; expected a store's URI (sqlite:///<file>, "
                      "http://<host>:<port>, …), or null for $MLFLOW_TRACKING_URI, else the local store"),
    # A word that is no override (key=value, ~key, +key=value): Hydra's parse error over two lines, exit 1.
    ("loss probs", "loss is not accepted: expected key=value in Hydra's override grammar (e.g. loss=probs)"),
    ("-m seed=0,1 probs", "probs is not accepted: expected key=value"),
    # A folder that takes no new folders although access() says it is writable (root, in /proc): found before the
    # study trains, not when its report is written.
    ("-m reports_dir=/proc/fromlogits-reports", "reports_dir='/proc/fromlogits-reports' is not accepted: /proc "),
    # A config group's value is one of its files, never a path into another group's folder.
    ("loss=../experiment/atlas", "loss=../experiment/atlas is not accepted: expected one of logits, probs, probs_naive"),
    ("-m experiment=../config", "experiment=../config is not accepted: expected one of atlas, backends, high_lr"),
    ("hydra/launcher=../../x", "hydra/launcher=../../x is not accepted: expected one of basic, joblib, local_processes, submitit_local"),
    # A key added with + must be one the config has (a typo would otherwise be carried along unread).
    ("+trian.epochs=3", "+trian.epochs=3 is not accepted: Key 'trian' not in 'Config'"),
    # The override at fault is named, wherever it stands.
    ("seed=0 loss=prob", "loss=prob is not accepted: expected one of logits, probs, probs_naive"),
    ("seed=0 train.epoch=3", "train.epoch=3 is not accepted: Key 'epoch' not in 'TrainConfig'"),
    # A sweep of nothing, or of one value twice (its runs would be counted twice).
    ("-m seed=range(0)", "seed=range(0) is not accepted: it sweeps no values; expected distinct values, at least one"),
    ("-m loss=probs,logits,probs", "loss=probs,logits,probs is not accepted: probs appears more than once"),
    # What Hydra's grammar cannot read: the override named, not only the lexer's complaint.
    ("loss=probs;rm", "loss=probs;rm is not accepted: cannot parse it (LexerNoViableAltException"),
    ("seed=0 dataset.classes=[0,1", "dataset.classes=[0,1 is not accepted: cannot parse it"),
    # A study preset's sweeps (hydra.sweeper.params, in its file or on the command line) before the study opens:
    # each value once, a group's against its options, any other set into the config and validated.
    ("-m hydra.sweeper.params.seed=0,1", "hydra.sweeper.params.seed=0,1 is not accepted: Hydra's own settings cannot be "
                                         "swept; expected a sweep of the pipeline's config"),
    ("-m experiment=seed_logistic hydra.sweeper.params.loss='probs,nonsense'",
     "loss=nonsense is not accepted: expected one of logits, probs, probs_naive (a sweep of hydra.sweeper.params)"),
    ("-m experiment=seed_logistic hydra.sweeper.params.seed='0,x'",
     "seed=x is not accepted: expected a whole number (a sweep of hydra.sweeper.params)"),
    ("-m experiment=seed_logistic hydra.sweeper.params.seed='0,-1'",
     "seed=-1 is not accepted: expected a whole number in [0, 4294967296) (a sweep of hydra.sweeper.params)"),
    ("-m hydra.sweeper.params.seed='0,1'", "hydra.sweeper.params.seed='0,1' is not accepted: this config sweeps nothing "
                                           "of its own (its hydra.sweeper.params is null)"),
    ("-m experiment=seed_mnist,seed_logistic hydra.sweeper.params.seed='0,x'",
     "seed=x is not accepted: expected a whole number (a sweep of hydra.sweeper.params)"),
    # Hydra's own settings: composed before Hydra runs (a traceback, exit 1, before), and launcher and sweeper
    # settings that Hydra's plugins refuse only once the study has opened (its parent run then failed, exit 1).
    ("-m hydra.launcher.n_jobs=abc", "hydra.launcher.n_jobs=abc is not accepted: expected a whole number"),
    ("-m hydra.launcher.njobs=2", "hydra.launcher.njobs=2 is not accepted: Key 'njobs' not in 'JobLibLauncherConf'"),
    ("-m hydra/launcher=basic hydra.launcher.n_jobs=2", "hydra.launcher.n_jobs=2 is not accepted: Key 'n_jobs' not in"),
    ("hydra.job.chdir=maybe", "hydra.job.chdir=maybe is not accepted: Value 'maybe' is not a valid bool"),
    ("-m hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0 is not accepted: expected the number of jobs at once (> 0)"),
    ("-m experiment=seed_mnist hydra.sweeper.max_batch_size=0",
     "hydra.sweeper.max_batch_size=0 is not accepted: expected a whole number > 0 of jobs per batch, or null"),
    ("-m experiment=seed_logistic +hydra.sweeper.params.train.epochs='1,2'",
     "+hydra.sweeper.params.train.epochs='1,2' is not accepted: "),
    # One output folder for a sweep's jobs: each wrote its metrics.json there over the one before, and one was left.
    ("-m seed=0,1 output_dir=/tmp/fromlogits-out", "output_dir='/tmp/fromlogits-out' is not accepted in a sweep of 2 jobs: "
                                                   "each would write its metrics.json there over the one before; expected"),
    ("-m experiment=seed_logistic loss=logits output_dir=out", "output_dir='out' is not accepted in a sweep of 5 jobs"),
    ("-m seed=0,1 output_dir=a,b loss=probs,logits", "output_dir='a' is not accepted in a sweep of 8 jobs"),
    # One job folder for a sweep's jobs (output_dir unset: Hydra's hydra.sweep.dir/hydra.sweep.subdir), as above.
    ("-m seed=0,1 hydra.sweep.subdir=", "hydra.sweep.subdir='' is not accepted in a sweep of 2 jobs: each job's folder "
                                        "would be the same, and each job would write its metrics.json there over the "
                                        "one before; expected a folder per job, e.g. hydra.sweep.subdir='${hydra.job.num}'"),
    ("-m experiment=seed_logistic hydra.sweep.subdir=all", "hydra.sweep.subdir='all' is not accepted in a sweep of 15 jobs"),
    # A job folder that cannot be one: the study opened, then its launcher failed (exit 1, the parent run FAILED).
    ("-m seed=0 hydra.sweep.subdir=/dev/null/x", "hydra.sweep.subdir='/dev/null/x' is not accepted: /dev/null is not a "
                                                 "folder"),
    ("-m seed=0 hydra.sweep.dir=/tmp hydra.sweep.subdir='~/x'", "hydra.sweep.subdir='~/x' is not accepted: '~' is not "
                                                                "expanded here, so it would be a folder named '~' in /tmp"),
    # Hydra's flags for one configuration with -m: Hydra's ValueError as a traceback, exit 1.
    ("-m experiment=seed_logistic --cfg job", "--cfg is not accepted with -m: it shows or runs one configuration; "
                                              "expected it without -m"),
    ("experiment=seed_logistic --info -m", "--info is not accepted with -m"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUT)
def test_every_bad_override_is_one_line_naming_the_value(overrides, expected):
    from pipeline.config.overrides import precheck_overrides

    assert precheck_overrides(overrides.split()).startswith(expected)


def test_a_command_whose_later_study_has_someone_elses_report_folder_is_refused_before_any_study(tmp_path):
    """`experiment=a,b` with b's report folder someone else's: a trained whole, then b was refused as it opened."""
    from pipeline.config.overrides import precheck_overrides

    theirs = tmp_path / "seed_logistic"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("precious")
    assert precheck_overrides(["-m", "experiment=seed_mnist,seed_logistic", f"reports_dir={tmp_path}"]) == (
        f"{theirs} exists and is not a report folder of this pipeline (no .fromlogits-report in it); "
        "choose another study name or output folder, or remove it yourself")
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    assert precheck_overrides(["-m", "experiment=seed_mnist", f"reports_dir={tmp_path}"]) is None  # its own is free


def test_good_overrides_pass_the_precheck():
    from pipeline.config.overrides import precheck_overrides

    assert precheck_overrides(["-m", "experiment=seed_mnist", "loss=probs,logits", "seed=range(3)", "hydra/launcher=joblib"]) is None
    assert precheck_overrides(["-m", "experiment=seed_mnist,seed_logistic"]) is None  # the presets' own sweeps
    assert precheck_overrides(["-m", "experiment=seed_logistic", "hydra.sweeper.params.seed='3,4'"]) is None
    for preset in sorted(Path(__file__).parents[1].glob("conf/experiment/*.yaml")):  # every preset's own sweeps
        assert precheck_overrides(["-m", f"experiment={preset.stem}"]) is None, preset.stem
    # Each preset's study with its own sweeper params (before that check existed, this ran two studies).
    assert precheck_overrides(["-m", "experiment=seed_mnist,seed_logistic", "hydra.sweeper.params.seed='0,1'"]) is None
    # Hydra settings that need another before them on the command line (a launcher's own keys after the launcher).
    assert precheck_overrides(["-m", "hydra.launcher.partition=x", "hydra/launcher=submitit_slurm"]) is None
    assert precheck_overrides(["-m", "hydra.launcher.n_jobs=-5", "hydra.sweeper.max_batch_size=3"]) is None
    # Values that read Hydra's job (its number, its folder) resolve as in the job: the pre-check once refused
    # them ("HydraConfig was not set"). A sweep's jobs may then each have an output folder of their own.
    assert precheck_overrides(["checkpoints_dir=${hydra:runtime.output_dir}/checkpoints"]) is None
    assert precheck_overrides(["-m", "seed=0,1", "output_dir=out/${hydra:job.num}"]) is None
    assert precheck_overrides(["-m", "experiment=seed_logistic", "output_dir=${hydra:runtime.output_dir}/m"]) is None
    assert precheck_overrides(["-m", "seed=0", "output_dir=out"]) is None  # a sweep of one job
    assert precheck_overrides(["-m", "seed=0", "output_dir=a,b"]) is None  # each job its own value
    assert precheck_overrides(["-m", "seed=0,1", "hydra.sweep.subdir=${hydra.job.override_dirname}"]) is None
    assert precheck_overrides(["-m", "seed=0,1", "hydra.sweep.subdir=", "output_dir=out/${hydra:job.num}"]) is None
    assert precheck_overrides(["-m", "seed=0", "hydra.sweep.subdir="]) is None  # one job: its folder is the sweep's
    # "." names the folder it is relative to, as a path may (it has no first component to be a '~').
    assert precheck_overrides(["hydra.run.dir=.", "checkpoints_dir=.", "output_dir=./"]) is None
    assert precheck_overrides(["-m", "seed=0", "hydra.sweep.dir=.", "hydra.sweep.subdir=."]) is None
    # Hydra's flags keep their values; a deletion (~key) needs no value.
    assert precheck_overrides(["--cfg", "job", "-p", "train", "~seed", "--config-name", "config", "-cp", "../conf"]) is None


@pytest.mark.parametrize("char", list("~!#&;<=>^`()[]{}'\""))
def test_a_character_hydra_reads_only_quoted_is_named_in_the_hint(char):
    """The hint named ;()[]{},'" only: `checkpoints_dir=a~b` (or !, #, &, <, =, >, ^, `) was refused without it."""
    from pipeline.config.overrides import UNQUOTABLE, precheck_overrides

    problem = precheck_overrides([f"checkpoints_dir=a{char}b"])
    assert problem.startswith(f"checkpoints_dir=a{char}b is not accepted: cannot parse it"), problem
    assert problem.endswith(f"with a value holding spaces or any of {UNQUOTABLE} quoted") and char in UNQUOTABLE
    quote = '"' if char == "'" else "'"
    assert "cannot parse" not in (precheck_overrides([f"checkpoints_dir={quote}a{char}b{quote}"]) or "")


def test_a_glob_sweep_of_a_config_group_is_checked_as_its_options():
    """Hydra's glob() sweeps a group's options (loss=glob(*), experiment=glob(seed_*)); it needs Hydra's config
    loader to list them, which the pre-check once parsed without: a traceback, exit 1."""
    from pipeline.config.overrides import precheck_overrides, studies_of

    assert precheck_overrides(["-m", "loss=glob(*)", "seed=0"]) is None
    assert precheck_overrides(["-m", "experiment=glob(seed_*)"]) is None
    assert precheck_overrides(["-m", "experiment=seed_logistic", "hydra.sweeper.params.loss='glob(*,exclude=probs)'"]) is None
    assert precheck_overrides(["-m", "loss=glob(nothing*)"]).startswith(
        "loss=glob(nothing*) is not accepted: it sweeps no values")
    assert list(studies_of(["-m", "experiment=glob(seed_*)", "seed=0"])) == ["seed_logistic", "seed_mnist"]


def test_a_sweep_composes_each_override_value_once_before_its_first_job():
    """Hydra's basic sweeper composes every job's config before launching (0.2-0.3 s each, 3-4.5 s of a 15-job
    study); the project's composes the first job and one per further value, and still every value."""
    from hydra_plugins.fromlogits_sweeper import jobs_with_new_values

    batch = [[f"loss={arm}", f"seed={seed}"] for arm in ("probs", "logits", "probs_naive") for seed in range(5)]
    seen: set[str] = set()
    checked = jobs_with_new_values(batch, seen)
    assert checked == [batch[0], batch[1], batch[2], batch[3], batch[4], batch[5], batch[10]]
    assert {o for job in checked for o in job} == {o for job in batch for o in job}
    assert jobs_with_new_values(batch[3:], seen) == []  # a later batch (max_batch_size) brings nothing new
    assert jobs_with_new_values([["loss=probs", "seed=7"]], seen) == [["loss=probs", "seed=7"]]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        BAD_INPUT[0],  # composition error
        BAD_INPUT[6],  # wrong type
        ("dataset.name=no_such_digits", "dataset.name='no_such_digits' is not accepted: expected a TFDS dataset name"),
        ("dataset=mnist_sample_binary dataset.classes=[0,12]", "dataset.classes=[0, 12] is not accepted: class(es) [12] are absent"),
        ("-m experiment=seed_mnist,seed_logistic study=tiny",  # two studies of one name (tests/test_study.py)
         "study=tiny is not accepted with experiment=seed_mnist,seed_logistic: every study would share it"),
        # -m after an override, as users type it: Hydra's own parser gave its usage and "unrecognized arguments"
        ("train.epochs=1 -m reports_dir=/proc/fromlogits-reports experiment=seed_logistic",
         "reports_dir='/proc/fromlogits-reports' is not accepted: /proc "),
    ],
)
def test_bad_input_from_the_command_line_is_one_line_and_leaves_no_run(tmp_path, data_dir, overrides, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("pipeline.run", *overrides.split(), f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'out'}",
                     env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {expected}"), last
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert [r.info.status for r in runs_of(uri)] == []
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("port", ["abc", "99999", "5000'; import os"])
def test_make_ui_refuses_a_bad_port_in_one_line_naming_it(tmp_path, port):
    import subprocess
    import sys

    venv = tmp_path / "venv"  # stands for a set-up .venv (newer than pyproject.toml), so no install runs
    venv.mkdir()
    (venv / ".installed").touch()
    result = subprocess.run(["make", "-s", "ui", f"UI_PORT={port}", f"VENV={venv}", f"PY={sys.executable}"],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (f"error: UI_PORT={port!r} is not accepted: expected a port number "
                                             "in 1..65535")
    assert "Traceback" not in result.stderr


def test_make_clean_outputs_removes_only_what_the_pipeline_made(tmp_path):
    """`make clean-outputs` ran `rm -rf outputs multirun reports`: a top-level multirun/ (the pipeline's sweeps go
    to outputs/multirun/) and a researcher's own files in reports/ went with it; then `rm -rf outputs`, and their
    own files in outputs/ with it."""
    import shutil
    import subprocess

    from pipeline.files import MARKER

    shutil.copy(Path(__file__).parents[1] / "Makefile", tmp_path / "Makefile")
    for made in ("runs/2026-12-06_01-00-00-000000_logits", "multirun/x/0_probs_seed0", "checkpoints/0123", "dvc/models",
                 "jax-cache", "screenshots"):
        (tmp_path / "outputs" / made).mkdir(parents=True)
    (tmp_path / "multirun" / "mine").mkdir(parents=True)
    for study in ("seed_mnist", "a study"):
        (tmp_path / "reports" / study).mkdir(parents=True)
        (tmp_path / "reports" / study / MARKER).write_text("")
    (tmp_path / "reports" / "notes").mkdir()
    (tmp_path / "reports" / "notes" / "draft.md").write_text("mine")
    (tmp_path / "outputs" / "analysis.ipynb").write_text("mine")  # went with `rm -rf outputs`
    result = subprocess.run(["make", "-s", "clean-outputs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "multirun", "outputs", "reports"]
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["notes"]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["analysis.ipynb"]

    shutil.rmtree(tmp_path / "reports" / "notes")
    (tmp_path / "outputs" / "analysis.ipynb").unlink()
    subprocess.run(["make", "-s", "clean-outputs"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "multirun"]  # empty outputs/, reports/ go too


@pytest.mark.parametrize("script,args,expected", [
    ("train_throughput.py", ["--formulations", "probs,bogus"],  # pipeline.cli's parser: the usage after the error
     "error: --formulations=probs,bogus is not accepted: expected a comma-separated list of probs, logits, probs_naive; "
     "usage: train_throughput.py [-h] [--examples EXAMPLES]"),
    ("study_speed.py", ["--pipeline-args", "loss=bogus"],
     "error: --pipeline-args: loss=bogus is not accepted: expected one of logits, probs, probs_naive; usage: "
     "study_speed.py [-h] [--epochs EPOCHS]"),
    ("study_speed.py", ["--epocs", "3"], "error: unrecognized arguments: --epocs 3; usage: study_speed.py [-h]"),
    # argparse's own "invalid int value: 'abc'" said neither what is accepted nor, for 1, that it is out of range
    ("study_speed.py", ["--epochs", "abc"], "error: argument --epochs: 'abc' is not accepted: expected a whole number >= 1; "
                                           "usage: study_speed.py"),
    ("train_throughput.py", ["--epochs", "1"], "error: argument --epochs: '1' is not accepted: expected a whole number >= 2; "
                                               "usage: train_throughput.py"),
    # The pipeline's side would no longer run the trainings the note's code repeats (this one ran the atlas)
    ("study_speed.py", ["--pipeline-args", "experiment=atlas"],
     "error: --pipeline-args: experiment=atlas is not accepted: it changes the trainings the note's code repeats"),
    ("study_speed.py", ["--pipeline-args", "hydra/launcher=basic train.epochs=3"],
     "error: --pipeline-args: train.epochs=3 is not accepted: it changes the trainings the note's code repeats"),
])
def test_the_benchmarks_refuse_bad_arguments_in_one_line(script, args, expected):
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(expected), line


def test_the_epoch_parts_benchmark_times_each_variant_and_takes_nothing_from_the_pipelines_epoch(monkeypatch):
    """benchmarks/epoch_parts.py's variant without updates applies none: the weights stay as built (its
    "saves" column rests on that); its whole epoch is the pipeline's own `make_epoch_fn`."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import keras
    import numpy as np
    import tensorflow as tf

    from epoch_parts import NoUpdate
    from pipeline.formulations import formulation
    from pipeline.loops.tensorflow import make_epoch_fn
    from pipeline.models import build_classifier

    form = formulation("probs", "multiclass")
    clf = build_classifier(form, 8, 10, [25, 15], "relu", seed=0)
    before = [w.copy() for w in clf.model.get_weights()]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(clf.model.trainable_variables)
    rng = np.random.default_rng(0)
    run_epoch = make_epoch_fn(clf.model, form.loss(), optimizer, 32, updater=NoUpdate())
    loss = float(run_epoch(tf.constant(rng.random((100, 8), dtype=np.float32)), tf.constant(rng.integers(0, 10, 100)),
                           tf.constant(rng.permutation(100).astype(np.int32))))
    assert np.isfinite(loss) and loss > 0
    assert all(np.array_equal(a, b) for a, b in zip(before, clf.model.get_weights()))

    result = subprocess.run([sys.executable, str(root / "benchmarks" / "epoch_parts.py"), "--quick"], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[-3:]]
    assert [" ".join(row[:4]) for row in rows] == ["the epoch as the", "without the optimizer's update", "with 8 inputs instead"]
    assert all(float(row[-1 if i == 0 else -2]) > 0 for i, row in enumerate(rows)), result.stdout


def test_the_study_benchmark_runs_the_note_as_written_with_tensorflows_default_threads(tmp_path, monkeypatch):
    """`study_speed.py --note-as-written` times the note's script with the threads TensorFlow picks (the note sets
    none), where `--note-as-scripts` hands it the pipeline's (this process's: pipeline/__init__.py); the script
    trains either way."""
    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    from study_speed import NOTE_SCRIPT, note_environment

    threads = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
    assert [note_environment(as_written=False)[name] for name in threads] == [os.environ[name] for name in threads]
    assert [note_environment(as_written=True)[name] for name in threads] == ["0", "0"]  # TensorFlow's "not specified"
    rng = np.random.default_rng(0)
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=rng.random((64, 784), dtype=np.float32), y_train=rng.integers(0, 10, 64),
             x_test=rng.random((16, 784), dtype=np.float32), y_test=rng.integers(0, 10, 16))
    spec = {"task": "multiclass", "num_classes": 10, "hidden_units": [25, 15], "activation": "relu",
            "learning_rate": 1e-3, "arm": "probs", "seed": 0, "epochs": 2}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "study_speed.py"), NOTE_SCRIPT, str(data),
                           json.dumps(spec)], cwd=root, capture_output=True, text=True, timeout=300,
                          env=note_environment(as_written=True))
    assert done.returncode == 0, done.stderr[-3000:]


FAKE_PYTHON = """#!/bin/sh
# A stand-in for python3 that makes a venv in no time and whose pip records when it runs.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "start $$" >> "{log}"; sleep 1; echo "end $$" >> "{log}"; exit 0
fi
exec "{python}" "$@"
"""


def test_two_makes_at_once_on_a_fresh_clone_take_turns_to_set_up(tmp_path):
    """make study and make test started together must not run pip into one venv at once; the second
    finds the venv set up and installs nothing."""
    import subprocess
    import sys

    log = tmp_path / "pip.log"
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON.format(log=log, python=sys.executable))
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    command = ["make", "-s", "setup", f"PYTHON={fake}", f"VENV={venv}"]
    makes = [subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for make in makes:
        make.communicate(timeout=120)
        assert make.returncode == 0
    # One setup's two pip commands (upgrade pip, install the project), one after the other, never side by side.
    events = log.read_text().split()
    assert events[0::2] == ["start", "end", "start", "end"]
    assert (venv / ".installed").exists()
