"""Paired statistics of one arm against the baseline: arrays in, dataclasses out, no I/O.

Within a setting, the runs of two arms with the same seed are a pair (same initial weights, same
batches). For a strictly positive metric where ratios mean something (NLL, ECE, Brier, max |logit|)
the effect is multiplicative — one arm can be ×1.1 worse in one seed and ×340 in another — so the
effect size is the geometric-mean ratio with a t-interval on the per-seed log ratios; the paired
difference is given beside it. Other metrics (accuracy, fractions that can be 0) use the difference.

THE DECISION RULE (`DECISION_RULE`, written into every report) decides every sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

LEVEL = 0.05
ROUNDOFF_RELATIVE = 1e-5  # an effect smaller than this, relative to the baseline, is float round-off

DECISION_RULE = (
    f"An effect is **shown** when the two-sided paired t-test — on per-seed log ratios for ratio metrics, on "
    f"per-seed differences otherwise — has a Holm-adjusted p-value below {LEVEL:g} (the family is every "
    f"comparison of that metric in this study: each setting × each arm against `logits`), and the effect "
    f"exceeds float round-off ({ROUNDOFF_RELATIVE:g} of the baseline, relative). Intervals are 95% t-intervals, "
    "not adjusted. The exact sign test (seeds higher vs lower, ties left out) is reported beside it as a check "
    "that needs no distributional assumption. Arms equal in every seed are *identical* (no test). Pairs with a "
    "non-finite value (a diverged run) are left out of the tests and counted."
)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline on one metric, over the seeds both have."""

    metric: str
    arm: str
    n: int  # finite pairs
    nonfinite: int  # pairs left out because a value is NaN or infinite
    identical: bool
    higher: int
    lower: int
    difference: Interval | None  # mean of arm - baseline
    ratio: Interval | None  # geometric mean of arm / baseline (ratio metrics only)
    p_value: float  # two-sided paired t-test (log scale for ratio metrics); NaN if not computable
    sign_p: float  # exact two-sided sign test; NaN without untied pairs
    baseline_mean: float
    p_holm: float = math.nan

    @property
    def roundoff(self) -> bool:
        if self.ratio is not None:
            return abs(math.log(self.ratio.estimate)) < ROUNDOFF_RELATIVE
        if self.difference is None:
            return False
        scale = abs(self.baseline_mean) or 1.0
        return abs(self.difference.estimate) < ROUNDOFF_RELATIVE * scale

    @property
    def shown(self) -> bool:
        return not self.identical and not self.roundoff and self.p_holm < LEVEL


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[Interval, float]:
    """Mean with its t-interval, and the two-sided one-sample t-test p-value against 0."""
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan), math.nan
    if np.allclose(values, values[0], rtol=1e-12, atol=0.0):  # constant: no spread to test against
        return Interval(mean, mean, mean), (1.0 if mean == 0 else 0.0)
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    p = float(stats.ttest_1samp(values, 0.0).pvalue)
    return Interval(mean, mean - half, mean + half), p


def sign_test(higher: int, lower: int) -> float:
    """Exact two-sided sign test: how surprising `higher` of `higher + lower` untied pairs is at p = 1/2."""
    n = higher + lower
    return float(stats.binomtest(higher, n, 0.5).pvalue) if n else math.nan


def compare_arm(metric: str, arm: str, arm_values: dict[int, float], base_values: dict[int, float],
                ratio_metric: bool) -> Comparison | None:
    """The paired comparison of one arm with the baseline; None when they share no seed."""
    seeds = sorted(set(arm_values) & set(base_values))
    if not seeds:
        return None
    a = np.array([arm_values[s] for s in seeds], np.float64)
    b = np.array([base_values[s] for s in seeds], np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    base_mean = float(b.mean()) if len(b) else math.nan
    d = a - b
    higher, lower = int(np.sum(d > 0)), int(np.sum(d < 0))
    identical = len(d) > 0 and bool(np.all(d == 0))
    if len(d) == 0 or identical:
        return Comparison(metric, arm, len(d), int((~finite).sum()), identical, higher, lower,
                          Interval(0.0, 0.0, 0.0) if identical else None, None, math.nan, math.nan, base_mean)
    difference, p = t_interval(d)
    ratio = None
    if ratio_metric and np.all(a > 0) and np.all(b > 0):
        log_interval, p = t_interval(np.log(a) - np.log(b))
        ratio = Interval(*(math.exp(v) if math.isfinite(v) else math.nan
                           for v in (log_interval.estimate, log_interval.low, log_interval.high)))
    return Comparison(metric, arm, len(d), int((~finite).sum()), False, higher, lower, difference, ratio, p,
                      sign_test(higher, lower), base_mean)


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm-adjusted p-values (one family; NaN p-values stay NaN)."""
    tested = [i for i, c in enumerate(comparisons) if math.isfinite(c.p_value)]
    order = sorted(tested, key=lambda i: comparisons[i].p_value)
    adjusted: dict[int, float] = {}
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * comparisons[i].p_value))
        adjusted[i] = running
    return [replace(c, p_holm=adjusted.get(i, math.nan)) for i, c in enumerate(comparisons)]
