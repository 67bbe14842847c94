"""The PyTorch backend's loop: Keras's own torch train step, run over an epoch's batches in memory.

PyTorch runs eagerly (Keras's torch trainer does not compile by default either), so this loop is
`model.fit`'s train step without its data adapter, callbacks and metrics: the same forward pass, loss
object, `loss.backward()` and `optimizer.apply` under `torch.no_grad()`, on contiguous slices of the
epoch's permuted data (`batch_order`, the same as every backend). Like JAX's, the torch backend's loss
computes from the probabilities it is given; the probe measures it per run. tests/test_torch.py pins the
weights to `model.fit`'s on the same batches. Diagnostics run the model without gradients and the
statistics in pipeline/numerics.py on the results.
"""

from __future__ import annotations

import keras
import numpy as np
import torch

from pipeline.formulations import formulation as make_formulation
from pipeline.loops import diagnostics_on_host, end_of_epoch_in_parts
from pipeline.models import Classifier

# One thread, as TensorFlow gets (pipeline/__init__.py): a model this small only waits on threads, and a
# study runs one process per core.
torch.set_num_threads(1)


class TorchLoop:
    """pipeline.loops.Loop for the torch backend (the model's variables are torch parameters, always current)."""

    def __init__(self, clf: Classifier, loss_fn, optimizer, batch_size: int, data: dict):
        self.clf, self.model, self.loss_fn, self.optimizer, self.batch_size = clf, clf.model, loss_fn, optimizer, batch_size
        self.data = {name: (torch.as_tensor(x), torch.as_tensor(y), np.asarray(y)) for name, (x, y) in data.items()}
        self.exact = make_formulation("logits", clf.formulation.task).loss()

    def _step(self, xb, yb) -> torch.Tensor:
        """One update, as keras/src/backend/torch/trainer.py's train_step makes it; returns the loss."""
        outputs = self.model(xb, training=True)
        self.model.zero_grad()
        loss = self.loss_fn(yb, outputs)
        self.optimizer.scale_loss(loss).backward()
        variables = self.model.trainable_weights[:]
        with torch.no_grad():
            self.optimizer.apply([v.value.grad for v in variables], variables)
        return loss.detach().float()

    def epoch(self, order) -> float:
        x, y, _ = self.data["train"]
        index = torch.as_tensor(order, dtype=torch.long)
        x, y = x[index], y[index]  # one gather per epoch, then contiguous slices
        n, total = len(order), torch.zeros((), dtype=torch.float32)
        for start in range(0, n, self.batch_size):
            xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
            total += self._step(xb, yb) * len(xb)  # weighted by batch size, as Keras's epoch loss
        return float(total) / n

    def _logits(self, x, training: bool = False) -> torch.Tensor:
        layer = self.clf.output_layer
        h = self.clf.features(x, training=training)
        return h.float() @ layer.kernel.value.float() + layer.bias.value.float()

    def diagnose(self, which: str) -> dict[str, float]:
        x, y, labels = self.data[which]
        form = self.clf.formulation
        with torch.no_grad():
            outputs = self.model(x, training=False)
            logits, loss = self._logits(x).numpy(), float(self.loss_fn(y, outputs))
            probabilities = keras.ops.convert_to_numpy(form.probabilities(outputs))
        return diagnostics_on_host(logits, probabilities, labels, loss, form)

    def end_of_epoch(self) -> tuple[dict[str, float], bool]:
        return end_of_epoch_in_parts(self)

    def gradient_probe(self) -> dict[str, float]:
        x, y, _ = self.data["probe"]
        parameters = [v.value for v in self.model.trainable_weights]
        trained = torch.autograd.grad(self.loss_fn(y, self.model(x, training=True)), parameters, allow_unused=True)
        reference = torch.autograd.grad(self.exact(y, self._logits(x, training=True)), parameters, allow_unused=True)
        norm = lambda grads: torch.sqrt(sum(torch.sum(g.float() ** 2) for g in grads if g is not None))  # noqa: E731
        nonfinite = sum(int(torch.sum(~torch.isfinite(g))) for g in trained if g is not None)
        return {"grad_norm_ratio": float(norm(trained) / norm(reference)), "nonfinite_grads": float(nonfinite)}

    def sync(self) -> None:
        pass  # the parameters are updated in place

    def refresh(self) -> None:
        pass  # the loop reads the parameters themselves
