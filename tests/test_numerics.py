"""Reported numbers against hand-computed or mpmath values, including NaN/Inf rows."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from pipeline.formulations import Task
from pipeline.numerics import (
    brier_score,
    class_probabilities,
    expected_calibration_error,
    nll_float64,
    saturation_summary,
)
from test_formulations import exact_bce, exact_ce

mpmath.mp.dps = 50


@pytest.mark.parametrize(
    "z,y",
    [([0.0, 30.0, 0.0], 1), ([100.0, 0.0, 0.0], 1), ([1000.0, 999.0, 998.0], 0), ([-1000.0, -1000.0, -1000.0], 2),
     ([17.0] + [0.0] * 9, 0), ([0.0, 10.0, 0.0], 1), ([3.0, -2.0, 0.5], 2)],
)
def test_multiclass_nll_is_accurate_to_float64_relative_precision(z, y):
    got = float(nll_float64(np.array([z]), np.array([y]), Task.multiclass)[0])
    assert got == pytest.approx(exact_ce(z, y), rel=1e-14, abs=1e-300)


def test_tiny_loss_keeps_its_digits():
    """1.87e-13 at [0, 30, 0]: TF's float32 kernel returns 0 here, a naive float64 lse loses ~2 digits."""
    got = float(nll_float64(np.array([[0.0, 30.0, 0.0]]), np.array([1]), Task.multiclass)[0])
    assert got == pytest.approx(2 * math.exp(-30), rel=1e-14)


@pytest.mark.parametrize("z,t", [(40.0, 1), (40.0, 0), (-745.0, 1), (0.0, 0), (-3.5, 0), (800.0, 0)])
def test_binary_nll_is_accurate(z, t):
    got = float(nll_float64(np.array([[z]]), np.array([t]), Task.binary)[0])
    assert got == pytest.approx(exact_bce(z, t), rel=1e-14)


def test_ece_and_brier_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> bin 13, 0.6 -> bin 8, 0.7 -> bin 10, 0.8 -> bin 11 (all distinct)
    # |acc - conf| per example: |1-.9|, |0-.6|, |1-.7|, |1-.8| -> mean = (0.1+0.6+0.3+0.2)/4
    assert expected_calibration_error(p, y) == pytest.approx(0.3)
    # sum_k (p_k - onehot)^2: 0.02, 0.72, 0.18, 0.08
    assert brier_score(p, y) == pytest.approx((0.02 + 0.72 + 0.18 + 0.08) / 4)


def test_ece_pools_examples_sharing_a_bin():
    p = np.array([[0.95, 0.05], [0.96, 0.04]])
    assert expected_calibration_error(p, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.955))


def test_binary_probabilities_have_two_columns():
    probs = class_probabilities(np.array([[0.0], [800.0], [-800.0]]), Task.binary).numpy()
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])


def test_saturation_summary_on_small_arrays_with_nonfinite_rows():
    logits = np.array([[20.0, 0.0, 0.0], [0.0, 1.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0]], np.float32)
    labels = np.array([1, 1, 0, 0])
    # float32 probabilities as the formulation would produce them (softmax), NaN rows included
    shifted = np.exp(logits[:2] - logits[:2].max(axis=1, keepdims=True))
    probs = np.concatenate([shifted / shifted.sum(axis=1, keepdims=True), np.full((2, 3), np.nan)]).astype(np.float32)
    s = {k: float(v) for k, v in saturation_summary(logits, probs, labels, Task.multiclass).items()}
    # row 0: p_y = exp(-20)/(1+2 exp(-20)) = 2.06e-9 < 1e-7 -> clipped; p_max = 1 - 4e-9 -> saturated
    assert s["clipped_fraction"] == pytest.approx(1 / 4)
    assert s["saturated_fraction"] == pytest.approx(1 / 4)
    assert s["max_abs_logit"] == pytest.approx(20.0)  # non-finite entries are counted, not maximised
    assert s["nonfinite_logits"] == 2
    assert s["mean_logit_margin"] == pytest.approx((20.0 + 1.0) / 2)  # finite rows only
    assert math.isnan(s["nll_float64"])  # a NaN row makes the mean NaN: reported, not hidden
    assert s["above_cap_fraction"] == pytest.approx(1 / 4)  # row 0: NLL = 20 > 16.118
