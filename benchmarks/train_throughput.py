"""Training speed: the course note's code as written vs the pipeline's train stage, side by side.

    python benchmarks/train_throughput.py            # 60,000 examples, 3 repetitions x 4 epochs
    python benchmarks/train_throughput.py --quick    # a smoke run (seconds)

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
import os
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
import tensorflow as tf  # noqa: E402

from pipeline.config import Config, DatasetConfig, FormulationName, LossConfig, TrainConfig  # noqa: E402
from pipeline.data import Splits, fetch, load  # noqa: E402
from pipeline.formulations import formulation  # noqa: E402
from pipeline.models import build_classifier  # noqa: E402
from pipeline.train import batch_order, configure_determinism, make_epoch_fn, train  # noqa: E402

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
    x, y = splits.x_train[:6000], splits.y_train[:6000]
    fast = build_classifier(form, 784, 10, [25, 15], "relu", seed=0)
    slow = build_classifier(form, 784, 10, [25, 15], "relu", seed=0)
    run_epoch = make_epoch_fn(fast.model, form.loss(), keras.optimizers.Adam(1e-3), 32)
    slow.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=form.loss())
    for epoch in range(1, epochs + 1):
        order = batch_order(0, epoch, len(x))
        run_epoch(tf.constant(x), tf.constant(y), tf.constant(order))
        slow.model.fit(x[order], y[order], batch_size=32, epochs=1, shuffle=False, verbose=0)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(fast.model.get_weights(), slow.model.get_weights()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=4, help="per repetition; the first is warm-up")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--formulations", default="probs,logits,probs_naive")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "tfds"))
    parser.add_argument("--quick", action="store_true", help="6,000 examples, 2 epochs, 1 repetition")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.epochs, args.repetitions = 6_000, 2, 1

    configure_determinism()
    splits = tiled_mnist(args.examples, args.data_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {len(splits.x_train):,} examples x 784, batch 32")
    header = (f"{'formulation':<12} {'note s/epoch':>12} {'pipeline s/epoch':>16} {'note samples/s':>14} "
              f"{'pipeline samples/s':>18} {'speed-up':>8} {'diag cost':>9} {'note MiB':>8} {'pipe MiB':>8} "
              f"{'note loss':>10} {'pipe loss':>10} {'max|dw| same order':>18}")
    print(header)
    for name in [FormulationName(f) for f in args.formulations.split(",")]:
        ratios, ref_steady, fast_steady, diag_costs, ref_mem, fast_mem = [], [], [], [], [], []
        for rep in range(args.repetitions):
            with PeakRSS() as mem:
                ref_seconds, ref_loss = reference(splits, name, args.epochs, seed=rep)
            ref_mem.append(mem.mib)
            with PeakRSS() as mem:
                fast_seconds, fast_train_seconds, fast_loss = contender(splits, name, args.epochs, seed=rep)
            fast_mem.append(mem.mib)
            r, f = statistics.median(ref_seconds[1:] or ref_seconds), statistics.median(fast_seconds[1:] or fast_seconds)
            ft = statistics.median(fast_train_seconds[1:] or fast_train_seconds)
            ref_steady.append(r)
            fast_steady.append(f)
            ratios.append(r / f)
            diag_costs.append((f - ft) / f)
        n = len(splits.x_train)
        r, f = statistics.median(ref_steady), statistics.median(fast_steady)
        print(f"{name.value:<12} {r:>12.3f} {f:>16.3f} {n / r:>14,.0f} {n / f:>18,.0f} {statistics.median(ratios):>7.1f}x "
              f"{statistics.median(diag_costs):>8.1%} {max(ref_mem):>8.0f} {max(fast_mem):>8.0f} {ref_loss:>10.5f} "
              f"{fast_loss:>10.5f} {equivalence(splits, name):>18.1e}", flush=True)
    print("speed-up = median over repetitions of (note s/epoch) / (pipeline s/epoch), steady state (first epoch left out);\n"
          "diag cost = share of the pipeline's epoch spent on per-epoch diagnostics; MiB = peak RSS growth;\n"
          "losses = last epoch's training loss (the two paths shuffle differently, so they differ by the\n"
          "shuffle, not by the computation); max|dw| = largest weight difference after 2 epochs on one batch order.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
