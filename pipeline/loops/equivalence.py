"""The pipeline's compiled epoch loop against `model.fit` on the same batches, for whichever Keras
backend this process runs: same batches => the same weights, up to float round-off.

Used by tests/test_train.py (TensorFlow, in-process), tests/test_jax.py
(`KERAS_BACKEND=jax python -m pipeline.loops.equivalence DATA_DIR`: every formulation and task, as JSON)
and benchmarks/train_throughput.py."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data import load
from pipeline.formulations import Task, formulation
from pipeline.loops import make_loop
from pipeline.models import build_classifier
from pipeline.train import batch_order


def compare_with_fit(name: str, task: str, data_dir: str, epochs: int = 3) -> dict:
    """1,000 bundled digits (x 4: larger logits, clipping reachable), 3 epochs, seed 5."""
    splits = load(DatasetConfig(), data_dir)
    x, y = splits.x_train[:1000] * 4.0, splits.y_train[:1000]
    classes = 10
    if Task(task) is Task.binary:
        y, classes = (y % 2).astype(np.float32).reshape(-1, 1), 2
    return against_fit(formulation(name, task), x, y, classes, epochs, seed=5)


def against_fit(form, x, y, classes: int, epochs: int, seed: int) -> dict:
    """Trains the loop and `model.fit` from the same weights on the same batch orders; returns the
    backend, the largest difference of the weights and of the optimizer's variables (step count and
    moments, what a checkpoint saves), and each epoch's (loop loss, fit loss)."""
    fast = build_classifier(form, x.shape[1], classes, [25, 15], "relu", seed=seed)
    reference = build_classifier(form, x.shape[1], classes, [25, 15], "relu", seed=seed)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(fast.model.trainable_variables)
    loop = make_loop(fast, form.loss(), optimizer, 32, {"train": (x, y), "probe": (x[:8], y[:8])})
    reference.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=form.loss())
    losses = []
    for epoch in range(1, epochs + 1):
        order = batch_order(seed, epoch, len(x))
        fast_loss = loop.epoch(order)
        history = reference.model.fit(x[order], y[order], batch_size=32, epochs=1, shuffle=False, verbose=0)
        losses.append((fast_loss, float(history.history["loss"][0])))
    loop.sync()
    return {"backend": keras.config.backend(),
            "max_abs_weight_diff": _max_abs_diff(fast.model.get_weights(), reference.model.get_weights()),
            "max_abs_optimizer_diff": _max_abs_diff(optimizer.variables, reference.model.optimizer.variables),
            "losses": losses}


def _max_abs_diff(values, others) -> float:
    values, others = list(values), list(others)
    assert len(values) == len(others), (len(values), len(others))
    return max(float(np.max(np.abs(keras.ops.convert_to_numpy(a).astype(np.float64)
                                   - keras.ops.convert_to_numpy(b).astype(np.float64))))
               for a, b in zip(values, others))


if __name__ == "__main__":
    print(json.dumps([compare_with_fit(name, task, sys.argv[1]) | {"formulation": name, "task": task}
                      for name in ("probs", "logits", "probs_naive") for task in ("multiclass", "binary")]))
