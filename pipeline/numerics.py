"""Numbers the pipeline reports, computed so that they are true.

Reported NLL always comes from logits in float64, never from (clipped) probabilities. The multiclass
cross-entropy follows Blanchard, Higham & Higham (2021): with a = max z, k = argmax z and
s = sum_{i != k} exp(z_i - a),  CE = (a - z_y) + log1p(s).  Both terms are non-negative, so nothing
cancels, and when y = k the loss is log1p(s) to full relative precision (1.87e-13 at z = [0, 30, 0]).
The binary cross-entropy is softplus(-z) for label 1 and softplus(z) for label 0, again with no
cancellation.

All functions take TensorFlow tensors or NumPy arrays and run eagerly or inside `tf.function`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.formulations import CLIPPED_LOSS_CAP, KERAS_EPSILON, Task

ECE_BINS = 15


def _softplus(x):
    """log(1 + exp(x)) without overflow and without losing tiny values."""
    return tf.maximum(x, 0.0) + tf.math.log1p(tf.exp(-tf.abs(x)))


def nll_float64(logits, labels, task: Task):
    """Per-example cross-entropy from logits, in float64."""
    z = tf.cast(logits, tf.float64)
    if task is Task.binary:
        z = tf.reshape(z, [-1])
        is_one = tf.equal(tf.reshape(tf.cast(labels, tf.int64), [-1]), 1)
        return tf.where(is_one, _softplus(-z), _softplus(z))
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    top = tf.reduce_max(z, axis=-1)
    k = tf.argmax(z, axis=-1, output_type=tf.int32)
    shifted = tf.exp(z - top[:, None])
    not_top = tf.one_hot(k, tf.shape(z)[-1], on_value=0.0, off_value=1.0, dtype=tf.float64)
    s = tf.reduce_sum(shifted * not_top, axis=-1)
    z_y = tf.gather(z, labels, axis=-1, batch_dims=1)
    return (top - z_y) + tf.math.log1p(s)


def class_probabilities(logits, task: Task, dtype=tf.float64):
    """(n, classes) probabilities from logits; binary tasks get two columns [1 - p, p]."""
    z = tf.cast(logits, dtype)
    if task is Task.binary:
        z = tf.reshape(z, [-1, 1])
        z = tf.concat([tf.zeros_like(z), z], axis=-1)
    return tf.nn.softmax(z, axis=-1)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin: example count, mean confidence, accuracy (NaN when empty).

    Rows with non-finite probabilities (a diverged model) fall in no bin.
    """
    probabilities = np.asarray(probabilities, np.float64)
    finite = np.all(np.isfinite(probabilities), axis=1)
    probabilities = probabilities[finite]
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)[finite]
    # Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / count
    return {"count": count.tolist(), "confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist()}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b (n_b / n) |accuracy_b - confidence_b|."""
    table = reliability_bins(probabilities, labels, bins)
    count = np.asarray(table["count"], np.float64)
    gap = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    if count.sum() < len(probabilities):
        return float("nan")  # a non-finite row has no calibration
    return float(np.sum(np.where(count > 0, count * np.nan_to_num(gap), 0.0)) / count.sum())


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of sum_k (p_k - 1[y = k])^2 (for two classes this is 2 (p - y)^2)."""
    probabilities = np.asarray(probabilities, np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels).reshape(-1)]
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


def true_class_probability(probabilities, labels, task: Task):
    """p_y in the dtype it was produced in (for binary, p or 1 - p of the single output)."""
    if task is Task.binary:
        p = tf.reshape(probabilities, [-1])
        is_one = tf.equal(tf.reshape(tf.cast(labels, tf.int64), [-1]), 1)
        return tf.where(is_one, p, 1.0 - p)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return tf.gather(probabilities, labels, axis=-1, batch_dims=1)


def top_probability(probabilities, task: Task):
    if task is Task.binary:
        p = tf.reshape(probabilities, [-1])
        return tf.maximum(p, 1.0 - p)
    return tf.reduce_max(probabilities, axis=-1)


def logit_margin(logits, task: Task):
    """Top-1 minus top-2 logit (for one binary logit z, the classes' logits are 0 and z: |z|)."""
    if task is Task.binary:
        return tf.abs(tf.reshape(logits, [-1]))
    top2 = tf.math.top_k(logits, k=2).values
    return top2[:, 0] - top2[:, 1]


def count_nonfinite(x):
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(tf.cast(x, tf.float32))), tf.int64))


def saturation_summary(logits, probabilities, labels, task: Task) -> dict:
    """Diagnostics of how close a model is to where the clipped loss stops learning.

    `probabilities` are the float32 (or lower) probabilities the formulation produces; NaN rows count
    as neither clipped nor saturated but are reported by `nonfinite_logits`.
    """
    p = tf.cast(probabilities, tf.float32)
    z = tf.cast(logits, tf.float32)
    nll = nll_float64(z, labels, task)
    finite_rows = tf.math.is_finite(nll)
    return {
        "clipped_fraction": tf.reduce_mean(tf.cast(true_class_probability(p, labels, task) < KERAS_EPSILON, tf.float64)),
        "saturated_fraction": tf.reduce_mean(
            tf.cast(top_probability(p, task) >= 1.0 - KERAS_EPSILON, tf.float64)
        ),
        "max_abs_logit": tf.reduce_max(tf.where(tf.math.is_finite(z), tf.abs(z), 0.0)),
        "mean_logit_margin": tf.reduce_mean(tf.boolean_mask(logit_margin(z, task), finite_rows)),
        "nll_float64": tf.reduce_mean(nll),
        "above_cap_fraction": tf.reduce_mean(tf.cast(nll > CLIPPED_LOSS_CAP, tf.float64)),
        "nonfinite_logits": count_nonfinite(z),
    }
