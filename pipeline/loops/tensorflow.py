"""The TensorFlow backend's loop: a whole epoch inside one `tf.function` over in-memory tensors.

The same loss object, optimizer and batches as `model.fit` (tests/test_train.py pins equal weights);
diagnostics and the gradient probe are compiled once and run once per epoch.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from pipeline.formulations import Task, formulation as make_formulation
from pipeline.models import Classifier
from pipeline.numerics import count_nonfinite, saturation_summary


def make_epoch_fn(model: keras.Model, loss_fn, optimizer, batch_size: int) -> Callable:
    """A compiled function that runs one epoch of minibatch updates and returns the mean loss."""
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def run_epoch(x, y, order):
        n = tf.shape(order)[0]
        steps = (n + batch_size - 1) // batch_size
        total = tf.constant(0.0, tf.float32)
        for step in tf.range(steps):
            idx = order[step * batch_size : tf.minimum((step + 1) * batch_size, n)]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(grads, variables))
            # Weighted by batch size, as Keras's epoch loss is: the mean over examples.
            total += tf.cast(loss, tf.float32) * tf.cast(tf.shape(idx)[0], tf.float32)
        return total / tf.cast(n, tf.float32)

    return run_epoch


def make_diagnostics_fn(clf: Classifier, loss_fn) -> Callable:
    """Compiled once; evaluates a fixed set of examples at the end of an epoch."""
    form = clf.formulation

    @tf.function(reduce_retracing=True)
    def diagnose(x, y):
        outputs, logits = clf.outputs_and_logits(x)
        probs = form.probabilities(outputs)
        stats = saturation_summary(logits, probs, y, form.task)
        stats["loss"] = loss_fn(y, outputs)
        predicted = (
            tf.cast(tf.reshape(logits, [-1]) > 0, tf.int64) if form.task is Task.binary
            else tf.argmax(logits, axis=-1)
        )
        stats["accuracy"] = tf.reduce_mean(tf.cast(predicted == tf.reshape(tf.cast(y, tf.int64), [-1]), tf.float64))
        return stats

    return diagnose


def make_gradient_probe_fn(clf: Classifier, loss_fn) -> Callable:
    """Ratio of the gradient norm of the loss as trained to that of the exact logits loss.

    1.0 when the trained loss reads logits; far below 1 when clipping has zeroed the gradient of
    confidently wrong examples.
    """
    form, model = clf.formulation, clf.model
    exact = make_formulation("logits", form.task).loss()
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def probe(x, y):
        with tf.GradientTape(persistent=True) as tape:
            outputs, logits = clf.outputs_and_logits(x, training=True)
            trained = loss_fn(y, outputs)
            reference = exact(y, logits)
        trained_grads = tape.gradient(trained, variables)
        reference_grads = tape.gradient(reference, variables)
        return {
            "grad_norm_ratio": tf.linalg.global_norm(trained_grads) / tf.linalg.global_norm(reference_grads),
            "nonfinite_grads": tf.add_n([count_nonfinite(g) for g in trained_grads]),
        }

    return probe


class TensorFlowLoop:
    """pipeline.loops.Loop for the TensorFlow backend (the model's variables are always current)."""

    def __init__(self, clf: Classifier, loss_fn, optimizer, batch_size: int, data: dict):
        self.data = {name: (tf.constant(x), tf.constant(y)) for name, (x, y) in data.items()}
        self._epoch = make_epoch_fn(clf.model, loss_fn, optimizer, batch_size)
        self._diagnose = make_diagnostics_fn(clf, loss_fn)
        self._probe = make_gradient_probe_fn(clf, loss_fn)

    def epoch(self, order) -> float:
        x, y = self.data["train"]
        return float(self._epoch(x, y, tf.constant(order)))

    def diagnose(self, which: str) -> dict[str, float]:
        return {k: float(v) for k, v in self._diagnose(*self.data[which]).items()}

    def gradient_probe(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._probe(*self.data["probe"]).items()}

    def sync(self) -> None:
        pass  # tf.Variables are updated in place

    def refresh(self) -> None:
        pass  # the compiled functions read the tf.Variables themselves
