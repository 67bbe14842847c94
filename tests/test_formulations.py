"""What each formulation's loss computes on extreme logits, against an mpmath reference.

These pin the Keras behaviours the whole study rests on: `probs` is rescued (reads the logits) under
Keras 3 + TensorFlow in float32, `probs_naive` is not and is capped at -log(1e-7), and the probe that
records `effective_from_logits` tells them apart.
"""

from __future__ import annotations

import keras
import mpmath
import numpy as np
import pytest
import tensorflow as tf

from pipeline.formulations import CLIPPED_LOSS_CAP, FormulationName, Task, formulation
from pipeline.models import build_classifier
from pipeline.train import probe_effective_from_logits

mpmath.mp.dps = 50


def exact_ce(z, y) -> float:
    z = [mpmath.mpf(float(v)) for v in z]
    return float(mpmath.log(sum(mpmath.exp(v) for v in z)) - z[y])


def exact_bce(z, t) -> float:
    z = mpmath.mpf(float(z))
    return float(mpmath.log(1 + mpmath.exp(-z)) if t == 1 else mpmath.log(1 + mpmath.exp(z)))


def compiled_loss(name: str, task: Task, logits: np.ndarray, labels: np.ndarray, output_dtype=None) -> float:
    """The formulation's head + loss on given logits, in graph mode as in training."""
    form = formulation(name, task)
    width = logits.shape[1]
    inputs = keras.Input((width,))
    head = keras.layers.Dense(width, activation=form.output_activation(), dtype=output_dtype)
    model = keras.Model(inputs, head(inputs))
    head.set_weights([np.eye(width, dtype=np.float32), np.zeros(width, np.float32)])
    loss_fn = form.loss()
    return float(tf.function(lambda: loss_fn(labels, model(logits, training=True)))())


EXTREME = [([100.0, 0.0, 0.0], 1), ([0.0, 30.0, 0.0], 0), ([17.0, 0.0, 0.0], 2), ([-50.0, 40.0, 5.0], 0)]


@pytest.mark.parametrize("z,y", EXTREME)
@pytest.mark.parametrize("name", ["probs", "logits"])
def test_probs_and_logits_compute_the_exact_loss_on_extreme_logits(name, z, y):
    """Keras's rescue: `probs` as written equals `logits` (float32 relative error)."""
    got = compiled_loss(name, Task.multiclass, np.array([z], np.float32), np.array([y]))
    assert got == pytest.approx(exact_ce(z, y), rel=1e-6)


@pytest.mark.parametrize("z,y", EXTREME)
def test_probs_naive_is_clipped_at_minus_log_epsilon(z, y):
    got = compiled_loss("probs_naive", Task.multiclass, np.array([z], np.float32), np.array([y]))
    assert got == pytest.approx(min(exact_ce(z, y), CLIPPED_LOSS_CAP), rel=1e-5)
    assert got <= CLIPPED_LOSS_CAP + 1e-5


def test_probs_naive_binary_cap_is_15_94_for_label_zero():
    """1 - 1e-7 rounds to 0.99999988 in float32, so the binary label-0 cap is lower than 16.118."""
    got = compiled_loss("probs_naive", Task.binary, np.array([[30.0]], np.float32), np.array([[0.0]]))
    assert got == pytest.approx(15.9423847, rel=1e-6)
    rescued = compiled_loss("probs", Task.binary, np.array([[30.0]], np.float32), np.array([[0.0]]))
    assert rescued == pytest.approx(exact_bce(30.0, 0), rel=1e-6)


def test_clipped_gradient_is_zero_beyond_the_cap():
    z = tf.Variable([[100.0, 0.0, 0.0]])
    for name, expected in [("logits", [1.0, -1.0, 0.0]), ("probs_naive", [0.0, 0.0, 0.0])]:
        form = formulation(name, Task.multiclass)
        loss_fn = form.loss()

        @tf.function
        def grad():
            with tf.GradientTape() as tape:
                loss = loss_fn(np.array([1]), keras.layers.Activation(form.output_activation())(z))
            return tape.gradient(loss, z)

        np.testing.assert_allclose(grad().numpy()[0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "name,task,output_dtype,expected",
    [
        ("probs", Task.multiclass, None, True),
        ("logits", Task.multiclass, None, True),
        ("probs_naive", Task.multiclass, None, False),
        ("probs", Task.binary, None, True),
        ("probs_naive", Task.binary, None, False),
        # Under mixed precision the float16 output layer's probabilities are cast before the loss: no rescue.
        ("probs", Task.multiclass, "mixed_float16", False),
        ("probs", Task.multiclass, "float32", True),
    ],
)
def test_probe_records_what_the_loss_did(name, task, output_dtype, expected):
    effective, loss = probe_effective_from_logits(formulation(name, task), output_dtype)
    assert effective is expected
    assert loss == pytest.approx(100.0 if expected else (16.118095 if task is Task.multiclass else 15.942385), rel=1e-5)


def test_one_seed_gives_identical_initial_weights_in_every_formulation():
    weights = {}
    for name in FormulationName:
        clf = build_classifier(formulation(name, Task.multiclass), 784, 10, [25, 15], "relu", seed=3)
        weights[name] = clf.model.get_weights()
    for name in FormulationName:
        for a, b in zip(weights[FormulationName.logits], weights[name]):
            np.testing.assert_array_equal(a, b)
    other = build_classifier(formulation("logits", Task.multiclass), 784, 10, [25, 15], "relu", seed=4)
    assert not np.array_equal(other.model.get_weights()[0], weights[FormulationName.logits][0])


@pytest.mark.parametrize("task,classes", [(Task.multiclass, 10), (Task.binary, 2)])
@pytest.mark.parametrize("name", list(FormulationName))
def test_served_model_returns_probabilities_of_the_trained_model(name, task, classes):
    clf = build_classifier(formulation(name, task), 20, classes, [7, 5], "sigmoid", seed=1)
    x = np.random.default_rng(0).normal(size=(16, 20)).astype(np.float32) * 5
    served = clf.served_model().predict(x, verbose=0)
    assert served.shape == (16, classes)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, rtol=1e-6)
    own = clf.formulation.probabilities(clf.model(x)).numpy()
    if task is Task.binary:
        own = np.concatenate([1 - own, own], axis=1)
    np.testing.assert_allclose(served, own, atol=1e-6)
