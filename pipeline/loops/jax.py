"""The JAX backend's loop: Keras's stateless API under `jax.jit`, a whole epoch compiled.

An epoch gathers the permuted training data once (`batch_order`, the same as every backend), then a
`lax.fori_loop` applies `model.stateless_call` + `optimizer.stateless_apply` to contiguous slices of
`batch_size`; a last partial batch, as `model.fit` has, is one more compiled step. The same Keras loss
object computes the loss — on JAX it has no way to find logits behind probabilities, so `probs` trains
exactly like `probs_naive` (measured per run by the probe, never assumed). tests/test_jax.py pins the
weights to `model.fit`'s on the same batches. Diagnostics run the model compiled and the statistics
in pipeline/numerics.py on the results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np

from pipeline.config import PROJECT_ROOT
from pipeline.formulations import formulation as make_formulation
from pipeline.loops import diagnostics_on_host, end_of_epoch_in_parts
from pipeline.models import Classifier

# Every run of a study builds a new model, so jax.jit traces and compiles its functions again (seconds a
# run on 2 cores, more than 20 epochs of training). XLA's persistent cache keys compiled programs by their
# content: runs with the same shapes reuse them, across processes too (README, Speed: a 2-epoch run's
# train stage 4.1-5.2 s with the cache empty, 2.6 s with it warm).
jax.config.update("jax_compilation_cache_dir", str(PROJECT_ROOT / "outputs" / "jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class JaxLoop:
    """pipeline.loops.Loop for the JAX backend; the model's variables are current after `sync`."""

    def __init__(self, clf: Classifier, loss_fn, optimizer, batch_size: int, data: dict):
        self.clf, self.model, self.optimizer, self.batch_size = clf, clf.model, optimizer, batch_size
        self.x_train, self.y_train = data["train"]
        self.data = {name: (jnp.asarray(x), jnp.asarray(y), np.asarray(y)) for name, (x, y) in data.items()}
        self.state = self._read_state()
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        model, features = self.model, clf.features
        exact = make_formulation("logits", clf.formulation.task).loss()

        def step(state, xb, yb):
            tv, ntv, ov = state

            def objective(tv):
                out, new_ntv = model.stateless_call(tv, ntv, xb, training=True)
                loss = loss_fn(yb, out)
                if scaled:  # as Keras's JAX trainer does: read the loss scale from the optimizer's state
                    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, ov))):
                        return optimizer.scale_loss(loss), (loss, new_ntv)
                return loss, (loss, new_ntv)

            grads, (loss, new_ntv) = jax.grad(objective, has_aux=True)(tv)
            tv, ov = optimizer.stateless_apply(ov, grads, tv)
            return (tv, new_ntv, ov), loss.astype(jnp.float32)

        def full_batches(state, x, y):
            def body(i, carry):
                state, total = carry
                xb = jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size)
                yb = jax.lax.dynamic_slice_in_dim(y, i * batch_size, batch_size)
                state, loss = step(state, xb, yb)
                return state, total + loss * batch_size  # weighted by batch size, as Keras's epoch loss

            return jax.lax.fori_loop(0, x.shape[0] // batch_size, body, (state, jnp.float32(0.0)))

        def logits(tv, ntv, x, training=False):
            h, _ = features.stateless_call(tv[:-2], ntv[: len(features.non_trainable_variables)], x, training=training)
            return jnp.matmul(h.astype(jnp.float32), tv[-2].astype(jnp.float32)) + tv[-1].astype(jnp.float32)

        def forward(state, x, y):
            tv, ntv, _ = state
            outputs, _ = model.stateless_call(tv, ntv, x, training=False)
            return outputs, logits(tv, ntv, x), loss_fn(y, outputs)

        def probe(state, x, y):
            tv, ntv, _ = state

            def trained(tv):
                return loss_fn(y, model.stateless_call(tv, ntv, x, training=True)[0])

            def reference(tv):
                return exact(y, logits(tv, ntv, x, training=True))

            g_trained, g_reference = jax.grad(trained)(tv), jax.grad(reference)(tv)
            norm = lambda gs: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gs))  # noqa: E731
            nonfinite = sum(jnp.sum(~jnp.isfinite(g)) for g in g_trained)
            return norm(g_trained) / norm(g_reference), nonfinite

        self._step, self._full_batches = jax.jit(step), jax.jit(full_batches)
        self._forward, self._probe = jax.jit(forward), jax.jit(probe)

    def _read_state(self):
        return ([v.value for v in self.model.trainable_variables], [v.value for v in self.model.non_trainable_variables],
                [v.value for v in self.optimizer.variables])

    def epoch(self, order) -> float:
        x, y = jnp.asarray(self.x_train[order]), jnp.asarray(self.y_train[order])  # one gather per epoch
        n, full = len(order), len(order) // self.batch_size * self.batch_size
        self.state, total = self._full_batches(self.state, x[:full], y[:full])
        if full < n:
            self.state, loss = self._step(self.state, x[full:], y[full:])
            total = total + loss * (n - full)
        return float(total) / n

    def diagnose(self, which: str) -> dict[str, float]:
        x, y, labels = self.data[which]
        outputs, logits, loss = self._forward(self.state, x, y)
        form = self.clf.formulation
        return diagnostics_on_host(logits, form.probabilities(np.asarray(outputs)), labels, loss, form)

    def end_of_epoch(self) -> tuple[dict[str, float], bool]:
        return end_of_epoch_in_parts(self)

    def gradient_probe(self) -> dict[str, float]:
        x, y, _ = self.data["probe"]
        ratio, nonfinite = self._probe(self.state, x, y)
        return {"grad_norm_ratio": float(ratio), "nonfinite_grads": float(nonfinite)}

    def refresh(self) -> None:
        self.state = self._read_state()

    def sync(self) -> None:
        tv, ntv, ov = self.state
        for variables, values in ((self.model.trainable_variables, tv), (self.model.non_trainable_variables, ntv),
                                  (self.optimizer.variables, ov)):
            for variable, value in zip(variables, values):
                variable.assign(value)
