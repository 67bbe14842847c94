"""The three loss formulations compared by this project.

A formulation decides four things and nothing else asks for a string:
  * the activation of the output layer,
  * the Keras loss it is compiled with,
  * how to turn the model's outputs into class probabilities,
  * whether the output layer is linear (whether the loss then really reads logits is probed at run
    time: pipeline/train.py, `probe_effective_from_logits`).

  probs        the course note's "original" code, as written: softmax/sigmoid output layer and
               `SparseCategoricalCrossentropy()` / `BinaryCrossentropy()`. Under Keras 3 + TensorFlow the
               loss usually finds the logits behind the activation and computes from them anyway.
  logits       the note's "more numerically accurate" code: linear output, `from_logits=True`,
               probabilities by softmax/sigmoid afterwards.
  probs_naive  the same probabilities, produced by an activation the loss cannot trace back to logits,
               so Keras's epsilon clipping really applies. This is what `probs` becomes under other
               backends, under mixed precision, or with probabilities from outside Keras's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from pipeline.config import FormulationName, Task

# Keras clips probabilities to [eps, 1 - eps] when it cannot find the logits; the per-example loss is
# then capped at -log(eps) and its gradient is zero beyond the cap.
KERAS_EPSILON = 1e-7
CLIPPED_LOSS_CAP = 16.118095650958319  # -log(1e-7)


@keras.saving.register_keras_serializable(package="fromlogits")
def opaque_softmax(x):
    """Softmax whose output carries no trace of its logits.

    On TensorFlow, `keras.activations.softmax` tags its output with `_keras_logits`, and in graph mode
    the loss also recognises a `Softmax` op; `tf.identity` hides both, so the loss must use the
    probabilities. Other backends' losses never look behind probabilities.
    """
    return _untraceable(keras.activations.softmax(x))


@keras.saving.register_keras_serializable(package="fromlogits")
def opaque_sigmoid(x):
    """Sigmoid whose output carries no trace of its logit (see `opaque_softmax`)."""
    return _untraceable(keras.activations.sigmoid(x))


def _untraceable(probabilities):
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.identity(probabilities)
    return probabilities


@dataclass(frozen=True)
class Formulation:
    name: FormulationName
    task: Task

    @property
    def outputs_logits(self) -> bool:
        """Whether the model's output layer is linear (its outputs are logits)."""
        return self.name is FormulationName.logits

    def output_width(self, num_classes: int) -> int:
        """Binary tasks have one output unit (the logit of class 1), as in the note."""
        return 1 if self.task is Task.binary else num_classes

    def output_activation(self):
        multiclass = self.task is Task.multiclass
        if self.name is FormulationName.logits:
            return "linear"
        if self.name is FormulationName.probs:
            return "softmax" if multiclass else "sigmoid"
        return opaque_softmax if multiclass else opaque_sigmoid

    def loss(self) -> keras.losses.Loss:
        from_logits = self.outputs_logits
        if self.task is Task.binary:
            return keras.losses.BinaryCrossentropy(from_logits=from_logits)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)

    def probabilities(self, outputs):
        """Class-1 probability (binary) or class probabilities (multiclass) from model outputs."""
        if not self.outputs_logits:
            return outputs
        if self.task is Task.binary:
            return keras.activations.sigmoid(outputs)
        return keras.activations.softmax(outputs)


def formulation(name: str | FormulationName, task: str | Task) -> Formulation:
    return Formulation(FormulationName(name), Task(task))
