"""Where a TensorFlow epoch's time goes: the pipeline's compiled epoch (`probs`, 60,000 examples, batch 32)
timed whole and with one part taken out, in one process.

    python benchmarks/epoch_parts.py             # 60,000 examples, 4 epochs a variant (the first is left out)
    python benchmarks/epoch_parts.py --quick

Variants: the epoch as the pipeline runs it; without the optimizer's update (the gradients are computed and
summed, not applied: what Adam's arithmetic over the 20,175 weights costs); with 8 inputs instead of 784 (what
the 784-wide inputs cost: the first layer's matrix products and each batch's gather; everything else is the same
ops on smaller tensors). The data are
random: the time of these ops does not depend on the values. No variant's weights are compared: the parts
show where a step's time goes, and benchmarks/train_throughput.py checks the whole epoch against `model.fit`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401  (the pipeline's process settings, before TensorFlow starts)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.cli import OneLineParser, whole_number  # noqa: E402
from pipeline.formulations import formulation  # noqa: E402
from pipeline.loops.tensorflow import make_epoch_fn  # noqa: E402
from pipeline.models import build_classifier  # noqa: E402
from pipeline.train import configure_determinism  # noqa: E402


class NoUpdate:
    """Applies nothing: the epoch still computes every gradient (summed into one carried value, so that none
    is pruned), as FlatAdam's flat vector does, but no optimizer arithmetic and no assignment."""

    def read(self):
        return (tf.zeros([]),)

    def write(self, state) -> None:
        pass

    def apply(self, grads, state):
        return (state[0] + tf.add_n([tf.reduce_sum(g) for g in grads]),)


def seconds_per_epoch(inputs: int, examples: int, epochs: int, apply_updates: bool) -> float:
    """Median steady-state epoch of the `probs` classifier (25-15 ReLU, 10 classes) over random data."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((examples, inputs), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, examples))
    form = formulation("probs", "multiclass")
    clf = build_classifier(form, inputs, 10, [25, 15], "relu", seed=0)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(clf.model.trainable_variables)
    run_epoch = make_epoch_fn(clf.model, form.loss(), optimizer, 32, updater=None if apply_updates else NoUpdate())
    seconds = []
    for _ in range(epochs):
        order = tf.constant(rng.permutation(examples).astype(np.int32))
        started = time.perf_counter()
        float(run_epoch(x, y, order))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def main() -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=whole_number(32), default=60_000)
    parser.add_argument("--epochs", type=whole_number(2), default=4, help="per variant; the first is warm-up")
    parser.add_argument("--quick", action="store_true", help="6,000 examples, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.epochs = 6_000, 2
    configure_determinism()  # as the pipeline runs: the same kernels
    whole = seconds_per_epoch(784, args.examples, args.epochs, apply_updates=True)
    variants = {
        "the epoch as the pipeline runs it": whole,
        "without the optimizer's update": seconds_per_epoch(784, args.examples, args.epochs, apply_updates=False),
        "with 8 inputs instead of 784": seconds_per_epoch(8, args.examples, args.epochs, apply_updates=True),
    }
    steps = -(-args.examples // 32)
    print(f"probs, {args.examples:,} examples, batch 32 ({steps:,} steps); TensorFlow {tf.__version__}")
    print(f"{'variant':<36} {'s/epoch':>8} {'us/step':>8} {'saves':>6}")
    for name, seconds in variants.items():
        saved = "" if seconds is whole else f"{1 - seconds / whole:>6.0%}"
        print(f"{name:<36} {seconds:>8.3f} {seconds / steps * 1e6:>8.1f} {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
