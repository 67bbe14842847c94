"""The report's statistics and sentences on synthetic studies whose answer is known, and its figures'
indexing by epoch. No MLflow: the report's pure layers take plain data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pipeline.report import BASELINE, adjust_per_metric, analyse, render
from pipeline.report.plots import by_epoch
from pipeline.report.render import effect_cell, sentence
from pipeline.report.runs import RunData, Setting, group_settings
from pipeline.report.stats import compare_arm, holm, sign_test, t_interval


def run(arm: str, seed: int, nll: float, accuracy: float = 0.9, diverged: bool = False, params=None) -> RunData:
    metrics = {"test_nll": nll, "test_accuracy": accuracy, "test_ece": 0.05, "test_brier": 0.2,
               "test_clipped_fraction": 0.0, "test_max_abs_logit": 20.0}
    return RunData(f"id-{arm}-{seed}", f"{arm}-seed{seed}", "FINISHED", arm, seed,
                   {"formulation": arm, "seed": str(seed), "effective_from_logits": "false" if arm == "probs_naive" else "true",
                    "diverged": str(diverged).lower()}, params or {"train.epochs": "5"}, metrics)


def study(naive_nll: list[float], logits_nll: list[float], probs_nll: list[float] | None = None) -> list:
    runs = [run("logits", s, v) for s, v in enumerate(logits_nll)]
    runs += [run("probs_naive", s, v, diverged=not math.isfinite(v)) for s, v in enumerate(naive_nll)]
    runs += [run("probs", s, v) for s, v in enumerate(probs_nll if probs_nll is not None else logits_nll)]
    results = [analyse(s) for s in group_settings(runs)]
    adjust_per_metric(results)
    return results


def nll_sentence(results, arm: str = "probs_naive") -> str:
    return sentence(results[0].comparison(arm, "test_nll"))


# --- the pure statistics, against independent computations ----------------------------------------------


def test_sign_test_matches_scipy_and_the_hand_count():
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)  # 10 of 10: p = 2 * 0.5^10 = 0.00195
    assert sign_test(5, 0) == pytest.approx(0.0625)
    assert sign_test(7, 3) == pytest.approx(scipy_stats.binomtest(7, 10).pvalue)
    assert math.isnan(sign_test(0, 0))


def test_log_ratio_interval_by_hand():
    """The five raw-pixel seeds of issue 12: mean log ratio 3.70, i.e. a geometric-mean ratio of x40."""
    naive = np.array([1.93, 9.08, 110, 250, 356])
    logits = np.array([1.69, 1.20, 0.78, 0.97, 1.05])
    log_ratio = np.log(naive / logits)
    mean, sd = log_ratio.mean(), log_ratio.std(ddof=1)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4}
    c = compare_arm("test_nll", "probs_naive", dict(enumerate(naive)), dict(enumerate(logits)), ratio_metric=True)
    assert c.ratio.estimate == pytest.approx(math.exp(mean))
    assert (c.ratio.low, c.ratio.high) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert c.ratio.estimate == pytest.approx(40.31, abs=0.01) and c.ratio.low > 1
    assert c.p_value == pytest.approx(scipy_stats.ttest_1samp(log_ratio, 0).pvalue)
    assert (c.higher, c.lower, c.sign_p) == (5, 0, pytest.approx(0.0625))


def test_difference_interval_matches_scipy():
    d = np.array([0.3, -0.1, 0.25, 0.4, 0.05])
    interval, p = t_interval(d)
    low, high = scipy_stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert p == pytest.approx(scipy_stats.ttest_1samp(d, 0).pvalue)


def test_holm_adjustment_by_hand():
    base = compare_arm("m", "a", {0: 2.0, 1: 3.0, 2: 2.5}, {0: 1.0, 1: 1.1, 2: 1.2}, True)
    family = [base.__class__(**{**base.__dict__, "p_value": p}) for p in (0.01, 0.04, 0.03, math.nan)]
    adjusted = [c.p_holm for c in holm(family)]
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])


# --- sentences on synthetic studies ----------------------------------------------------------------------


def test_a_clear_multiplicative_effect_with_one_outlier_seed_is_shown():
    """Worse in all 10 seeds, by x3 to x5, and x300 in one: the raw difference's t-interval would include
    zero (the outlier inflates it), the log-ratio does not."""
    logits = [1.0, 1.1, 0.9, 1.2, 1.0, 0.95, 1.05, 1.1, 1.0, 0.9]
    naive = [3.0, 4.4, 3.6, 6.0, 4.0, 3.8, 4.2, 5.5, 300.0, 2.7]
    results = study(naive, logits)
    c = results[0].comparison("probs_naive", "test_nll")
    assert c.difference.low < 0 < c.difference.high  # what the old report went by
    assert c.shown and c.ratio.low > 1
    text = nll_sentence(results)
    assert "higher in 10 and lower in 0 of 10 seeds" in text and "sign test p = 0.002" in text
    assert text.endswith("shown: `probs_naive` is higher (worse).")


def test_no_effect_is_not_shown():
    rng = np.random.default_rng(3)
    logits = list(1.0 + 0.05 * rng.standard_normal(10))
    naive = [v * math.exp(0.02 * e) for v, e in zip(logits, rng.standard_normal(10))]
    text = nll_sentence(study(naive, logits))
    assert text.endswith("no difference shown at level 0.05.")


def test_identical_arms_are_identical_without_statistics():
    logits = [1.0, 1.1, 0.9]
    results = study([2.0, 2.2, 1.8], logits, probs_nll=logits)
    text = nll_sentence(results, "probs")
    assert text == "test NLL (float64, from logits), `probs` vs `logits`: identical in all 3 seeds."
    c = results[0].comparison("probs", "test_nll")
    assert math.isnan(c.p_value) and not c.shown
    one_seed = study([2.0], [1.0], probs_nll=[1.0])  # a study of one seed said "identical in all 1 seeds"
    assert nll_sentence(one_seed, "probs") == "test NLL (float64, from logits), `probs` vs `logits`: identical in its one seed."


def test_a_diverged_seed_is_left_out_and_said():
    logits = [1.0, 1.1, 0.9, 1.2, 1.0]
    naive = [5.0, float("nan"), 6.0, 7.0, 5.5]
    results = study(naive, logits)
    c = results[0].comparison("probs_naive", "test_nll")
    assert c.n == 4 and c.nonfinite == 1
    assert "(1 pair(s) with a non-finite value left out)" in nll_sentence(results)
    assert any("1 of 5 `probs_naive` run(s) diverged" in note for note in results[0].notes)


def test_one_seed_gives_an_estimate_without_an_interval_or_a_test():
    """A one-seed study (DVC's tiny default, a quick try): no t-interval or p-value exists, and the
    report says so in words, never as `nan`."""
    results = study([2.0], [1.0])
    c = results[0].comparison("probs_naive", "test_nll")
    assert effect_cell(c) == "×2 (no interval from 1 pair)"
    assert render.test_cell(c) == "1↑ 0↓ of 1; sign p=1; Holm p=n/a"
    assert nll_sentence(results).endswith("1 finite pair(s): too few to decide.")
    accuracy = results[0].comparison("probs_naive", "test_accuracy")
    assert accuracy.identical  # the helper gives every run accuracy 0.9
    logits_only = study([1.5, 2.0], [1.0, 1.0])
    assert "[" in effect_cell(logits_only[0].comparison("probs_naive", "test_nll"))  # two pairs: an interval


def test_a_study_without_the_baseline_says_so():
    runs = [run("probs", s, 1.0 + s) for s in range(2)]
    (result,) = [analyse(s) for s in group_settings(runs)]
    assert result.comparisons == []
    assert any(f"No `{BASELINE}` runs in this setting" in note for note in result.notes)


def test_roundoff_is_not_an_effect():
    logits = [0.5, 0.6, 0.55, 0.52, 0.58]
    naive = [v * (1 + 1e-7 * (i + 1)) for i, v in enumerate(logits)]
    text = nll_sentence(study(naive, logits))
    assert text.endswith("the effect is float round-off, not a practical difference.")


def test_settings_are_split_by_every_setting_param_but_not_by_where_files_go():
    runs = [run("logits", 0, 1.0, params={"train.learning_rate": "0.001", "train.diagnostics_examples": "10000", "data_dir": "/a"}),
            run("logits", 1, 1.0, params={"train.learning_rate": "0.001", "train.diagnostics_examples": "10000", "data_dir": "/b"}),
            run("logits", 0, 1.0, params={"train.learning_rate": "0.001", "train.diagnostics_examples": "500", "data_dir": "/a"})]
    settings = group_settings(runs)
    assert sorted(len(s.runs) for s in settings) == [1, 2]
    assert {s.label for s in settings} == {"train.diagnostics_examples=10000", "train.diagnostics_examples=500"}


def test_curves_are_placed_by_epoch_not_by_position():
    """A resumed run whose history starts at epoch 5 keeps its values at epochs 5..8."""
    epochs, matrix = by_epoch([{1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5, 7: 0.4, 8: 0.3},
                               {5: 0.65, 6: 0.55, 7: 0.45, 8: 0.35}])
    assert list(epochs) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert np.isnan(matrix[1, :4]).all() and list(matrix[1, 4:]) == [0.65, 0.55, 0.45, 0.35]


def test_a_setting_uses_only_its_own_seed_pairs():
    s = Setting({}, [run("logits", 0, 1.0), run("logits", 1, 1.0), run("probs_naive", 1, 2.0)])
    c = analyse(s).comparison("probs_naive", "test_nll")
    assert c.n == 1 and "too few to decide" in sentence(c)


def test_the_readmes_findings_are_what_the_committed_command_makes():
    """The README's findings cannot drift from the pipeline's measurement: each study's block is generated
    from its committed findings.json (docs/findings/<study>.json), and every copy there has its block."""
    import json

    from pipeline.config import PROJECT_ROOT
    from pipeline.report.findings import DOCS, block, shown_in

    readme = (PROJECT_ROOT / "README.md").read_text()
    copies = sorted((PROJECT_ROOT / DOCS).glob("*.json"))
    assert {p.stem for p in copies} >= {"atlas", "raw_pixels", "backends"}
    for copy in copies:
        findings = json.loads(copy.read_text())
        assert findings["study"] == copy.stem
        assert shown_in(readme, copy.stem) == block(findings), (
            f"README's block of study {copy.stem} is stale: run `python -m pipeline.report.findings "
            f"{DOCS / copy.stem}.json --readme README.md`")


def test_a_setting_is_labelled_once_by_params_that_always_change_together():
    """The task decides dataset.classes and the model: the label names the task only, and every factor
    that varies on its own."""
    binary = {"dataset.task": "binary", "dataset.classes": "[0, 1]", "model.name": "seed_sigmoid"}
    multiclass = {"dataset.task": "multiclass", "dataset.classes": "None", "model.name": "seed_relu"}
    runs = [run("logits", 0, 1.0, params={**task, "train.learning_rate": lr})
            for task in (binary, multiclass) for lr in ("0.001", "0.05")]
    assert {s.label for s in group_settings(runs)} == {
        f"dataset.task={t}, train.learning_rate={lr}" for t in ("binary", "multiclass") for lr in ("0.001", "0.05")}


def test_the_findings_summary_states_where_the_rescue_held_and_what_the_rule_shows_by_rule():
    """The README's summary of the atlas is derived from its findings, not typed: counts, the rule that picks
    the settings (a conjunction or disjunction of factors), and the shown and the large-but-not-shown effects."""
    from pipeline.report import Report, findings_json
    from pipeline.report.findings import summary

    rng = np.random.default_rng(0)
    runs = []
    for backend in ("tensorflow", "jax"):
        for policy in ("float32", "mixed_float16"):
            rescued = backend == "tensorflow" and policy == "float32"
            noisy = backend == "jax" and policy == "mixed_float16"  # large, but too uneven over 5 seeds to show
            for seed in range(5):
                logits = 0.3 + 0.01 * seed
                naive = logits * (10 + rng.uniform(-1, 1)) if rescued else logits * (
                    [40.0, 0.5, 30.0, 0.6, 20.0][seed] if noisy else 1 + 0.001 * rng.uniform(-1, 1))
                probs = logits if rescued else naive
                for arm, nll in (("logits", logits), ("probs", probs), ("probs_naive", naive)):
                    r = run(arm, seed, nll, params={"backend.name": backend, "precision.policy": policy})
                    r.tags["effective_from_logits"] = str(arm == "logits" or (arm == "probs" and rescued)).lower()
                    r.curves = {"val_nll_float64": {1: 2 * nll, 2: nll}}
                    runs.append(r)
    results = [analyse(s) for s in group_settings(runs)]
    adjust_per_metric(results)
    lines = summary(findings_json(Report("atlas", "p", "0", results, [], [], {})))
    assert lines[0].endswith("in 1 of 4 settings (exactly those with backend.name=tensorflow and "
                             "precision.policy=float32); there `probs` trained identically to `logits` "
                             "(every seed's test NLL equal) in 1 of 1.")
    assert lines[1].endswith("in 3 of 4 settings (exactly those with backend.name=jax or "
                             "precision.policy=mixed_float16); there `probs` trained as `probs_naive` "
                             "(every seed's test NLL equal) in 3 of 3.")
    shown, large = lines[2].split("\n"), lines[3].split("\n")
    assert ": 1 comparison in 1 setting," in shown[0] and len(shown) == 2
    assert shown[1].startswith("  - backend.name=tensorflow, precision.policy=float32: `probs_naive` ×9.")
    assert shown[1].endswith(", higher in 5/5 seeds")
    assert ": 2 comparisons in 1 setting:" in large[0] and len(large) == 2 and "×0.5 or less" in large[0]
    assert lines[4].startswith("- **How the shown effects built up**") and len(lines) == 6  # the shown one only
    assert lines[5].startswith("  - backend.name=tensorflow, precision.policy=float32, `probs_naive`: epoch 1 ×9.")
    assert lines[5].endswith("(5/5)") and ", epoch 2 ×9." in lines[5]
    assert large[1].startswith("  - backend.name=jax, precision.policy=mixed_float16: `probs` = `probs_naive` ×")


def test_the_validation_nll_ratio_by_epoch_pairs_seeds_by_epoch_and_says_when_an_arm_is_identical():
    """A resumed run's history starts late; its values pair with the baseline's at the same epochs."""
    from pipeline.report import epoch_ratios
    from pipeline.report.render import epoch_ratio_lines

    runs = [run("logits", 0, 1.0), run("logits", 1, 1.0), run("probs_naive", 0, 2.0), run("probs_naive", 1, 2.0),
            run("probs", 0, 1.0), run("probs", 1, 1.0)]
    curves = {("logits", 0): {1: 1.0, 2: 1.0, 3: 1.0}, ("logits", 1): {1: 1.0, 2: 1.0, 3: 1.0},
              ("probs_naive", 0): {1: 2.0, 2: 4.0, 3: 8.0}, ("probs_naive", 1): {3: 2.0},  # resumed at epoch 3
              ("probs", 0): {1: 1.0, 2: 1.0, 3: 1.0}, ("probs", 1): {1: 1.0, 2: 1.0, 3: 1.0}}
    for r in runs:
        r.curves = {"val_nll_float64": curves[(r.arm, r.seed)]}
    setting = Setting({}, runs)
    ratios = epoch_ratios(setting, "probs_naive")
    assert [(r.epoch, r.higher, r.equal, r.n) for r in ratios] == [(1, 1, 0, 1), (2, 1, 0, 1), (3, 2, 0, 2)]
    assert [r.ratio for r in ratios] == pytest.approx([2.0, 4.0, 4.0])  # epoch 3: sqrt(8 x 2)
    lines = epoch_ratio_lines(analyse(setting))
    assert lines == ["validation NLL (float64), `probs` / `logits` by epoch (geometric mean over the seeds where both "
                     "are finite; in how many of them higher): identical at every epoch.",
                     "validation NLL (float64), `probs_naive` / `logits` by epoch (geometric mean over the seeds "
                     "where both are finite; in how many of them higher): epoch 1 ×2 (1/1), epoch 2 ×4 (1/1), "
                     "epoch 3 ×4 (2/2)."]


@pytest.mark.parametrize("case", ["missing", "not json", "not findings", "readme without markers"])
def test_the_findings_command_refuses_bad_input_in_one_line_and_leaves_the_readme_as_it_was(tmp_path, case, capsys):
    import subprocess
    import sys

    from pipeline.config import PROJECT_ROOT
    from pipeline.report.findings import main

    findings, readme = tmp_path / "findings.json", tmp_path / "README.md"
    readme.write_text("# a README without the table's markers\n")
    if case == "not json":
        findings.write_text("{")
    elif case == "not findings":
        findings.write_text('{"settings": [{"label": 1}]}')
    elif case == "readme without markers":
        findings.write_text((PROJECT_ROOT / "docs" / "findings" / "atlas.json").read_text())
    argv = [str(findings), "--readme", str(readme)]
    if case == "missing":  # typed as a user would, through the module's entry point
        result = subprocess.run([sys.executable, "-m", "pipeline.report.findings", *argv], capture_output=True,
                                text=True, cwd=PROJECT_ROOT, timeout=120)
        code, stderr = result.returncode, result.stderr
    else:  # the same main(), in this process: a second of imports less each
        code, stderr = main(argv), capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    (line,) = stderr.splitlines()
    named = "--readme " + str(readme) if case == "readme without markers" else str(findings)
    assert line.startswith(f"error: {named} is not accepted: ")
    assert readme.read_text() == "# a README without the table's markers\n"


def test_a_report_is_the_same_whatever_order_the_store_returns_the_runs_in():
    """MLflow lists runs by start time, which a parallel study scrambles: the atlas reread gave means one ulp
    apart ((0.1 + 0.2) + 0.3 is not 0.1 + (0.2 + 0.3)). Every number is computed over seeds in seed order."""
    runs = [run(arm, seed, nll) for arm, nlls in (("logits", (0.1, 0.2, 0.3)), ("probs_naive", (0.7, 0.1, 0.9)))
            for seed, nll in enumerate(nlls)]
    first, second = (analyse(s) for s in (Setting({}, runs), Setting({}, runs[::-1])))
    assert first.means == second.means and first.comparisons == second.comparisons
    assert first.means["test_nll"]["logits"] == (0.1 + 0.2 + 0.3) / 3  # summed by seed


def test_a_run_that_did_not_finish_is_named_with_its_status_and_why_alike_on_the_console_and_in_the_report():
    """A job cancelled or preempted on a cluster ends its run KILLED with no error: the console called it
    "FAILED: <run>: KILLED", the Markdown "(KILLED: no error recorded)"; it is resumed by the same command."""
    from pathlib import Path

    from pipeline.report import Report
    from pipeline.report.render import console, markdown

    cancelled = RunData("id-c", "logits-seed1", "KILLED", "logits", 1, {"formulation": "logits", "seed": "1"}, {}, {})
    crashed = RunData("id-f", "probs-seed1", "FAILED", "probs", 1, {"error": "ValueError: class(es) [12] are absent"},
                      {}, {})
    stale = RunData("id-s", "probs-seed2", "FAILED", "probs", 2, {"failed_reason": "its process 42 is gone"}, {}, {})
    report = Report("s", "parent", "1", study([0.3, 0.4], [0.3, 0.4]), [cancelled, crashed, stale], [], {},
                    folder=Path("reports/s"))
    named = ["logits-seed1 (KILLED: stopped before it finished (interrupted, a job cancelled or preempted); the same "
             "command resumes it)", "probs-seed1 (FAILED: ValueError: class(es) [12] are absent)",
             "probs-seed2 (FAILED: its process 42 is gone)"]
    assert [line for line in console(report).splitlines() if line.startswith("did not finish")] == [
        f"did not finish: {name}" for name in named]
    assert f"**3 run(s) did not finish** and are left out: {'; '.join(named)}" in markdown(report)
