"""The TensorFlow backend's loop: a whole epoch inside one `tf.function` over in-memory tensors.

The same loss object, optimizer and batches as `model.fit` (tests/test_train.py pins equal weights and
optimizer state). Two things make a step cheaper than Keras's own, neither changing a bit: full batches
have a static shape, and a plain Adam's update runs over one flat vector of moments (`FlatAdam`).
The diagnostics, the gradient probe and the finiteness check are one compiled call per epoch.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.formulations import Task, formulation as make_formulation
from pipeline.loops import DIAGNOSED
from pipeline.models import Classifier
from pipeline.numerics import count_nonfinite, saturation_summary


# The compiled functions write their control flow as TensorFlow ops (tf.while_loop, tf.cond), as Keras's
# own train step does: AutoGraph would convert them from source for the same graph, which cost 0.6 s of a
# process's first tracing (1.6 s against 1.0 s), paid by every worker of a study.
AUTOGRAPH = False


class FlatAdam:
    """Keras's Adam update (`keras.optimizers.Adam.update_step`), operation for operation, over all
    trainable variables at once: the moments travel through the epoch as one flat vector each.

    A step of this model is dominated by TensorFlow's cost per graph node, not by arithmetic, and Keras
    builds a dozen element-wise ops per variable plus the bias-correction scalars per variable (220 of a
    step's 450 nodes here); flat, it is one dozen in all. Element-wise float32 ops give the same bits
    however the elements are grouped, so the weights stay those of `model.fit` (tests pin max|Δw| = 0).
    The moments are read from the optimizer's own slot variables when an epoch starts and written back
    when it ends, so checkpoints and a reset optimizer see them as Keras keeps them.
    """

    @staticmethod
    def fits(optimizer, variables) -> bool:
        """Plain Adam as `model.compile` runs it: no schedule, clipping, decay, EMA, accumulation, scaling."""
        return (type(optimizer) is keras.optimizers.Adam and not optimizer.amsgrad
                and isinstance(optimizer.learning_rate, keras.Variable)
                and all(getattr(optimizer, option) in (None, False) for option in (
                    "clipnorm", "clipvalue", "global_clipnorm", "weight_decay", "use_ema",
                    "gradient_accumulation_steps", "loss_scale_factor"))
                and all(v.dtype == "float32" for v in variables))

    def __init__(self, optimizer: keras.optimizers.Adam, variables):
        # Keras 3's Adam keeps its moments in these lists, indexed as its update_step looks them up
        # (pyproject pins keras < 3.16; the equivalence tests compare them with model.fit's after every change).
        index = [optimizer._get_variable_index(v) for v in variables]
        self.variables = [v.value for v in variables]
        self.momentums = [optimizer._momentums[i].value for i in index]
        self.velocities = [optimizer._velocities[i].value for i in index]
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.iterations = optimizer.iterations.value
        self.learning_rate = optimizer.learning_rate.value
        # Constants as Keras's ops make them: 1 - beta_1 is the double 1 - 0.9 rounded to float32, which is
        # not what 1 - float32(0.9) gives (and why TensorFlow's fused ResourceApplyAdam differs from Keras).
        self.beta_1, self.beta_2 = tf.constant(optimizer.beta_1, tf.float32), tf.constant(optimizer.beta_2, tf.float32)
        self.one_minus_beta_1 = tf.constant(1 - optimizer.beta_1, tf.float32)
        self.one_minus_beta_2 = tf.constant(1 - optimizer.beta_2, tf.float32)
        self.epsilon = tf.constant(optimizer.epsilon, tf.float32)

    def read(self):
        flat = lambda slots: tf.concat([tf.reshape(s, [-1]) for s in slots], 0)  # noqa: E731
        return flat(self.momentums), flat(self.velocities)

    def write(self, state) -> None:
        for slots, values in zip((self.momentums, self.velocities), state):
            for slot, part in zip(slots, tf.split(values, self.sizes)):
                slot.assign(tf.reshape(part, slot.shape))

    def apply(self, grads, state):
        m, v = state
        g = tf.concat([tf.reshape(tf.cast(grad, tf.float32), [-1]) for grad in grads], 0)
        local_step = tf.cast(self.iterations + 1, tf.float32)
        beta_1_power, beta_2_power = tf.pow(self.beta_1, local_step), tf.pow(self.beta_2, local_step)
        alpha = tf.identity(self.learning_rate) * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = m + (g - m) * self.one_minus_beta_1
        v = v + (tf.square(g) - v) * self.one_minus_beta_2
        update = (m * alpha) / (tf.sqrt(v) + self.epsilon)
        for variable, part in zip(self.variables, tf.split(update, self.sizes)):
            variable.assign_sub(tf.reshape(part, variable.shape))
        self.iterations.assign_add(1)
        return m, v


class KerasUpdate:
    """Any other optimizer (LossScaleOptimizer under mixed_float16 among them): Keras applies it."""

    def __init__(self, optimizer, variables):
        self.optimizer, self.variables = optimizer, variables

    def read(self):
        return ()

    def write(self, state) -> None:
        pass

    def apply(self, grads, state):
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return state


def make_epoch_fn(model: keras.Model, loss_fn, optimizer, batch_size: int, updater=None) -> Callable:
    """A compiled function that runs one epoch of minibatch updates and returns the mean loss. `updater`:
    how the gradients are applied (FlatAdam or KerasUpdate, as the optimizer allows; benchmarks/epoch_parts.py
    passes one that applies none, to time the rest of a step)."""
    variables = model.trainable_variables
    if updater is None:
        updater = (FlatAdam if FlatAdam.fits(optimizer, variables) else KerasUpdate)(optimizer, variables)

    def step(x, y, idx, state):
        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
            scaled = optimizer.scale_loss(loss)
        state = updater.apply(tape.gradient(scaled, variables), state)
        # Weighted by batch size, as Keras's epoch loss is: the mean over examples.
        return tf.cast(loss, tf.float32) * tf.cast(tf.shape(idx)[0], tf.float32), state

    @tf.function(reduce_retracing=True, autograph=AUTOGRAPH)
    def run_epoch(x, y, order):
        n = tf.shape(order)[0]
        full_batches = n // batch_size

        def full_batch(i, total, state):
            # A static batch shape lets Grappler fold the gradients' shape arithmetic (12% of a step);
            # the last, partial batch gets a step of its own below.
            idx = tf.reshape(order[i * batch_size : (i + 1) * batch_size], [batch_size])
            weighted_loss, state = step(x, y, idx, state)
            return i + 1, total + weighted_loss, state

        def last_batch(total, state):
            weighted_loss, state = step(x, y, order[full_batches * batch_size :], state)
            return total + weighted_loss, state

        start = (tf.constant(0), tf.constant(0.0, tf.float32), updater.read())
        _, total, state = tf.while_loop(lambda i, total, state: i < full_batches, full_batch, start)
        total, state = tf.cond(n % batch_size > 0, lambda: last_batch(total, state), lambda: (total, state))
        updater.write(state)
        return total / tf.cast(n, tf.float32)

    return run_epoch


def diagnostics_graph(clf: Classifier, loss_fn) -> Callable:
    """The diagnostics of a fixed set of examples, as graph ops (traced inside `EndOfEpoch`)."""
    form = clf.formulation

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


def gradient_probe_graph(clf: Classifier, loss_fn) -> Callable:
    """Ratio of the gradient norm of the loss as trained to that of the exact logits loss, as graph ops.

    1.0 when the trained loss reads logits; far below 1 when clipping has zeroed the gradient of
    confidently wrong examples.
    """
    form, model = clf.formulation, clf.model
    exact = make_formulation("logits", form.task).loss()
    variables = model.trainable_variables

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


class EndOfEpoch:
    """One compiled call after each epoch: the diagnostics of every diagnosed set ("train_subset", and "val"
    when there is one), the gradient probe and whether every weight is finite, as one float64 vector.

    One call and one transfer instead of four calls and a conversion per value: on this model an epoch's
    extras cost TensorFlow's per-call overhead more than arithmetic. Every value is cast to float64, which
    is exact, so each is the number separate functions give (tests/test_train.py pins the histories).
    """

    def __init__(self, clf: Classifier, loss_fn, data: dict):
        diagnosed = [name for name in DIAGNOSED if name in data]
        self.inputs = [t for name in (*diagnosed, "probe") for t in data[name]]
        self.names: list[str] = []  # of the vector's entries, in order; set when the function is traced
        # The diagnostics and the probe stay functions of their own inside the graph, as they were when
        # called one by one: the diagnostics are traced once for both sets (any number of examples), and
        # Grappler optimises each body as before, so every value is what separate calls gave. (Inlined,
        # the probe's two gradients were optimised together and grad_norm_ratio moved by float32 round-off:
        # 1.0 exactly instead of 1 +- 1 ulp where the trained loss is the logits loss.)
        own_function = dict(autograph=AUTOGRAPH, experimental_attributes={"_noinline": True})
        any_count = lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype)  # noqa: E731
        diagnose = tf.function(diagnostics_graph(clf, loss_fn), input_signature=[any_count(t) for t in data["train"]],
                               **own_function)
        probe = tf.function(gradient_probe_graph(clf, loss_fn), **own_function)
        signature = [tf.TensorSpec(t.shape, t.dtype) for t in self.inputs]

        @tf.function(input_signature=signature, autograph=AUTOGRAPH)
        def end_of_epoch(*tensors):
            values = {}
            for i, name in enumerate(diagnosed):
                stats = diagnose(tensors[2 * i], tensors[2 * i + 1])
                values.update({DIAGNOSED[name] + k: v for k, v in stats.items()})
            values.update(probe(*tensors[-2:]))
            values["weights_finite"] = tf.reduce_all([tf.reduce_all(tf.math.is_finite(w)) for w in clf.model.weights])
            self.names[:] = list(values)
            return tf.stack([tf.cast(v, tf.float64) for v in values.values()])

        self.compiled = end_of_epoch

    def __call__(self) -> tuple[dict[str, float], bool]:
        values = dict(zip(self.names, self.compiled(*self.inputs).numpy().tolist()))
        return values, values.pop("weights_finite") == 1.0


class TensorFlowLoop:
    """pipeline.loops.Loop for the TensorFlow backend (the model's variables are always current)."""

    def __init__(self, clf: Classifier, loss_fn, optimizer, batch_size: int, data: dict):
        self.data = {name: (tf.constant(x), tf.constant(y)) for name, (x, y) in data.items()}
        self._epoch = make_epoch_fn(clf.model, loss_fn, optimizer, batch_size)
        self.end_of_epoch = EndOfEpoch(clf, loss_fn, self.data)

    def epoch(self, order) -> float:
        x, y = self.data["train"]
        return float(self._epoch(x, y, tf.constant(order)))

    def sync(self) -> None:
        pass  # tf.Variables are updated in place

    def refresh(self) -> None:
        pass  # the compiled functions read the tf.Variables themselves
