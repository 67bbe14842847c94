"""Training speed: the course note's code as written vs the pipeline's train stage, side by side, on
Keras's TensorFlow backend and (in a child process each, Keras picks its backend once) on JAX and, where
PyTorch is installed, on torch.

    python benchmarks/train_throughput.py            # 60,000 examples, 3 repetitions x 4 epochs
    python benchmarks/train_throughput.py --quick    # a smoke run (seconds)
    python benchmarks/train_throughput.py --backends tensorflow

Reference: `Sequential([Dense(25, relu), Dense(15, relu), Dense(10, act)])`, `compile(Adam(1e-3), loss)`,
`model.fit(X, Y, epochs=N)` with Keras's defaults (batch 32, shuffle) on NumPy arrays; `verbose=0`, so
the reference is not charged for drawing a progress bar. Contender: `pipeline.train.train`, as
`python -m pipeline.run` uses it, with every per-epoch diagnostic on. Both get the same data, model,
batch size, optimizer and seed, alternate in one process, and are timed per epoch; the first epoch of
each repetition (tracing) is left out of the steady state. An equivalence run with one batch order
for both states how far the weights of the two paths differ.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401  (the pipeline's process settings, before TensorFlow starts)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from pipeline.cli import OneLineParser, whole_number  # noqa: E402
from pipeline.config import (Backend, BackendConfig, Config, ConfigError, DatasetConfig, FormulationName,  # noqa: E402
                             LossConfig, TrainConfig)
from pipeline.data import Splits, fetch, load  # noqa: E402
from pipeline.formulations import formulation  # noqa: E402
from pipeline.loops.equivalence import against_fit  # noqa: E402
from pipeline.train import configure_determinism, train  # noqa: E402

if keras.config.backend() == "tensorflow":
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # each repetition builds new models: retracing is expected


class PeakRSS:
    """Peak resident memory above the starting point while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def tiled_mnist(n: int, data_dir: str) -> Splits:
    """The bundled digits (all 5,000) tiled to n examples, scaled to [0, 1]; 400 held out for diagnostics."""
    fetch(DatasetConfig(), data_dir)
    bundled = load(DatasetConfig(validation_fraction=0.1), data_dir)
    x = np.concatenate([bundled.x_train, bundled.x_val, bundled.x_test])
    y = np.concatenate([bundled.y_train, bundled.y_val, bundled.y_test])
    reps = int(np.ceil(n / len(x)))
    x, y = np.tile(x, (reps, 1))[:n], np.tile(y, reps)[:n]
    return Splits(x, y, bundled.x_val, bundled.y_val, bundled.x_test, bundled.y_test, 10, list(range(10)))


def reference(splits: Splits, name: FormulationName, epochs: int, seed: int):
    """The note's code as written (what `build_classifier` builds is the same stack of layers)."""
    form = formulation(name, "multiclass")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(25, activation="relu"),
        keras.layers.Dense(15, activation="relu"),
        keras.layers.Dense(10, activation=form.output_activation()),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=form.loss())
    timer = EpochTimer()
    history = model.fit(splits.x_train, splits.y_train, epochs=epochs, verbose=0, callbacks=[timer])
    return timer.seconds, history.history["loss"][-1]


def contender(splits: Splits, name: FormulationName, epochs: int, seed: int):
    cfg = Config(loss=LossConfig(name), train=TrainConfig(epochs=epochs), seed=seed)
    result = train(cfg, splits)
    return ([h["epoch_seconds"] for h in result.history], [h["epoch_train_seconds"] for h in result.history],
            result.history[-1]["train_epoch_loss"])


def equivalence(splits: Splits, name: FormulationName, epochs: int = 2) -> float:
    """max |w_fast - w_fit| after `epochs` epochs on the same batch order (fit: shuffle=False on x[order])."""
    form = formulation(name, "multiclass")
    return against_fit(form, splits.x_train[:6000], splits.y_train[:6000], 10, epochs, seed=0)["max_abs_weight_diff"]


def measure(splits: Splits, name: FormulationName, epochs: int, repetitions: int, with_reference: bool) -> dict:
    """Steady-state seconds per epoch (medians) of the note's model.fit and of the pipeline, on this
    process's backend, alternating within each repetition."""
    ref, fast, fast_train, ref_mem, fast_mem, ref_loss, fast_loss = [], [], [], [], [], None, None
    for rep in range(repetitions):
        if with_reference:
            with PeakRSS() as mem:
                ref_seconds, ref_loss = reference(splits, name, epochs, seed=rep)
            ref.append(statistics.median(ref_seconds[1:] or ref_seconds))
            ref_mem.append(mem.mib)
        with PeakRSS() as mem:
            seconds, train_seconds, fast_loss = contender(splits, name, epochs, seed=rep)
        fast.append(statistics.median(seconds[1:] or seconds))
        fast_train.append(statistics.median(train_seconds[1:] or train_seconds))
        fast_mem.append(mem.mib)
    f = statistics.median(fast)
    return {"backend": keras.config.backend(), "note": statistics.median(ref) if ref else None, "pipeline": f,
            "diag_cost": (f - statistics.median(fast_train)) / f, "note_mib": max(ref_mem, default=0.0),
            "pipeline_mib": max(fast_mem), "note_loss": ref_loss, "pipeline_loss": fast_loss,
            "max_dw": equivalence(splits, name)}


def main() -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=whole_number(1), default=60_000)
    parser.add_argument("--epochs", type=whole_number(2), default=4, help="per repetition; the first is warm-up")
    parser.add_argument("--repetitions", type=whole_number(1), default=3)
    parser.add_argument("--formulations", default="probs,logits,probs_naive")
    parser.add_argument("--backends", default="tensorflow,jax" + (",torch" if importlib.util.find_spec("torch") else ""),
                        help="the pipeline's loop on these Keras backends (default: torch too where it is installed)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "tfds"))
    parser.add_argument("--quick", action="store_true", help="6,000 examples, 2 epochs, 1 repetition")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # measure this backend, print JSON
    args = parser.parse_args()
    if args.quick:
        args.examples, args.epochs, args.repetitions = 6_000, 2, 1
    accepted = {"--formulations": [f.value for f in FormulationName], "--backends": [b.value for b in Backend]}
    for option, value in (("--formulations", args.formulations), ("--backends", args.backends)):
        unknown = [v for v in value.split(",") if v not in accepted[option]]
        if unknown:
            parser.error(f"{option}={value} is not accepted: expected a comma-separated list of {', '.join(accepted[option])}")
    for backend in args.backends.split(","):
        try:
            BackendConfig(Backend(backend))  # torch only where PyTorch is installed
        except ConfigError as error:
            parser.error(f"--backends: {error}")
    names = [FormulationName(f) for f in args.formulations.split(",")]

    configure_determinism()
    splits = tiled_mnist(args.examples, args.data_dir)
    if args.worker:
        print(json.dumps({n.value: measure(splits, n, args.epochs, args.repetitions, with_reference=False) for n in names}))
        return 0
    backends = args.backends.split(",")
    others = {}
    for backend in (b for b in backends if b != "tensorflow"):  # one process per backend
        argv = [sys.executable, __file__, "--worker", f"--examples={args.examples}", f"--epochs={args.epochs}",
                f"--repetitions={args.repetitions}", f"--formulations={args.formulations}", f"--data-dir={args.data_dir}"]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": backend})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        others[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    import jax

    torch_version = f", PyTorch {importlib.metadata.version('torch')}" if "torch" in backends else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}, JAX {jax.__version__}{torch_version}; {len(splits.x_train):,} examples x 784, batch 32")
    print(f"{'formulation':<12} {'backend':<10} {'s/epoch':>8} {'samples/s':>10} {'vs note':>8} {'diag cost':>9} "
          f"{'peak MiB':>8} {'last loss':>10} {'max|dw| vs fit':>14}")
    n = len(splits.x_train)
    for name in names:
        tf_row = measure(splits, name, args.epochs, args.repetitions, with_reference=True)
        note = tf_row["note"]
        rows = [("note's fit", "tensorflow", note, None, tf_row["note_mib"], tf_row["note_loss"], None)]
        rows += [("pipeline", b, r["pipeline"], r["diag_cost"], r["pipeline_mib"], r["pipeline_loss"], r["max_dw"])
                 for b, r in [("tensorflow", tf_row), *((b, o[name.value]) for b, o in others.items())]
                 if b in backends]
        for who, backend, seconds, diag, mib, loss, dw in rows:
            print(f"{name.value + ' ' + who:<24} {backend:<10} {seconds:>8.3f} {n / seconds:>10,.0f} {note / seconds:>7.1f}x "
                  f"{'' if diag is None else f'{diag:.1%}':>9} {mib:>8.0f} {loss:>10.5f} "
                  f"{'' if dw is None else f'{dw:.1e}':>14}", flush=True)
    print("s/epoch = median over repetitions of the steady-state epoch (first epoch left out); vs note = the note's\n"
          "model.fit on TensorFlow (its code as written) / this row; diag cost = share of the pipeline's epoch spent on\n"
          "per-epoch diagnostics; MiB = peak RSS growth; losses differ by the shuffle (model.fit shuffles with its own\n"
          "RNG), not by the computation: max|dw| = largest weight difference after 2 epochs on one batch order vs\n"
          "model.fit on the same backend.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
