"""compare: a study's runs, read back from MLflow, as paired differences with confidence intervals.

Runs of a study that share every setting but the formulation and the seed form a *setting*; within a
setting, runs with the same seed are a pair (same initial weights, same batches). For each metric the
report gives the mean per formulation and, for each other arm, the mean over seeds of (arm - logits)
with a 95% t-interval. Every sentence in the report is derived from those numbers.

    python -m pipeline.compare --study seed_mnist        # latest study of that name
    python -m pipeline.compare --parent-run-id <id>
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

from pipeline.config import PROJECT_ROOT, PipelineError
from pipeline.tracking import MetricBuffer

BASELINE = "logits"
ARMS = ("probs", "logits", "probs_naive")
# One colour and line style per formulation, in every plot.
STYLE = {
    "probs": {"color": "#1f77b4", "linestyle": "--", "marker": "o", "label": "probs (note's original)"},
    "logits": {"color": "#2ca02c", "linestyle": "-", "marker": "s", "label": "logits (from_logits=True)"},
    "probs_naive": {"color": "#d62728", "linestyle": ":", "marker": "^", "label": "probs_naive (clipped)"},
}
# (metric, what it is, +1 if higher is better / -1 if lower is better / 0 if neither)
METRICS = [
    ("test_accuracy", "test accuracy", +1),
    ("test_nll", "test NLL (float64, from logits)", -1),
    ("test_ece", "test ECE (15 bins)", -1),
    ("test_brier", "test Brier score", -1),
    ("test_clipped_fraction", "test fraction with p_y < 1e-7", -1),
    ("test_max_abs_logit", "final max |logit| (test)", 0),
]
# Params that identify a run inside a setting rather than the setting itself.
PER_RUN_PARAMS = {"loss.formulation", "seed", "output_dir", "study", "data_dir", "tracking.uri"}


class StudyNotFound(PipelineError):
    pass


@dataclass
class Difference:
    arm: str
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    identical: bool  # every paired difference exactly 0
    positive: int  # seeds where arm > baseline
    negative: int  # seeds where arm < baseline

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.ci_low > 0 or self.ci_high < 0)


@dataclass
class Setting:
    label: str
    params: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    def by_arm(self, arm: str) -> dict[int, Run]:
        return {int(r.data.tags["seed"]): r for r in self.runs if r.data.tags.get("formulation") == arm}


def paired_difference(arm_values: dict[int, float], base_values: dict[int, float], arm: str, metric: str) -> Difference | None:
    seeds = sorted(set(arm_values) & set(base_values))
    if not seeds:
        return None
    d = np.array([arm_values[s] - base_values[s] for s in seeds], np.float64)
    mean = float(d.mean())
    if len(d) >= 2 and np.all(np.isfinite(d)):
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    else:
        half = math.nan
    return Difference(arm, metric, len(d), mean, mean - half, mean + half, bool(np.all(d == 0)),
                      int(np.sum(d > 0)), int(np.sum(d < 0)))


# Differences smaller than this, relative to the baseline's mean, are float32 round-off, not an effect.
ROUNDOFF_RELATIVE = 1e-5


def sentence(diff: Difference, description: str, direction: int, baseline_mean: float) -> str:
    """One sentence about a paired difference, derived from its numbers."""
    head = f"{description}: {diff.arm} - {BASELINE} = {diff.mean:+.4g}"
    if diff.identical:
        return f"{head}; equal in all {diff.n} paired seeds."
    if diff.n < 2 or math.isnan(diff.ci_low):
        return f"{head} over {diff.n} seed(s); too few finite pairs for an interval."
    interval = (f"(95% CI {diff.ci_low:+.4g} to {diff.ci_high:+.4g}, {diff.n} seeds; higher in {diff.positive}, "
                f"lower in {diff.negative})")
    if not diff.excludes_zero:
        return f"{head} {interval}; the interval includes zero: no difference shown."
    relative = abs(diff.mean) / abs(baseline_mean) if baseline_mean else math.inf
    if relative < ROUNDOFF_RELATIVE:
        return (f"{head} {interval}; the interval excludes zero, but the difference is {relative:.1g} of the "
                f"{BASELINE} mean: float round-off, not a practical difference.")
    higher = diff.mean > 0
    verdict = "neither better nor worse by this measure" if direction == 0 else (
        "better" if (higher and direction > 0) or (not higher and direction < 0) else "worse")
    return f"{head} {interval}; the interval excludes zero: {diff.arm} is {'higher' if higher else 'lower'} ({verdict})."


# --- reading a study -----------------------------------------------------------------------------------


def find_parent_run(client: MlflowClient, experiment: str, study: str | None, parent_run_id: str | None) -> Run:
    if parent_run_id:
        return client.get_run(parent_run_id)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=f"tags.role = 'study' and tags.study = '{study}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise StudyNotFound(f"study={study!r} has no parent run in experiment {experiment!r}; run it with "
                            f"`python -m pipeline.run -m experiment={study}`")
    return runs[0]


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=5000,
    )


def group_settings(runs: list[Run]) -> list[Setting]:
    """Splits runs by the params that are not per-run; labels settings by the params that vary."""
    keyed: dict[tuple, Setting] = {}
    for run in runs:
        params = {k: v for k, v in run.data.params.items() if k not in PER_RUN_PARAMS and not k.endswith("_examples")}
        key = tuple(sorted(params.items()))
        keyed.setdefault(key, Setting("", params)).runs.append(run)
    settings = list(keyed.values())
    varying = sorted({k for s in settings for k, v in s.params.items() if any(o.params.get(k) != v for o in settings)})
    for s in settings:
        s.label = ", ".join(f"{k}={s.params.get(k)}" for k in varying) or "all runs"
    return settings


# --- plots --------------------------------------------------------------------------------------------


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.4), squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _finish_axes(ax, xlabel: str, ylabel: str) -> None:
    """Every panel: named axes with units, a light grid, the formulations' legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _histories(client: MlflowClient, setting: Setting, key: str) -> dict[str, np.ndarray]:
    """Per arm, an (n_seeds, n_epochs) array of a per-epoch metric (NaN-padded where runs stopped early)."""
    out = {}
    for arm in ARMS:
        curves = []
        for run in setting.by_arm(arm).values():
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            curves.append([m.value for m in history])
        if curves and max(map(len, curves)) > 0:
            width = max(map(len, curves))
            out[arm] = np.array([c + [np.nan] * (width - len(c)) for c in curves], np.float64)
    return out


def plot_curves(client, setting: Setting, panels: list[tuple[str, str, bool]], title: str, path: Path) -> Path:
    fig, axes = _figure(len(panels))
    import warnings

    for ax, (key, ylabel, log_scale) in zip(axes, panels):
        positive = False
        for arm, curves in _histories(client, setting, key).items():
            epochs = np.arange(1, curves.shape[1] + 1)
            curves = np.where(np.isfinite(curves), curves, np.nan)  # a diverged run's inf/NaN: a gap
            with warnings.catch_warnings():  # all-NaN epochs are expected there
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(curves, axis=0), np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
            style = STYLE[arm]
            ax.plot(epochs, mean, color=style["color"], linestyle=style["linestyle"], label=style["label"])
            ax.fill_between(epochs, low, high, color=style["color"], alpha=0.15)
            positive |= bool(np.any(curves > 0))
        if log_scale and positive:
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _finish_axes(ax, "epoch", ylabel)
    fig.suptitle(f"{title}\n(mean over seeds; band = min..max)", fontsize=10)
    return _save(fig, path)


def plot_per_seed(setting: Setting, path: Path) -> Path:
    fig, axes = _figure(2)
    for ax, (metric, ylabel) in zip(axes, [("test_nll", "test NLL (nats/example, float64)"), ("test_accuracy", "test accuracy (fraction)")]):
        for arm in ARMS:
            runs = setting.by_arm(arm)
            seeds = sorted(runs)
            style = STYLE[arm]
            ax.plot(seeds, [runs[s].data.metrics.get(metric, np.nan) for s in seeds], color=style["color"],
                    linestyle=style["linestyle"], marker=style["marker"], label=style["label"])
        _finish_axes(ax, "seed", ylabel)
    fig.suptitle(f"Per-seed test results ({setting.label})", fontsize=10)
    return _save(fig, path)


def plot_reliability(client: MlflowClient, setting: Setting, path: Path) -> Path:
    fig, axes = _figure(1)
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="perfect calibration")
    for arm in ARMS:
        count = conf = acc = None
        for run in setting.by_arm(arm).values():
            try:
                bins = json.loads(Path(client.download_artifacts(run.info.run_id, "reliability.json")).read_text())
            except (MlflowException, OSError):
                continue  # a run that failed before evaluation has none
            n = np.asarray(bins["count"], np.float64)
            c, a = np.nan_to_num(np.asarray(bins["confidence"], np.float64)), np.nan_to_num(np.asarray(bins["accuracy"], np.float64))
            count, conf, acc = (n, c * n, a * n) if count is None else (count + n, conf + c * n, acc + a * n)
        if count is None:
            continue
        filled = count > 0
        style = STYLE[arm]
        ax.plot(conf[filled] / count[filled], acc[filled] / count[filled], color=style["color"],
                linestyle=style["linestyle"], marker=style["marker"], label=style["label"])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _finish_axes(ax, "mean confidence in bin (max probability)", "accuracy in bin (fraction)")
    ax.set_title(f"Reliability, test split, 15 bins, seeds pooled ({setting.label})", fontsize=10)
    return _save(fig, path)


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class SettingResult:
    setting: Setting
    means: dict[str, dict[str, float]]  # metric -> arm -> mean
    differences: list[Difference]
    sentences: list[str]
    effective: dict[str, str]  # arm -> effective_from_logits values seen
    plots: list[Path]


def summarize_setting(client: MlflowClient, finished: Setting, out_dir: Path, prefix: str) -> SettingResult:
    """Tables, sentences and plots of one setting; `finished` holds only the setting's FINISHED runs."""
    means, differences, sentences = {}, [], []
    for metric, description, direction in METRICS:
        values = {arm: {s: r.data.metrics[metric] for s, r in finished.by_arm(arm).items() if metric in r.data.metrics} for arm in ARMS}
        means[metric] = {arm: float(np.mean(list(v.values()))) if v else math.nan for arm, v in values.items()}
        for arm in ARMS:
            if arm == BASELINE:
                continue
            diff = paired_difference(values[arm], values[BASELINE], arm, metric)
            if diff is not None:
                differences.append(diff)
                sentences.append(sentence(diff, description, direction, means[metric][BASELINE]))
    effective = {arm: ", ".join(sorted({r.data.tags.get("effective_from_logits", "?") for r in finished.by_arm(arm).values()})) or "-"
                 for arm in ARMS}
    plots = [
        plot_curves(client, finished, [("train_epoch_loss", "loss as optimized (train, epoch mean)", True),
                                       ("val_nll_float64", "validation NLL (float64, from logits)", True)],
                    f"Learning curves ({finished.label})", out_dir / f"{prefix}learning_curves.png"),
        plot_per_seed(finished, out_dir / f"{prefix}per_seed.png"),
        plot_reliability(client, finished, out_dir / f"{prefix}reliability.png"),
        plot_curves(client, finished, [("train_clipped_fraction", "train fraction with p_y < 1e-7", False),
                                       ("grad_norm_ratio", "gradient-norm ratio (trained / exact logits loss)", False)],
                    f"Clipping over training ({finished.label})", out_dir / f"{prefix}clipping.png"),
    ]
    return SettingResult(finished, means, differences, sentences, effective, plots)


def _markdown_table(result: SettingResult) -> list[str]:
    lines = ["| metric | " + " | ".join(f"{a} (mean)" for a in ARMS) + " | " +
             " | ".join(f"{a} - {BASELINE} [95% CI]" for a in ARMS if a != BASELINE) + " |",
             "|---" * (1 + len(ARMS) + len(ARMS) - 1) + "|"]
    for metric, _, _ in METRICS:
        cells = [f"{result.means[metric][a]:.4g}" for a in ARMS]
        for arm in ARMS:
            if arm == BASELINE:
                continue
            d = next((d for d in result.differences if d.arm == arm and d.metric == metric), None)
            if d is None:
                cells.append("-")
            elif d.identical:
                cells.append("0 (identical)")
            elif math.isnan(d.ci_low):
                cells.append(f"{d.mean:+.4g} (no interval, {d.n} pair{'s' if d.n != 1 else ''})")
            else:
                cells.append(f"{d.mean:+.4g} [{d.ci_low:+.3g}, {d.ci_high:+.3g}]")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def console_table(result: SettingResult) -> str:
    rows = [["metric", *ARMS, *(f"{a}-{BASELINE} [95% CI]" for a in ARMS if a != BASELINE)]]
    for line in _markdown_table(result)[2:]:
        rows.append([c.strip() for c in line.strip("|").split("|")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_reports(study: str, parent: Run, results: list[SettingResult], failed: list[Run], out_dir: Path) -> tuple[Path, Path]:
    first = results[0].setting.runs[0] if results and results[0].setting.runs else None
    params = first.data.params if first else {}
    md = [f"# Study `{study}`: probabilities or logits?", "",
          f"MLflow parent run `{parent.info.run_id}` (experiment {parent.info.experiment_id}).", "",
          "## Setup", "",
          f"- dataset: `{params.get('dataset.name', '?')}` ({params.get('dataset.task', '?')}, classes "
          f"{params.get('dataset.classes', '?')}, pixel scale {params.get('dataset.pixel_scale', '?')}); "
          f"{params.get('train_examples', '?')} train / {params.get('val_examples', '?')} validation / "
          f"{params.get('test_examples', '?')} test examples",
          f"- model: `{params.get('model.name', '?')}` hidden {params.get('model.hidden_units', '?')} "
          f"{params.get('model.activation', '?')}; precision {params.get('precision.policy', '?')}",
          f"- training: {params.get('train.epochs', '?')} epochs, batch {params.get('train.batch_size', '?')}, "
          f"Adam lr {params.get('train.learning_rate', '?')}",
          "- paired design: within a setting, runs with the same seed share initial weights and batch order; "
          f"differences are arm - `{BASELINE}` per seed, with a 95% t-interval over seeds.", ""]
    if failed:
        md += [f"**{len(failed)} run(s) failed** and are left out: " + "; ".join(
            f"{r.info.run_name} ({r.data.tags.get('error', r.info.status)})" for r in failed), ""]
    for result in results:
        md += [f"## Setting: {result.setting.label}", "",
               "Whether the loss really consumed logits (probed per run, tag `effective_from_logits`): " +
               ", ".join(f"`{a}`: {v}" for a, v in result.effective.items()) + ".", "",
               *_markdown_table(result), "", "### What the numbers say", "",
               *(f"- {s}" for s in result.sentences), ""]
        md += [f"![{p.stem}]({p.name})" for p in result.plots] + [""]
    markdown = "\n".join(md)
    md_path = out_dir / "report.md"
    md_path.write_text(markdown)

    def embed(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'

    def inline(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text.strip()))

    body = []
    for line in markdown.splitlines():
        if line.startswith("!["):
            body.append(embed(out_dir / line[line.index("(") + 1 : -1]))
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            cells = [inline(c) for c in line.strip("|").split("|")]
            tag = "th" if body and not body[-1].startswith("<tr") else "td"
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line:
            body.append(f"<p>{inline(line)}</p>")
    joined, in_table = [], False
    for item in body:  # wrap consecutive rows in one table
        if item.startswith("<tr") and not in_table:
            joined.append("<table>")
            in_table = True
        elif not item.startswith("<tr") and in_table:
            joined.append("</table>")
            in_table = False
        joined.append(item)
    if in_table:
        joined.append("</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Study " + html.escape(study) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}"
            "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}</style></head><body>" + "\n".join(joined) + "</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path


def compare(uri: str, experiment: str, study: str | None = None, parent_run_id: str | None = None,
            out_dir: Path | None = None) -> dict:
    """Builds the report of a study from its MLflow runs and logs it to the parent run."""
    client = MlflowClient(uri)
    parent = find_parent_run(client, experiment, study, parent_run_id)
    study = study or parent.data.tags.get("study", parent.info.run_id)
    runs = child_runs(client, parent)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    failed = [r for r in runs if r.info.status != "FINISHED"]
    if not finished:
        raise StudyNotFound(f"study {study!r} (parent run {parent.info.run_id}) has no finished runs to compare")
    out_dir = Path(out_dir or PROJECT_ROOT / "reports" / study)
    summary, results = {}, []
    with staged_directory(out_dir) as staging:
        settings = group_settings(finished)
        results = [summarize_setting(client, s, staging, f"setting{i}_" if len(settings) > 1 else "")
                   for i, s in enumerate(settings)]
        write_reports(study, parent, results, failed, staging)
        summary = summary_metrics(results, finished, failed)
        (staging / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))

    log_buffer = MetricBuffer(client, parent.info.run_id)
    log_buffer.log(summary, step=0)
    log_buffer.flush()
    client.log_artifacts(parent.info.run_id, str(out_dir), artifact_path="report")
    return {"parent_run_id": parent.info.run_id, "study": study, "report_html": out_dir / "report.html",
            "report_md": out_dir / "report.md", "results": results, "failed": failed, "summary": summary}


class ReportWriteError(PipelineError):
    pass


@contextlib.contextmanager
def staged_directory(final: Path):
    """Yields an empty sibling folder; on success it replaces `final` whole, on failure it is removed,
    so a reader never finds half a report (a full disk leaves the previous report as it was)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        previous = final.with_name(f".{final.name}.previous-{os.getpid()}")
        if final.exists():
            final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ReportWriteError(f"could not write the report to {final}: {error.strerror or error}; "
                               "nothing was written (the previous report, if any, is unchanged)") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def summary_metrics(results: list[SettingResult], finished: list[Run], failed: list[Run]) -> dict[str, float]:
    """The report's numbers as flat metrics for the parent run and for DVC."""
    summary: dict[str, float] = {}
    for i, result in enumerate(results):
        prefix = f"setting{i}." if len(results) > 1 else ""
        for metric, arms in result.means.items():
            summary.update({f"{prefix}{metric}.{arm}": v for arm, v in arms.items() if math.isfinite(v)})
        for d in result.differences:
            base = f"{prefix}{d.metric}.{d.arm}_minus_{BASELINE}"
            summary.update({k: v for k, v in {base: d.mean, f"{base}.ci_low": d.ci_low, f"{base}.ci_high": d.ci_high}.items()
                            if math.isfinite(v)})
    summary["runs_finished"], summary["runs_failed"] = float(len(finished)), float(len(failed))
    return summary


def print_comparison(outcome: dict, stream=sys.stdout) -> None:
    print(f"\n=== study {outcome['study']}: paired comparison against {BASELINE} ===", file=stream)
    for result in outcome["results"]:
        print(f"\n[{result.setting.label}]  effective_from_logits: " +
              ", ".join(f"{a}={v}" for a, v in result.effective.items()), file=stream)
        print(console_table(result), file=stream)
    for run in outcome["failed"]:
        print(f"FAILED: {run.info.run_name}: {run.data.tags.get('error', run.info.status)}", file=stream)
    print(f"\nreport: {outcome['report_html']}\nMLflow parent run: {outcome['parent_run_id']}", file=stream)


def main(argv: list[str] | None = None) -> int:
    from pipeline.tracking import tracking_uri

    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--study", help="study name (the latest parent run with this name)")
    parser.add_argument("--parent-run-id", help="compare this parent run instead")
    parser.add_argument("--experiment", default="fromlogits")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<study>)")
    args = parser.parse_args(argv)
    if not args.study and not args.parent_run_id:
        parser.error("give --study NAME or --parent-run-id ID")
    try:
        outcome = compare(tracking_uri(args.tracking_uri), args.experiment, args.study, args.parent_run_id, args.out)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_comparison(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
