"""The default study against the note's code doing the same trainings, side by side in one invocation.

    python benchmarks/study_speed.py                 # `make study`'s two studies: 30 runs x 100 epochs
    python benchmarks/study_speed.py --epochs 20     # shorter, same shape

Pipeline: `python -m pipeline.run -m experiment=seed_mnist` and `experiment=seed_logistic` as `make study`
runs them (tracking, diagnostics, models, reports), into a temporary store. Note's code: for every arm
x seed of those studies, the note's model as written (`Sequential` of Dense 25-15 + the arm's output layer,
`compile(Adam(1e-3), loss)`, `model.fit(X, Y, epochs=N)` with Keras's defaults, then `evaluate`) on the
same training and test digits, no tracking, in one process (it is charged one import, not thirty), with
the pipeline's TensorFlow settings (one thread: pipeline/__init__.py); with TensorFlow's defaults its
probs_naive epochs measured slower (3.0 s vs 2.2 s, train_throughput.py).
Prints both wall times and their ratio, then per-epoch throughput for every arm on both backends
(benchmarks/train_throughput.py; `--no-throughput` leaves it out).
"""

from __future__ import annotations

import argparse
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


def pipeline_study(study: str, epochs: int, store: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.run", "-m", f"experiment={study}", f"train.epochs={epochs}",
                    f"study={study}", f"reports_dir={store / 'reports'}", f"hydra.sweep.dir={store / study}", *extra],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    return time.perf_counter() - started


def note_code(epochs: int) -> float:
    """The 30 trainings with the note's code, in this process; returns the wall time including imports."""
    started = time.perf_counter()
    import pipeline  # noqa: F401  (first, as in the pipeline's processes: its thread settings)
    import keras

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs, validate
    from pipeline.data import fetch, load
    from pipeline.formulations import formulation

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for study in STUDIES:
            cfg = validate(compose(config_name="config", overrides=[f"experiment={study}"]))
            fetch(cfg.dataset, cfg.data_dir)
            splits = load(cfg.dataset, cfg.data_dir)
            for arm in ARMS:
                form = formulation(arm, cfg.dataset.task)
                for seed in SEEDS:
                    keras.utils.set_random_seed(seed)
                    model = keras.Sequential([keras.Input((784,)), *[
                        keras.layers.Dense(u, activation=cfg.model.activation) for u in cfg.model.hidden_units],
                        keras.layers.Dense(form.output_width(splits.num_classes), activation=form.output_activation())])
                    model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss=form.loss(),
                                  metrics=["accuracy"])
                    model.fit(splits.x_train, splits.y_train, epochs=epochs, verbose=0)
                    model.evaluate(splits.x_test, splits.y_test, verbose=0)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--pipeline-args", default="", help="extra overrides for the pipeline's studies")
    parser.add_argument("--no-throughput", action="store_true", help="skip the per-epoch throughput table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        pipeline_seconds = {s: pipeline_study(s, args.epochs, store, args.pipeline_args.split()) for s in STUDIES}
    note_seconds = note_code(args.epochs)
    total = sum(pipeline_seconds.values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(STUDIES) * len(ARMS) * len(SEEDS)} trainings "
          f"of {args.epochs} epochs")
    for study, seconds in pipeline_seconds.items():
        print(f"pipeline {study:<14} {seconds:8.1f} s")
    print(f"pipeline, both studies  {total:8.1f} s (tracking, diagnostics, models, reports)")
    print(f"note's code, same runs  {note_seconds:8.1f} s (model.fit + evaluate, no tracking)")
    print(f"ratio                   {note_seconds / total:8.1f}x", flush=True)
    if not args.no_throughput:
        print("\nper epoch, every arm, both backends (benchmarks/train_throughput.py):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py")], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
