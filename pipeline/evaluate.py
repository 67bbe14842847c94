"""evaluate: test-split metrics that are true whatever the formulation did in training.

The model is evaluated as the function its weights define: the output layer is recomputed in float64
from the features (in NumPy, the same on every Keras backend), and NLL, ECE and Brier come from those
float64 logits. The float32 probabilities the
formulation itself produces are used only to count clipped and saturated examples.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.models import Classifier
from pipeline.numerics import (
    brier_score,
    class_probabilities,
    expected_calibration_error,
    nll_float64,
    reliability_bins,
    saturation_summary,
)


def evaluate(clf: Classifier, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], dict[str, list]]:
    """Test metrics, and the reliability-diagram bins behind the ECE."""
    task = clf.formulation.task
    # Backend-independent: the model gives features and outputs (float32 or lower); the output layer is
    # recomputed here from its weights, in NumPy float64 (JAX would silently compute "float64" in float32).
    features = np.asarray(keras.ops.convert_to_numpy(clf.features(x, training=False)), np.float64)
    kernel, bias = (np.asarray(w, np.float64) for w in clf.output_layer.get_weights())
    logits64 = features @ kernel + bias
    outputs = clf.model(x, training=False)
    probabilities = class_probabilities(logits64, task).numpy()
    formulation_probabilities = keras.ops.convert_to_numpy(clf.formulation.probabilities(outputs))
    summary = saturation_summary(logits64.astype(np.float32), formulation_probabilities, y, task)
    metrics = {
        "test_accuracy": float(np.mean(probabilities.argmax(axis=1) == y)),
        "test_nll": float(np.mean(nll_float64(logits64, y, task))),
        "test_ece": expected_calibration_error(probabilities, y),
        "test_brier": brier_score(probabilities, y),
        "test_clipped_fraction": float(summary["clipped_fraction"]),
        "test_saturated_fraction": float(summary["saturated_fraction"]),
        "test_above_cap_fraction": float(summary["above_cap_fraction"]),
        "test_max_abs_logit": float(summary["max_abs_logit"]),
        "test_examples": float(len(y)),
        "test_nonfinite_logits": float(summary["nonfinite_logits"]),
    }
    if summary["nonfinite_logits"]:  # a diverged network: saturation counts over NaN rows are not true zeros
        for key in ("test_clipped_fraction", "test_saturated_fraction", "test_above_cap_fraction", "test_max_abs_logit"):
            metrics[key] = float("nan")
    return metrics, reliability_bins(probabilities, y)

