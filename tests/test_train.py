"""The whole-epoch compiled loop computes what `model.fit` computes, and training's bookkeeping."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import compose_config
from pipeline.config import validate
from pipeline.data import load
from pipeline.formulations import FormulationName, Task
from pipeline.loops.equivalence import compare_with_fit
from pipeline.interrupt import Interrupted, stop_requested
from pipeline.train import Checkpoint, batch_order, train

# Largest |w_fast - w_fit| after 3 epochs of 1,000 examples measured 0.0 on TF 2.21 / Keras 3.15;
# the bound leaves room for float32 reassociation on other CPUs.
WEIGHT_TOLERANCE = 1e-5


@pytest.mark.parametrize("task", [Task.multiclass, Task.binary])
@pytest.mark.parametrize("name", list(FormulationName))
def test_fast_loop_matches_model_fit(data_dir, name, task):
    result = compare_with_fit(name.value, task.value, data_dir)
    assert result["backend"] == "tensorflow"
    for fast_loss, fit_loss in result["losses"]:
        assert fast_loss == pytest.approx(fit_loss, rel=1e-5)
    assert result["max_abs_weight_diff"] <= WEIGHT_TOLERANCE
    assert result["max_abs_optimizer_diff"] <= WEIGHT_TOLERANCE  # moments, step count: what checkpoints keep


@pytest.mark.parametrize("precision, flat", [("float32", True), ("mixed_bfloat16", True), ("mixed_float16", False)])
def test_the_pipelines_adam_takes_the_flat_update_and_loss_scaling_keeps_keras_own(precision, flat):
    """The flat update (pipeline/loops/tensorflow.py) is what makes an epoch fast; the test above pins that
    it computes what Keras computes. LossScaleOptimizer's skipped steps and scale updates stay Keras's."""
    from pipeline.formulations import formulation
    from pipeline.loops.tensorflow import FlatAdam
    from pipeline.models import build_classifier
    from pipeline.train import make_optimizer

    cfg = validate(compose_config(f"precision={precision}"))
    keras.mixed_precision.set_global_policy(cfg.precision.policy.value)
    try:
        clf = build_classifier(formulation("logits", "multiclass"), 784, 10, [25, 15], "relu", seed=0)
        assert FlatAdam.fits(make_optimizer(cfg), clf.model.trainable_variables) is flat
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert not FlatAdam.fits(keras.optimizers.Adam(1e-3, clipnorm=1.0), clf.model.trainable_variables)
    assert not FlatAdam.fits(keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9)),
                             clf.model.trainable_variables)


def test_batch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(batch_order(1, 2, 100), batch_order(1, 2, 100))
    assert not np.array_equal(batch_order(1, 2, 100), batch_order(1, 3, 100))
    assert sorted(batch_order(1, 2, 100).tolist()) == list(range(100))


def test_a_stop_requested_after_an_epoch_was_reported_ends_training_one_epoch_later_persisted(data_dir, tmp_path):
    """The stop request is read once per epoch: the epoch that ends training is the one told so (and made
    to persist its metrics), and its checkpoint is saved. Read twice, a request arriving in between ended
    training without a checkpoint of metrics sent afterwards: the resumed run logged them twice."""
    cfg = validate(compose_config("train.epochs=6", f"data_dir={data_dir}"))
    told = []

    def on_epoch_end(epoch, metrics, stopping):
        told.append((epoch, stopping))
        if epoch == 2:
            stop_requested.set()  # arrives after this epoch's report: the next epoch is the last
        return stopping

    checkpoint = Checkpoint(tmp_path / "state.npz")
    try:
        with pytest.raises(Interrupted):
            train(cfg, load(cfg.dataset, data_dir), on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    finally:
        stop_requested.clear()
    assert told == [(1, False), (2, False), (3, True)]
    assert checkpoint.epoch() == 3


def test_train_reports_per_epoch_diagnostics(data_dir):
    cfg = validate(compose_config("train.epochs=2", "loss=probs_naive", f"data_dir={data_dir}"))
    seen = []
    result = train(cfg, load(cfg.dataset, data_dir), on_epoch_end=lambda epoch, m, stopping: seen.append(epoch))
    assert seen == [1, 2] and result.epochs_completed == 2 and not result.diverged
    assert result.effective_from_logits is False and result.output_dtype == "float32"
    last = result.history[-1]
    for key in ["train_epoch_loss", "train_nll_float64", "val_nll_float64", "val_clipped_fraction",
                "train_saturated_fraction", "val_max_abs_logit", "val_mean_logit_margin", "grad_norm_ratio",
                "nonfinite_grads", "val_above_cap_fraction", "val_accuracy"]:
        assert np.isfinite(last[key]), key
    assert last["val_accuracy"] > 0.5
    assert last["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-3)  # nothing is clipped on scaled pixels
    from pipeline import train as training

    loop = next(reversed(training._TRAINERS.values())).loop
    assert len(loop.data["train_subset"][0]) != len(loop.data["val"][0])
    # Both sets' diagnostics, the probe and the finiteness check: one compiled function, traced once.
    assert loop.end_of_epoch.compiled.experimental_get_tracing_count() == 1


def test_the_one_end_of_epoch_call_gives_what_separate_calls_give(data_dir):
    """The diagnostics, probe and finiteness check run as one compiled call; every value must be the number
    the separately compiled functions give. The binary logits arm is where it can fail: inlined into one
    graph, the probe's two gradients were optimised together and grad_norm_ratio moved by a float32 ulp."""
    import tensorflow as tf

    from pipeline import train as training
    from pipeline.formulations import formulation
    from pipeline.loops.tensorflow import AUTOGRAPH, diagnostics_graph, gradient_probe_graph

    cfg = validate(compose_config("task=logistic", "loss=logits", f"data_dir={data_dir}"))
    splits = load(cfg.dataset, data_dir)
    form = formulation(cfg.loss.formulation, cfg.dataset.task)
    trainer = training.Trainer(cfg, form, splits, None)
    loop = trainer.loop
    diagnose = tf.function(diagnostics_graph(trainer.clf, form.loss()), autograph=AUTOGRAPH)
    probe = tf.function(gradient_probe_graph(trainer.clf, form.loss()), autograph=AUTOGRAPH)
    for epoch in range(1, 21):
        loop.epoch(batch_order(cfg.seed, epoch, len(splits.x_train)))
        values, finite = loop.end_of_epoch()
        separate = {f"train_{k}": float(v) for k, v in diagnose(*loop.data["train_subset"]).items()}
        separate |= {f"val_{k}": float(v) for k, v in diagnose(*loop.data["val"]).items()}
        separate |= {k: float(v) for k, v in probe(*loop.data["probe"]).items()}
        assert values == separate and finite, epoch
    trainer.clf.model.trainable_variables[0].assign(tf.fill(trainer.clf.model.trainable_variables[0].shape, np.nan))
    assert loop.end_of_epoch()[1] is False


def test_huge_learning_rate_diverges_and_stops_early(data_dir):
    cfg = validate(compose_config("train.epochs=30", "train.learning_rate=1e12", "dataset.pixel_scale=none"))
    result = train(cfg, load(cfg.dataset, data_dir))
    assert result.diverged and result.epochs_completed < 30


def test_mixed_float16_loses_the_rescue_and_logs_the_loss_scale(data_dir):
    cfg = validate(compose_config("train.epochs=1", "loss=probs", "precision=mixed_float16"))
    result = train(cfg, load(cfg.dataset, data_dir))
    assert result.output_dtype == "float16" and result.effective_from_logits is False
    assert result.history[-1]["loss_scale"] > 0
    assert keras.mixed_precision.global_policy().name == "float32"  # the next run in this process is unaffected

    kept = validate(compose_config("train.epochs=1", "loss=probs", "precision=mixed_float16", "precision.output_float32=true"))
    assert train(kept, load(kept.dataset, data_dir)).effective_from_logits is True


@pytest.mark.parametrize("setting", [("loss=probs_naive", "dataset.pixel_scale=none"),
                                     ("loss=probs", "precision=mixed_float16")])
def test_a_reused_trainer_trains_exactly_as_a_new_one(data_dir, setting):
    """Runs of one shape share the compiled loop; a new seed resets it to what a fresh build gives."""
    from pipeline import train as training
    from pipeline.models import build_classifier

    def config(seed):
        return validate(compose_config("train.epochs=2", f"seed={seed}", f"data_dir={data_dir}", *setting))

    def histories(result):
        return [{k: v for k, v in epoch.items() if not k.endswith("_seconds")} for epoch in result.history]

    splits = load(config(0).dataset, data_dir)
    new = {}
    for seed in (0, 1):
        training._TRAINERS.clear()
        new[seed] = histories(train(config(seed), splits))
    training._TRAINERS.clear()
    assert histories(train(config(0), splits)) == new[0]
    (first,) = training._TRAINERS.values()
    assert histories(train(config(1), splits)) == new[1]  # bit-identical, not merely close
    assert list(training._TRAINERS.values()) == [first]  # the same compiled loop, reused

    cfg = config(1)
    keras.mixed_precision.set_global_policy(cfg.precision.policy.value)
    try:
        form = first.clf.formulation
        reset = training.trainer_for(cfg, form, splits, None)
        fresh = build_classifier(form, splits.num_inputs, splits.num_classes, cfg.model.hidden_units,
                                 cfg.model.activation, seed=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert reset is first
    for ours, theirs in zip(reset.clf.model.get_weights(), fresh.model.get_weights()):
        assert np.array_equal(ours, theirs)
    built = training.make_optimizer(cfg)
    built.build(fresh.model.trainable_variables)
    for ours, theirs in zip(reset.optimizer.variables, built.variables):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("seed", [0, 7])
def test_a_seed_draws_the_initial_weights_that_keras_set_random_seed_gives(seed):
    """The classifier is seeded without TensorFlow's global seed (which clears TensorFlow's kernel caches);
    its initial weights are still those of the note's model after `keras.utils.set_random_seed(seed)`."""
    from pipeline.formulations import formulation
    from pipeline.models import build_classifier

    keras.utils.set_random_seed(seed + 1)  # another state first: ours must not depend on what came before
    ours = build_classifier(formulation("logits", "multiclass"), 784, 10, [25, 15], "relu", seed=seed)
    keras.utils.set_random_seed(seed)
    note = keras.Sequential([keras.Input((784,)), keras.layers.Dense(25, activation="relu"),
                             keras.layers.Dense(15, activation="relu"), keras.layers.Dense(10)])
    assert len(ours.model.get_weights()) == 6
    for a, b in zip(ours.model.get_weights(), note.get_weights()):
        assert np.array_equal(a, b)
