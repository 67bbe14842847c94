"""A study's report: its runs (runs.py) -> paired statistics (stats.py) -> figures (plots.py) ->
Markdown, HTML and console text (render.py), written to one folder and logged to the parent run.

    python -m pipeline.report --study seed_mnist        # the latest finished study of that name
    python -m pipeline.report --parent-run-id <id>
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import FormulationName
from pipeline.files import staged_folder, write_json
from pipeline.record import PROVENANCE, Tag, provenances
from pipeline.report import plots
from pipeline.report.runs import RunData, Setting, StudyNotFound, group_settings, log_report, read_study
from pipeline.report.stats import Comparison, compare_arm, holm

BASELINE = FormulationName.logits.value
ARMS = tuple(f.value for f in FormulationName)
COMPARED = tuple(a for a in ARMS if a != BASELINE)


@dataclass(frozen=True)
class MetricSpec:
    key: str
    description: str
    direction: int  # +1 higher is better, -1 lower is better, 0 neither
    ratio: bool  # strictly positive, effects multiplicative: compared by geometric-mean ratio


METRICS = (
    MetricSpec("test_nll", "test NLL (float64, from logits)", -1, True),
    MetricSpec("test_accuracy", "test accuracy", +1, False),
    MetricSpec("test_ece", "test ECE (15 bins)", -1, True),
    MetricSpec("test_brier", "test Brier score", -1, True),
    MetricSpec("test_clipped_fraction", "test fraction with p_y < 1e-7", -1, False),
    MetricSpec("test_max_abs_logit", "final max |logit| (test)", 0, True),
)
SPECS = {m.key: m for m in METRICS}


@dataclass
class SettingResult:
    setting: Setting
    means: dict[str, dict[str, float]]  # metric -> arm -> mean over finite runs
    comparisons: list[Comparison]
    effective: dict[str, str]  # arm -> effective_from_logits values seen
    diverged: dict[str, int]  # arm -> runs tagged diverged=true
    notes: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    def comparison(self, arm: str, metric: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.arm == arm and c.metric == metric), None)


@dataclass
class Report:
    study: str
    parent_run_id: str
    experiment_id: str
    results: list[SettingResult]
    failed: list[RunData]
    notes: list[str]
    setup: dict[str, str]
    folder: Path | None = None
    atlas: Path | None = None
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def html_path(self) -> Path:
        return self.folder / "report.html"

    @property
    def environment(self) -> dict[str, list[str]]:
        """Where the numbers were made: each distinct commit, package set and CPU among the finished runs and
        their earlier attempts (a chaotic setting's digits depend on all three; a study resumed elsewhere lists
        more than one), and under "resumed_elsewhere" the runs whose attempts differed."""
        runs = [run for result in self.results for run in result.setting.runs]
        made = {run.name: provenances(run.tags) for run in runs}
        return {**{tag: sorted({p[tag] for attempts in made.values() for p in attempts}) for tag in PROVENANCE},
                "resumed_elsewhere": sorted(name for name, attempts in made.items() if len(attempts) > 1)}


def metric_values(setting: Setting, arm: str, metric: str) -> dict[int, float]:
    return {seed: run.metrics.get(metric, math.nan) for seed, run in setting.by_arm(arm).items()}


def analyse(setting: Setting) -> SettingResult:
    """Means, comparisons (not yet Holm-adjusted) and notes of one setting."""
    means, comparisons, notes = {}, [], []
    for spec in METRICS:
        values = {arm: metric_values(setting, arm, spec.key) for arm in ARMS}
        means[spec.key] = {arm: _finite_mean(v.values()) for arm, v in values.items()}
        for arm in COMPARED:
            found = compare_arm(spec.key, arm, values[arm], values[BASELINE], spec.ratio)
            if found is not None:
                comparisons.append(found)
    present = [arm for arm in ARMS if setting.by_arm(arm)]
    if BASELINE not in present:
        notes.append(f"No `{BASELINE}` runs in this setting: there is no baseline to compare against, so only the "
                     f"means of {', '.join(f'`{a}`' for a in present)} are given.")
    diverged = {arm: sum(r.tags.get(Tag.DIVERGED) == "true" for r in setting.by_arm(arm).values()) for arm in present}
    for arm, count in diverged.items():
        if count:
            total = len(setting.by_arm(arm))
            notes.append(f"{'Every' if count == total else f'{count} of {total}'} `{arm}` run(s) diverged "
                         "(non-finite loss or weights; tag diverged=true): their non-finite metrics are left out.")
    effective = {arm: ", ".join(sorted({r.tags.get(Tag.EFFECTIVE_FROM_LOGITS, "?") for r in setting.by_arm(arm).values()}))
                 for arm in present}
    return SettingResult(setting, means, comparisons, effective, diverged, notes)


# The epochs at which a report gives each arm's validation-NLL ratio to logits (and always the last one).
RATIO_EPOCHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True)
class EpochRatio:
    """An arm's validation NLL over the baseline's at one epoch: geometric mean over the seed pairs with a
    finite positive value in both, and in how many of them the arm's is higher."""

    epoch: int
    ratio: float
    higher: int
    equal: int
    n: int

    def __str__(self) -> str:
        return f"epoch {self.epoch} ×{self.ratio:.3g} ({self.higher}/{self.n})"  # a ratio of finite pairs: finite


EPOCH_RATIO_RULE = "geometric mean over the seeds where both are finite; in how many of them higher"


def identical_in(seeds: int) -> str:
    """How an arm equal to the baseline in every seed is worded, in the report and the README's blocks alike."""
    return "identical in its one seed" if seeds == 1 else f"identical in all {seeds} seeds"


def epoch_ratios(setting: Setting, arm: str, key: str = "val_nll_float64") -> list[EpochRatio]:
    """`arm` against the baseline at RATIO_EPOCHS and the last epoch, pairing values by epoch (step), so a
    resumed run's history is read where it was logged."""
    mine = {seed: run.curves.get(key, {}) for seed, run in setting.by_arm(arm).items()}
    base = {seed: run.curves.get(key, {}) for seed, run in setting.by_arm(BASELINE).items()}
    logged = sorted({epoch for curve in base.values() for epoch in curve})
    if not logged:
        return []
    ratios = []
    for epoch in sorted({*(e for e in RATIO_EPOCHS if e < logged[-1] and e in logged), logged[-1]}):
        pairs = [(mine[s][epoch], base[s][epoch]) for s in mine if s in base and epoch in mine[s] and epoch in base[s]]
        pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
        if pairs:
            ratio = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
            ratios.append(EpochRatio(epoch, ratio, higher=sum(a > b for a, b in pairs),
                                     equal=sum(a == b for a, b in pairs), n=len(pairs)))
    return ratios


def _finite_mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def adjust_per_metric(results: list[SettingResult]) -> None:
    """Holm within each metric's family: every setting x arm comparison of that metric in the study."""
    for spec in METRICS:
        family = [(r, i) for r in results for i, c in enumerate(r.comparisons) if c.metric == spec.key]
        adjusted = holm([r.comparisons[i] for r, i in family])
        for (r, i), comparison in zip(family, adjusted):
            r.comparisons[i] = comparison


def draw(result: SettingResult, folder: Path, prefix: str) -> list[Path]:
    s, label = result.setting, result.setting.label
    present = [a for a in ARMS if s.by_arm(a)]

    def curves(key: str) -> dict[str, list[dict[int, float]]]:
        return {arm: [r.curves.get(key, {}) for r in s.by_arm(arm).values()] for arm in present}

    return [
        plots.plot_curves([("loss as optimized (train, epoch mean)", True, curves("train_epoch_loss")),
                           ("validation NLL (float64, from logits)", True, curves("val_nll_float64"))],
                          f"Learning curves ({label})", folder / f"{prefix}learning_curves.png"),
        plots.plot_per_seed([("test NLL (nats/example, float64)", {a: metric_values(s, a, "test_nll") for a in present}),
                             ("test accuracy (fraction)", {a: metric_values(s, a, "test_accuracy") for a in present})],
                            f"Per-seed test results ({label})", folder / f"{prefix}per_seed.png"),
        plots.plot_reliability({a: [r.reliability for r in s.by_arm(a).values() if r.reliability] for a in present},
                               f"Reliability, test split, 15 bins, seeds pooled ({label})", folder / f"{prefix}reliability.png"),
        plots.plot_curves([("train fraction with p_y < 1e-7", False, curves("train_clipped_fraction")),
                           ("gradient-norm ratio (trained / exact logits loss)", False, curves("grad_norm_ratio"))],
                          f"Clipping over training ({label})", folder / f"{prefix}clipping.png"),
    ]


def draw_atlas(results: list[SettingResult], path: Path) -> Path:
    """The study at a glance: each setting's test-NLL ratio of each arm to logits."""
    ratio = np.full((len(results), len(COMPARED)), np.nan)
    shown = np.zeros_like(ratio, dtype=bool)
    notes = [["" for _ in COMPARED] for _ in results]
    for i, r in enumerate(results):
        for j, arm in enumerate(COMPARED):
            c = r.comparison(arm, "test_nll")
            if c is not None:
                ratio[i, j] = 1.0 if c.identical else (c.ratio.estimate if c.ratio else np.nan)
                shown[i, j] = c.shown
                notes[i][j] = "identical" if c.identical else f"n={c.n}"
            notes[i][j] += f"\nfrom_logits: {r.effective.get(arm, '-')}"
    columns = [f"{arm} vs {BASELINE}" for arm in COMPARED]
    return plots.plot_atlas([r.setting.label for r in results], columns, ratio, shown, notes,
                            "Test NLL: when does computing the loss from probabilities hurt?", path)


def summary_metrics(report: Report) -> dict[str, float]:
    """Every number of the report as flat metrics, for the parent run and metrics.json."""
    summary: dict[str, float] = {}
    for i, result in enumerate(report.results):
        prefix = f"setting{i}." if len(report.results) > 1 else ""
        for metric, arms in result.means.items():
            summary.update({f"{prefix}{metric}.{arm}": v for arm, v in arms.items() if math.isfinite(v)})
        for c in result.comparisons:
            base = f"{prefix}{c.metric}.{c.arm}"
            values = {f"{base}_minus_{BASELINE}": c.difference.estimate if c.difference else math.nan,
                      f"{base}_minus_{BASELINE}.ci_low": c.difference.low if c.difference else math.nan,
                      f"{base}_minus_{BASELINE}.ci_high": c.difference.high if c.difference else math.nan,
                      f"{base}_over_{BASELINE}": c.ratio.estimate if c.ratio else math.nan,
                      f"{base}_over_{BASELINE}.ci_low": c.ratio.low if c.ratio else math.nan,
                      f"{base}_over_{BASELINE}.ci_high": c.ratio.high if c.ratio else math.nan,
                      f"{base}.p_holm": c.p_holm, f"{base}.sign_p": c.sign_p,
                      f"{base}.shown": float(c.shown)}
            summary.update({k: v for k, v in values.items() if math.isfinite(v)})
    summary["runs_finished"] = float(sum(len(r.setting.runs) for r in report.results))
    summary["runs_failed"] = float(len(report.failed))
    return summary


def findings_json(report: Report) -> dict:
    """What the README's findings are made of (pipeline/report/findings.py): per setting, what the loss
    consumed, each arm's test-NLL effect against logits, as the report states them, and its validation-NLL
    ratio to logits by epoch."""
    settings = []
    for result in report.results:
        effects = {}
        for arm in COMPARED:
            c = result.comparison(arm, "test_nll")
            if c is None:
                continue
            effects[arm] = {"identical": c.identical, "shown": c.shown, "roundoff": c.roundoff, "n": c.n,
                            "higher": c.higher, "lower": c.lower, "p_holm": c.p_holm,
                            "ratio": None if c.ratio is None else [c.ratio.estimate, c.ratio.low, c.ratio.high]}
        probs, naive = (metric_values(result.setting, arm.value, "test_nll")
                        for arm in (FormulationName.probs, FormulationName.probs_naive))
        settings.append({"label": result.setting.label, "factors": result.setting.factors,
                         "effective": result.effective, "means": result.means["test_nll"], "test_nll": effects,
                         "val_nll_by_epoch": {arm: [asdict(r) for r in epoch_ratios(result.setting, arm)]
                                              for arm in effects},
                         # every seed's test NLL the same number (NaN included): probs trained as probs_naive
                         "probs_is_probs_naive": bool(probs) and probs.keys() == naive.keys() and all(
                             str(probs[seed]) == str(naive[seed]) for seed in probs)})
    return {"study": report.study, "parent_run_id": report.parent_run_id, "environment": report.environment,
            "settings": settings}


def build_report(uri: str, reports_dir: Path, experiment: str | None = None, study: str | None = None,
                 parent_run_id: str | None = None, out_dir: Path | None = None, at_study_end: bool = False) -> Report:
    """Reads a study's runs, writes its report folder (`out_dir`, default <reports_dir>/<study>) whole or
    not at all, and logs it to the parent run. `at_study_end`: the study's own command, after its last job
    (`read_study`)."""
    from pipeline.config import DEFAULT_EXPERIMENT
    from pipeline.report import render

    data = read_study(uri, experiment or DEFAULT_EXPERIMENT, study, parent_run_id, at_study_end)
    if not data.finished:
        raise StudyNotFound(f"study {data.study!r} (parent run {data.parent_run_id}) has no finished runs to report on"
                            + (f"; {len(data.failed)} run(s) did not finish" if data.failed else ""))
    results = [analyse(s) for s in group_settings(data.finished)]
    adjust_per_metric(results)
    setup = data.finished[0].params
    report = Report(data.study, data.parent_run_id, data.experiment_id, results, data.failed, data.notes, setup)
    folder = Path(out_dir) if out_dir else Path(reports_dir) / data.study
    with staged_folder(folder) as staging:
        for i, result in enumerate(results):
            result.plots = draw(result, staging, f"setting{i}_" if len(results) > 1 else "")
        report.atlas = draw_atlas(results, staging / "atlas.png")
        report.summary = summary_metrics(report)
        render.write(report, staging)
        write_json(staging / "metrics.json", report.summary)
        write_json(staging / "findings.json", findings_json(report))
    report.folder = folder
    log_report(uri, data.parent_run_id, report.summary, folder)
    return report


def print_report(report: Report, stream=sys.stdout) -> None:
    from pipeline.report import render

    print(render.console(report), file=stream, flush=True)
