"""The classifier: the note's architecture plus the formulation's output layer.

    pixels -> Dense(25, act) -> Dense(15, act) -> Dense(k, formulation's activation)

Every formulation gets the same layers in the same order, so one seed gives bit-identical initial
weights in all three arms (the paired design the comparison relies on). Logits are read from the
output layer's weights, never recovered from probabilities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import keras
import numpy as np
import tensorflow as tf

from pipeline.formulations import Formulation, Task

OUTPUT_LAYER = "output"


@dataclass
class Classifier:
    """A trained (or trainable) Keras model and the views of it the pipeline needs."""

    model: keras.Model
    formulation: Formulation

    @property
    def output_layer(self) -> keras.layers.Dense:
        return self.model.get_layer(OUTPUT_LAYER)

    @cached_property
    def features(self) -> keras.Model:
        """Inputs -> activations that feed the output layer."""
        return keras.Model(self.model.input, self.output_layer.input)

    def outputs_and_logits(self, x, training: bool = False):
        """The model's outputs (as the loss sees them) and its float32 logits, from one forward pass."""
        h = self.features(x, training=training)
        return self.output_layer(h, training=training), self._logits_from_features(h, tf.float32)

    def _logits_from_features(self, h, dtype):
        kernel = tf.cast(self.output_layer.kernel, dtype)
        bias = tf.cast(self.output_layer.bias, dtype)
        return tf.matmul(tf.cast(h, dtype), kernel) + bias

    def served_model(self) -> keras.Model:
        """A float32 model that returns class probabilities (rows sum to 1) for every formulation.

        Built from standard layers only, so it saves and loads without custom objects. The binary
        head turns the single logit z into softmax([-z/2, z/2]) = [1 - sigmoid(z), sigmoid(z)].
        """
        units = self.output_layer.units
        inputs = keras.Input(self.model.input_shape[1:], name="pixels", dtype="float32")
        h = self.features(inputs)
        logits_layer = keras.layers.Dense(units, name="logits", dtype="float32")
        z = logits_layer(h)
        logits_layer.set_weights([np.asarray(w, np.float32) for w in self.output_layer.get_weights()])
        if self.formulation.task is Task.binary:
            pair = keras.layers.Dense(2, use_bias=False, trainable=False, name="binary_pair", dtype="float32")
            z = pair(z)
            pair.set_weights([np.array([[-0.5, 0.5]], np.float32)])
        probs = keras.layers.Softmax(name="probabilities", dtype="float32")(z)
        return keras.Model(inputs, probs, name="classifier")


def seed_initializers(seed: int) -> None:
    """Seeds what Keras's weight initializers draw from, as `keras.utils.set_random_seed` does (the same
    weights: tests/test_train.py pins them), but for TensorFlow's global seed, which nothing here uses.

    An initializer built without a seed takes one from Python's `random` (keras.random.make_default_seed).
    `tf.random.set_seed` also clears TensorFlow's kernel caches: in a process that reuses its compiled loop
    for the next seed, the first epoch then took 0.18-0.20 s instead of 0.02-0.03 s.
    """
    random.seed(seed)
    np.random.seed(seed)


def build_classifier(
    formulation: Formulation,
    num_inputs: int,
    num_classes: int,
    hidden_units: list[int],
    activation: str,
    seed: int,
    output_dtype: str | None = None,
) -> Classifier:
    """Builds the network with weights drawn from `seed` (the same in every formulation)."""
    seed_initializers(seed)
    inputs = keras.Input((num_inputs,), name="pixels")
    x = inputs
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation=activation, name=f"hidden_{i}")(x)
    outputs = keras.layers.Dense(
        formulation.output_width(num_classes),
        activation=formulation.output_activation(),
        name=OUTPUT_LAYER,
        dtype=output_dtype,
    )(x)
    return Classifier(keras.Model(inputs, outputs, name=f"{formulation.name.value}_classifier"), formulation)
