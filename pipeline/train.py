"""train: the model = architecture + formulation head, fitted with a whole-epoch compiled loop.

The loop computes exactly what `model.fit` computes (same loss object, same optimizer, one update per
batch of `batch_size`, the last batch partial), but runs a whole epoch compiled — on the TensorFlow or
the JAX backend, whichever Keras was started with (pipeline/loops/) — so the per-step Python overhead
that dominates a model this small is gone (benchmarks/train_throughput.py measures it;
tests/test_train.py and tests/test_jax.py pin equality with `model.fit`).

Same seed => same initial weights and the same batch order in every formulation: the arms of a study
are paired.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from pipeline.config import Config, Precision, first_line
from pipeline.data import Splits
from pipeline.files import write_arrays
from pipeline.formulations import Formulation, Task, formulation as make_formulation
from pipeline.interrupt import Interrupted, stop_requested
from pipeline.loops import compiled, make_loop
from pipeline.models import Classifier, build_classifier

PROBE_BATCH = 256  # fixed batch for the gradient-norm ratio

def configure_determinism() -> None:
    """Same config and seed => same weights and metrics, run after run (TensorFlow's op determinism;
    JAX and PyTorch on the CPU, one thread: pipeline/loops/torch.py, are deterministic as they are).

    Kept although TensorFlow run single-threaded is deterministic without it: the mode also selects the
    kernels, and without it every TensorFlow metric moves by round-off, which unstable settings amplify
    (an atlas setting's mean test NLL went from 0.0921 to 0.0644).
    """
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def batch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's shuffle: a function of (seed, epoch) only, so every formulation sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


# --- the effective_from_logits probe ----------------------------------------------------------------


PROBE_LOGIT = 100.0


def probe_effective_from_logits(form: Formulation, output_dtype: str | None) -> tuple[bool, float]:
    """Whether the compiled loss really consumed logits, found by running it, never by assuming.

    A one-layer model with the formulation's output layer (identity weights, same dtype policy) gets the
    logits [100, 0, 0] and the label 1 (binary: logit 100, label 0). From logits the loss is 100; from
    clipped probabilities it is capped at 16.118 (15.94 for binary). Runs compiled, as the training loop
    does (`tf.function` / `jax.jit`), because graph mode changes what Keras can trace. Every run runs
    it; runs of the same formulation and dtypes in one process share its compiled function.
    """
    loss = float(keras.ops.convert_to_numpy(_compiled_probe(
        form.name, form.task, output_dtype, keras.mixed_precision.global_policy().name, keras.config.backend())()))
    return abs(loss - PROBE_LOGIT) < 1e-3 * PROBE_LOGIT, loss


@functools.lru_cache(maxsize=16)
def _compiled_probe(name, task: Task, output_dtype: str | None, policy: str, backend: str):
    """The probe's compiled loss for one formulation under one dtype policy (the key: all it depends on)."""
    form = make_formulation(name, task)
    width = 1 if task is Task.binary else 3
    inputs = keras.Input((width,))
    layer = keras.layers.Dense(width, activation=form.output_activation(), dtype=output_dtype, name="probe")
    probe = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.eye(width, dtype=np.float32), np.zeros(width, np.float32)])
    loss_fn = form.loss()
    z = np.zeros((1, width), np.float32)
    z[0, 0] = PROBE_LOGIT
    label = np.array([[0.0]] if task is Task.binary else [1])
    return compiled(lambda: loss_fn(label, probe(z, training=True)))


# --- the training loop -------------------------------------------------------------------------------


def make_optimizer(cfg: Config) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.Adam(learning_rate=cfg.train.learning_rate)
    if cfg.precision.policy is Precision.mixed_float16:
        # What `model.compile` does under mixed_float16: dynamic loss scaling against float16 underflow.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@dataclass
class TrainResult:
    classifier: Classifier
    effective_from_logits: bool
    probe_loss: float
    output_dtype: str
    diverged: bool = False
    epochs_completed: int = 0
    history: list[dict] = field(default_factory=list)


def _fixed_subset(x, y, limit: int):
    """The first `limit` examples of a fixed permutation (the same every epoch and every run)."""
    if len(x) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(0).permutation(len(x))[:limit])
    return x[keep], y[keep]


class Checkpoint:
    """The state after a finished epoch — weights, optimizer slots and step count, epoch — in one file.

    Written atomically, and only once every metric up to that epoch is persisted (the store may hold
    later ones too, when the process died between the two writes: a resumed run sends only what the
    store lacks); with the same seed the batch order of later epochs is the same, so a resumed run ends
    where an uninterrupted one would.
    """

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, model: keras.Model, optimizer, epoch: int) -> None:
        arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
        arrays |= {f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(optimizer.variables)}
        write_arrays(self.path, epoch=epoch, **arrays)

    def restore(self, model: keras.Model, optimizer) -> int:
        with np.load(self.path) as saved:
            model.set_weights([saved[f"w{i}"] for i in range(len(model.get_weights()))])
            for i, variable in enumerate(optimizer.variables):
                variable.assign(saved[f"o{i}"])
            return int(saved["epoch"])

    def epoch(self) -> int:
        with np.load(self.path) as saved:
            return int(saved["epoch"])

    def unreadable(self) -> str | None:
        """Why the file cannot be read back whole (cut short as it was copied, a disk error), in one line; None if
        it can. It is written atomically, so only damage from outside the pipeline does this."""
        try:
            with np.load(self.path) as saved:
                for name in saved.files:
                    saved[name]  # read: each array's checksum is checked
                int(saved["epoch"])
        except Exception as error:  # noqa: BLE001 - whatever numpy, zipfile or the OS raise for a damaged file
            return first_line(error)
        return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def seeded_classifier(cfg: Config, form: Formulation, splits: Splits, output_dtype: str | None) -> Classifier:
    """The configured network with the initial weights that `cfg.seed` draws."""
    return build_classifier(form, splits.num_inputs, splits.num_classes, cfg.model.hidden_units, cfg.model.activation,
                            cfg.seed, output_dtype=output_dtype)


class Trainer:
    """What runs of one shape share in a process: a model's variables, its optimizer and the compiled loop.

    Tracing and compiling the loop costs about a second a run, more than many runs' training; runs that
    differ only in seed (a study's) reuse it: `reset` assigns the seed's initial weights — those a fresh
    build with that seed draws — and the optimizer's state as built, so a reused trainer computes what a
    new one would (tests/test_train.py pins equal histories).
    """

    def __init__(self, cfg: Config, form: Formulation, splits: Splits, output_dtype: str | None):
        self.clf = seeded_classifier(cfg, form, splits, output_dtype)
        self.optimizer = make_optimizer(cfg)
        self.optimizer.build(self.clf.model.trainable_variables)
        self.built_optimizer_state = [keras.ops.convert_to_numpy(v) for v in self.optimizer.variables]
        x_diag, y_diag = _fixed_subset(splits.x_train, splits.y_train, cfg.train.diagnostics_examples)
        data = {"train": (splits.x_train, splits.y_train), "train_subset": (x_diag, y_diag),
                "probe": (splits.x_train[:PROBE_BATCH], splits.y_train[:PROBE_BATCH])}
        if len(splits.x_val) > 0:
            data["val"] = (splits.x_val, splits.y_val)
        self.loop = make_loop(self.clf, form.loss(), self.optimizer, cfg.train.batch_size, data)

    def reset(self, initial_weights: list[np.ndarray]) -> None:
        self.clf.model.set_weights(initial_weights)
        for variable, value in zip(self.optimizer.variables, self.built_optimizer_state):
            variable.assign(value)
        self.loop.refresh()


_TRAINERS: collections.OrderedDict[tuple, Trainer] = collections.OrderedDict()
KEPT_TRAINERS = 4  # a study's worker alternates among a few shapes (arms); each holds a copy of the data


def _trainer_key(cfg: Config, form: Formulation, splits: Splits, output_dtype: str | None) -> tuple:
    """Everything a trainer's compiled loop depends on; the seed is not in it."""
    data = hashlib.blake2b(digest_size=16)
    for array in (splits.x_train, splits.y_train, splits.x_val, splits.y_val):
        data.update(np.ascontiguousarray(array).tobytes())
    return (keras.config.backend(), form.name, form.task, cfg.precision.policy, output_dtype,
            tuple(cfg.model.hidden_units), cfg.model.activation, splits.num_classes, cfg.train.batch_size,
            cfg.train.learning_rate, cfg.train.diagnostics_examples, data.hexdigest())


def trainer_for(cfg: Config, form: Formulation, splits: Splits, output_dtype: str | None) -> Trainer:
    """A trainer at the seed's initial state: this process's trainer of the same shape, reset, or a new one."""
    key = _trainer_key(cfg, form, splits, output_dtype)
    trainer = _TRAINERS.pop(key, None)
    if trainer is None:
        trainer = Trainer(cfg, form, splits, output_dtype)
    else:
        trainer.reset(seeded_classifier(cfg, form, splits, output_dtype).model.get_weights())
    _TRAINERS[key] = trainer
    while len(_TRAINERS) > KEPT_TRAINERS:
        _TRAINERS.popitem(last=False)
    return trainer


def train(
    cfg: Config,
    splits: Splits,
    on_epoch_end: Callable[[int, dict, bool], bool] = lambda epoch, metrics, stopping: True,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Fits the configured model; calls `on_epoch_end(epoch, metrics, stopping)` after every epoch (1-based).

    `on_epoch_end` returns whether every epoch's metrics so far are persisted; only then is the
    `checkpoint` saved (when given; training resumes from it when it exists). `stopping`: a stop was
    requested, so this epoch is the last; it must then persist them.
    """
    form = make_formulation(cfg.loss.formulation, cfg.dataset.task)
    keras.mixed_precision.set_global_policy(cfg.precision.policy.value)
    try:
        output_dtype = "float32" if cfg.precision.output_float32 else None
        trainer = trainer_for(cfg, form, splits, output_dtype)
        clf, optimizer, loop = trainer.clf, trainer.optimizer, trainer.loop
        effective, probe_loss = probe_effective_from_logits(form, output_dtype)
        result = TrainResult(clf, effective, probe_loss, clf.output_layer.compute_dtype)
        start_epoch = 0
        if checkpoint and checkpoint.exists():
            start_epoch = checkpoint.restore(clf.model, optimizer)
            loop.refresh()

        result.epochs_completed = start_epoch
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            started = time.perf_counter()
            epoch_loss = loop.epoch(batch_order(cfg.seed, epoch, len(splits.x_train)))
            train_seconds = time.perf_counter() - started
            loop.sync()
            diagnostics, finite = loop.end_of_epoch()
            metrics = {"train_epoch_loss": epoch_loss, **diagnostics}
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                metrics["loss_scale"] = float(optimizer.dynamic_scale)  # falls when float16 gradients overflow
            metrics["epoch_seconds"] = time.perf_counter() - started
            metrics["epoch_train_seconds"] = train_seconds
            result.history.append(metrics)
            result.epochs_completed = epoch
            # Read once: a stop requested between two reads would end the run past its checkpoint.
            stopping = stop_requested.is_set()
            if on_epoch_end(epoch, metrics, stopping) and checkpoint:
                checkpoint.save(clf.model, optimizer, epoch)
            if stopping:
                raise Interrupted(f"stopped after epoch {epoch}")
            if not math.isfinite(epoch_loss) or not finite:
                result.diverged = True
                break
        return result
    finally:
        keras.mixed_precision.set_global_policy("float32")
