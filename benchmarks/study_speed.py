"""The default study against the note's code doing the same trainings, side by side in one invocation.

    python benchmarks/study_speed.py                 # `make study`'s two studies: 30 runs x 100 epochs
    python benchmarks/study_speed.py --epochs 20     # shorter, same shape
    python benchmarks/study_speed.py --note-as-scripts   # also the note's code as 30 scripts (+10 minutes)
    python benchmarks/study_speed.py --note-as-written   # also as the note is written: 30 scripts, TF's threads

Pipeline: `python -m pipeline.run -m experiment=seed_mnist,seed_logistic`, the command `make study` runs
(tracking, diagnostics, models, reports), into a temporary store; each study's own time is what it prints
("study took": from its parent run's start to its report, not the process's start-up). Note's code: for every arm
x seed of those studies, the note's model as written (`Sequential` of Dense 25-15 + the arm's output layer,
`compile(Adam(1e-3), loss)`, `model.fit(X, Y, epochs=N)` with Keras's defaults, then `evaluate`) on the
same training and test digits, no tracking, in one process (it is charged one import, not thirty), with
the pipeline's TensorFlow settings (one thread: pipeline/__init__.py); with TensorFlow's defaults its
probs_naive epochs measured slower (3.0 s vs 2.2 s, train_throughput.py). With `--note-as-scripts` the
note's code is also timed as the issue measured it and a researcher runs it: one process per training, each
paying its own imports (TensorFlow's and Keras's whole import: not the pipeline's shorter one), as each of
the pipeline's studies does, still with the pipeline's thread settings. With `--note-as-written` the 30 scripts
are also timed with TensorFlow's default threads, exactly as the note is written (it sets none).
Prints both wall times and their ratio, then per-epoch throughput for every arm on both backends
(benchmarks/train_throughput.py; `--no-throughput` leaves it out).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDIES = {"seed_mnist": ("mnist_sample", "seed_relu"), "seed_logistic": ("mnist_sample_binary", "seed_sigmoid")}
ARMS = ("probs", "logits", "probs_naive")
SEEDS = range(5)
NOTE_SCRIPT = "--note-script"  # the first argument of note_scripts' processes (note_script), not a user's option


def pipeline_studies(epochs: int, store: Path, extra: list[str]) -> tuple[float, dict[str, float]]:
    """`make study`'s command; returns its wall time and each study's own ("study took")."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "-m", f"experiment={','.join(STUDIES)}",
                           f"train.epochs={epochs}", f"reports_dir={store / 'reports'}",
                           f"hydra.sweep.dir={store}/${{study}}", *extra],
                          cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    seconds = time.perf_counter() - started
    took = [float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("study took ")]
    return seconds, dict(zip(STUDIES, took))


def note_datasets() -> dict:
    """Each study's config and its training and test digits, as the pipeline reads them."""
    from hydra import compose

    from pipeline.config import register_configs, validate
    from pipeline.config.overrides import project_hydra
    from pipeline.data import fetch, load

    register_configs()
    datasets = {}
    with project_hydra():
        for study in STUDIES:
            cfg = validate(compose(config_name="config", overrides=[f"experiment={study}"]))
            fetch(cfg.dataset, cfg.data_dir)
            datasets[study] = cfg, load(cfg.dataset, cfg.data_dir)
    return datasets


def note_training(arrays, task: str, num_classes: int, hidden_units, activation: str, learning_rate: float,
                  arm: str, seed: int, epochs: int) -> None:
    """One training as the note writes it: build, compile, `model.fit`, `evaluate`."""
    import keras

    from pipeline.formulations import formulation

    x_train, y_train, x_test, y_test = arrays
    form = formulation(arm, task)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((x_train.shape[1],)), *[
        keras.layers.Dense(u, activation=activation) for u in hidden_units],
        keras.layers.Dense(form.output_width(num_classes), activation=form.output_activation())])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=form.loss(), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, verbose=0)
    model.evaluate(x_test, y_test, verbose=0)


def note_code(epochs: int) -> float:
    """The 30 trainings with the note's code, in this process; returns the wall time including imports."""
    started = time.perf_counter()
    import pipeline  # noqa: F401  (first, as in the pipeline's processes: its thread settings)

    for cfg, splits in note_datasets().values():
        for arm in ARMS:
            for seed in SEEDS:
                note_training((splits.x_train, splits.y_train, splits.x_test, splits.y_test), cfg.dataset.task,
                              splits.num_classes, cfg.model.hidden_units, cfg.model.activation,
                              cfg.train.learning_rate, arm, seed, epochs)
    return time.perf_counter() - started


def note_environment(as_written: bool) -> dict[str, str]:
    """The environment of a note's script: this process's, whose TensorFlow settings are the pipeline's (one
    thread each, pipeline/__init__.py); `as_written`, TensorFlow's defaults instead, as the note sets no threads
    (0 is TensorFlow's "not specified": it then sizes its thread pools by the machine's cores)."""
    return {**os.environ, **({"TF_NUM_INTRAOP_THREADS": "0", "TF_NUM_INTEROP_THREADS": "0"} if as_written else {})}


def note_scripts(epochs: int, folder: Path, as_written: bool = False) -> float:
    """The 30 trainings with the note's code as 30 scripts, one process each (how the issue measured it:
    a researcher runs the note's script once per arm and seed); returns the sum of their wall times.
    The digits are handed over in a .npz, so a script pays its imports and training, not the pipeline's
    data loading. `as_written`: with TensorFlow's default threads (note_environment)."""
    import numpy as np

    total = 0.0
    for study, (cfg, splits) in note_datasets().items():
        data = folder / f"{study}.npz"
        np.savez(data, x_train=splits.x_train, y_train=splits.y_train, x_test=splits.x_test, y_test=splits.y_test)
        spec = {"task": cfg.dataset.task.value, "num_classes": splits.num_classes,
                "hidden_units": list(cfg.model.hidden_units), "activation": cfg.model.activation,
                "learning_rate": cfg.train.learning_rate}
        for arm in ARMS:
            for seed in SEEDS:
                started = time.perf_counter()
                # Its output held back (TensorFlow's import notices, unfiltered there), shown if it fails.
                done = subprocess.run([sys.executable, __file__, NOTE_SCRIPT, str(data), json.dumps(
                    {**spec, "arm": arm, "seed": seed, "epochs": epochs})], cwd=ROOT, capture_output=True, text=True,
                    env=note_environment(as_written))
                total += time.perf_counter() - started
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-3000:])
                    raise subprocess.CalledProcessError(done.returncode, done.args)
    return total


def note_script(data: str, spec: str) -> int:
    """One of note_scripts' processes. Keras first, before anything of the pipeline's: a script of the note's
    pays TensorFlow's and Keras's whole import, the optional packages the pipeline holds back included
    (pipeline/__init__.py). Its thread settings come through the environment (note_environment)."""
    import keras  # noqa: F401
    import numpy as np

    with np.load(data) as arrays:
        note_training((arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]), **json.loads(spec))
    return 0


# What the note's code repeats: the studies' presets, their data, networks, formulations, seeds and training
# (the epochs through --epochs), all on TensorFlow. The pipeline's args may change how it runs them, not these.
TRAININGS = ("experiment", "task", "dataset", "model", "loss", "seed", "train", "precision", "backend")


def trainings_changed_by(overrides: list[str]) -> str | None:
    """The first of `overrides` (pre-checked) that changes the trainings both sides run, as one line; else None."""
    from pipeline.config.overrides import parse_overrides

    for override in parse_overrides(overrides):
        if override.key_or_group.lstrip("+~").split(".")[0].split("/")[0] in TRAININGS:
            return (f"{override.input_line} is not accepted: it changes the trainings the note's code repeats "
                    f"({', '.join(TRAININGS)}; the epochs: --epochs); expected settings of how the pipeline runs "
                    "them, e.g. hydra/launcher=basic or tracking.flush_seconds=5")
    return None


def main() -> int:
    if sys.argv[1:2] == [NOTE_SCRIPT]:  # one of note_scripts' processes: nothing of the pipeline's before Keras
        return note_script(*sys.argv[2:4])
    from pipeline.cli import OneLineParser, whole_number
    from pipeline.config.overrides import precheck_overrides

    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=whole_number(1), default=100)
    parser.add_argument("--pipeline-args", default="", help="extra overrides for how the pipeline runs its studies "
                        "(e.g. hydra/launcher=basic), not for what they train")
    parser.add_argument("--no-throughput", action="store_true", help="skip the per-epoch throughput table")
    parser.add_argument("--note-as-scripts", action="store_true",
                        help="also time the note's code as 30 scripts, one process per training (about 10 minutes)")
    parser.add_argument("--note-as-written", action="store_true",
                        help="also time the 30 scripts with TensorFlow's default threads, as the note is written "
                             "(about 10 minutes)")
    args = parser.parse_args()

    problem = precheck_overrides(args.pipeline_args.split()) or trainings_changed_by(args.pipeline_args.split())
    if problem:
        parser.error(f"--pipeline-args: {problem}")
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        try:
            total, study_seconds = pipeline_studies(args.epochs, store, args.pipeline_args.split())
        except subprocess.CalledProcessError as error:  # the pipeline has said why, in one line
            print(f"error: a pipeline study failed (exit {error.returncode}); its message is above", file=sys.stderr)
            return 1
        scripts_seconds = note_scripts(args.epochs, store) if args.note_as_scripts else None
        written_seconds = note_scripts(args.epochs, store, as_written=True) if args.note_as_written else None
    note_seconds = note_code(args.epochs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(STUDIES) * len(ARMS) * len(SEEDS)} trainings "
          f"of {args.epochs} epochs")
    for study, seconds in study_seconds.items():
        print(f"  study {study:<16} {seconds:6.0f} s (its own time, as it prints it)")
    print(f"pipeline, both studies  {total:8.1f} s (one command, as make study: tracking, diagnostics, models, reports)")
    print(f"note's code, same runs  {note_seconds:8.1f} s (model.fit + evaluate, no tracking)")
    print(f"ratio                   {note_seconds / total:8.1f}x", flush=True)
    if scripts_seconds is not None:
        print(f"note's code as 30 scripts {scripts_seconds:6.1f} s (one process per training, each paying its imports)")
        print(f"ratio                   {scripts_seconds / total:8.1f}x", flush=True)
    if written_seconds is not None:
        print(f"note's code as written  {written_seconds:8.1f} s (the 30 scripts with TensorFlow's default threads)")
        print(f"ratio                   {written_seconds / total:8.1f}x", flush=True)
    if not args.no_throughput:
        print("\nper epoch, every arm, both backends (benchmarks/train_throughput.py):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py")], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
