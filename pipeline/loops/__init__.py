"""The training loop, one module per Keras backend, with one interface (`Loop`).

A Loop runs a whole epoch — compiled on TensorFlow and JAX, eagerly on torch — with the same loss object,
optimizer and batches as `model.fit`, computes the per-epoch diagnostics, the gradient probe and whether
every weight is still finite (`end_of_epoch`; one compiled call on TensorFlow), and keeps
the model's variables current (`sync`) for checkpoints, divergence checks and evaluation; `refresh` takes
up variables assigned from outside (a restored checkpoint, a reused loop reset to a new seed's weights).
pipeline/train.py picks the module of the backend Keras was started with:

    tensorflow   one `tf.function` over the epoch's batches (a tf.while_loop over in-memory tensors;
                 Keras's Adam update, operation for operation, over one flat vector of moments)
    jax          Keras's stateless API (`stateless_call`, `stateless_apply`) under `jax.jit`, a
                 `lax.fori_loop` over contiguous slices of the epoch's permuted data
    torch        Keras's torch train step, eager (as Keras runs it), over contiguous slices
"""

from __future__ import annotations

from typing import Callable, Protocol

import keras
import numpy as np

from pipeline.formulations import Task
from pipeline.numerics import saturation_summary


DIAGNOSED = {"train_subset": "train_", "val": "val_"}  # the sets diagnosed after each epoch: their metrics' prefix


class Loop(Protocol):
    def epoch(self, order) -> float: ...
    def end_of_epoch(self) -> tuple[dict[str, float], bool]: ...  # (diagnostics and probe, weights all finite)
    def sync(self) -> None: ...
    def refresh(self) -> None: ...


def backend() -> str:
    return keras.config.backend()


def diagnostics_on_host(logits, probabilities, labels, loss, form) -> dict[str, float]:
    """The per-epoch diagnostics from one forward pass's float32 logits, the formulation's probabilities
    and its loss, as NumPy (for the JAX and torch loops; TensorFlow's computes the same inside its graph)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    stats = {k: float(v) for k, v in saturation_summary(logits, np.asarray(probabilities), labels, form.task).items()}
    predicted = (logits.reshape(-1) > 0).astype(np.int64) if form.task is Task.binary else logits.argmax(axis=-1)
    stats["loss"] = float(loss)
    stats["accuracy"] = float(np.mean(predicted == labels.reshape(-1)))
    return stats


def weights_finite(model: keras.Model) -> bool:
    return all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def end_of_epoch_in_parts(loop) -> tuple[dict[str, float], bool]:
    """`Loop.end_of_epoch` for the loops that compute its parts one after another (JAX, torch): each
    diagnosed set's diagnostics, the gradient probe, then the weights (current after `sync`)."""
    values = {}
    for name, prefix in DIAGNOSED.items():
        if name in loop.data:
            values.update({prefix + k: v for k, v in loop.diagnose(name).items()})
    values.update(loop.gradient_probe())
    return values, weights_finite(loop.model)


def make_loop(clf, loss_fn, optimizer, batch_size: int, data: dict) -> Loop:
    """`data`: name -> (x, y) arrays: "train" (trained on), "train_subset" and "val" (diagnosed), "probe"."""
    if backend() == "jax":
        from pipeline.loops.jax import JaxLoop

        return JaxLoop(clf, loss_fn, optimizer, batch_size, data)
    if backend() == "torch":
        from pipeline.loops.torch import TorchLoop

        return TorchLoop(clf, loss_fn, optimizer, batch_size, data)
    from pipeline.loops.tensorflow import TensorFlowLoop

    return TensorFlowLoop(clf, loss_fn, optimizer, batch_size, data)


def compiled(fn: Callable) -> Callable:
    """`fn` compiled as the backend's training loop compiles (graph mode changes what Keras can trace)."""
    if backend() == "jax":
        import jax

        return jax.jit(fn)
    if backend() == "torch":
        return fn  # eager, as Keras's torch trainer runs
    import tensorflow as tf

    from pipeline.loops.tensorflow import AUTOGRAPH

    return tf.function(fn, autograph=AUTOGRAPH)
