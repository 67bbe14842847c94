"""The report as text: Markdown (report.md), HTML (report.html, figures embedded), and console tables,
all from one structure. Every sentence follows from `stats.DECISION_RULE`, written at the top."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import markdown as markdown_lib

from pipeline.files import write_text
from pipeline.record import Tag
from pipeline.report import (BASELINE, COMPARED, EPOCH_RATIO_RULE, METRICS, SPECS, Report, SettingResult, identical_in,
                             epoch_ratios)
from pipeline.report.findings import provenance
from pipeline.report.stats import DECISION_RULE, LEVEL, Comparison


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"  # not computable (e.g. one seed)


def effect_cell(c: Comparison | None) -> str:
    """The effect size of a comparison, as a table cell."""
    if c is None:
        return "-"
    if c.identical:
        return "identical"
    if c.difference is None:
        return f"no finite pairs ({c.nonfinite} left out)"
    d, r = c.difference, c.ratio
    if r is not None:
        estimate, interval = f"×{fmt(r.estimate, 3)}", f"[×{fmt(r.low, 3)}, ×{fmt(r.high, 3)}]"
    elif c.metric == "test_accuracy":
        estimate, interval = f"{100 * d.estimate:+.3g} pp", f"[{100 * d.low:+.3g}, {100 * d.high:+.3g}]"
    else:
        estimate, interval = f"{d.estimate:+.4g}", f"[{d.low:+.3g}, {d.high:+.3g}]"
    if not math.isfinite(d.low):  # fewer than two finite pairs: no t-interval
        interval = f"(no interval from {c.n} pair)"
    return f"{estimate} {interval}" + (" *" if c.shown else "")


def test_cell(c: Comparison | None) -> str:
    if c is None or c.identical or c.difference is None:
        return "-"
    return f"{c.higher}↑ {c.lower}↓ of {c.n}; sign p={fmt(c.sign_p, 2)}; Holm p={fmt(c.p_holm, 2)}"


def sentence(c: Comparison) -> str:
    """One sentence per comparison, derived from its numbers by the decision rule."""
    spec = SPECS[c.metric]
    left_out = f" ({c.nonfinite} pair(s) with a non-finite value left out)" if c.nonfinite else ""
    head = f"{spec.description}, `{c.arm}` vs `{BASELINE}`"
    if c.identical:
        return f"{head}: {identical_in(c.n)}{left_out}."
    if c.difference is None or c.n < 2 or not math.isfinite(c.p_value):
        return f"{head}: {c.n} finite pair(s){left_out}: too few to decide."
    size = (f"×{fmt(c.ratio.estimate, 3)} (95% CI ×{fmt(c.ratio.low, 3)} to ×{fmt(c.ratio.high, 3)}; "
            f"mean difference {c.difference.estimate:+.4g})") if c.ratio else (
            f"{c.difference.estimate:+.4g} (95% CI {c.difference.low:+.4g} to {c.difference.high:+.4g})")
    seeds = (f"higher in {c.higher} and lower in {c.lower} of {c.n} seeds{left_out} "
             f"(sign test p = {fmt(c.sign_p, 2)}; Holm-adjusted t-test p = {fmt(c.p_holm, 2)})")
    if c.roundoff:
        verdict = "the effect is float round-off, not a practical difference"
    elif not c.shown:
        verdict = f"no difference shown at level {LEVEL:g}"
    else:
        higher = c.difference.estimate > 0 if c.ratio is None else c.ratio.estimate > 1
        quality = ("" if spec.direction == 0 else
                   " (better)" if (higher and spec.direction > 0) or (not higher and spec.direction < 0) else " (worse)")
        verdict = f"shown: `{c.arm}` is {'higher' if higher else 'lower'}{quality}"
    return f"{head}: {size}; {seeds}: {verdict}."


def epoch_ratio_lines(result: SettingResult) -> list[str]:
    """Per compared arm, its validation NLL over the baseline's by epoch: whether an effect builds up or fades."""
    lines = []
    for arm in COMPARED:
        ratios = epoch_ratios(result.setting, arm)
        if not ratios:
            continue
        by_epoch = ("identical at every epoch" if all(r.equal == r.n for r in ratios) else ", ".join(map(str, ratios)))
        lines.append(f"validation NLL (float64), `{arm}` / `{BASELINE}` by epoch ({EPOCH_RATIO_RULE}): {by_epoch}.")
    return lines


def table_rows(result: SettingResult) -> tuple[list[str], list[list[str]]]:
    """The setting's table as a header and rows of cells (Markdown and console both use it)."""
    arms = [a for a in (*COMPARED[:1], BASELINE, *COMPARED[1:]) if a in result.effective]
    compared = [a for a in COMPARED if a in result.effective and BASELINE in result.effective]
    header = ["metric", *(f"{a} (mean)" for a in arms)]
    for arm in compared:
        header += [f"{arm} vs {BASELINE}", f"{arm}: seeds, tests"]
    rows = []
    for spec in METRICS:
        row = [spec.key, *(fmt(result.means[spec.key][a]) for a in arms)]
        for arm in compared:
            c = result.comparison(arm, spec.key)
            row += [effect_cell(c), test_cell(c)]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(escape, row)) + " |" for row in rows)]


def unfinished(run) -> str:
    """A run that did not finish, as the report names it: its status and why."""
    why = run.tags.get(Tag.ERROR) or run.tags.get(Tag.FAILED_REASON) or (
        "stopped before it finished (interrupted, a job cancelled or preempted); the same command resumes it"
        if run.status == "KILLED" else "no error recorded")
    return f"{run.name} ({run.status}: {why})"


def markdown(report: Report) -> str:
    p = report.setup
    md = [f"# Study `{report.study}`: probabilities or logits?", "",
          f"MLflow parent run `{report.parent_run_id}` (experiment {report.experiment_id}).", "",
          *(f"> {note}\n" for note in report.notes),
          "## Setup", "",
          f"- dataset: `{p.get('dataset.name', '?')}` ({p.get('dataset.task', '?')}, classes "
          f"{p.get('dataset.classes', '?')}, pixel scale {p.get('dataset.pixel_scale', '?')}); "
          f"{p.get('split.train_examples', '?')} train / {p.get('split.val_examples', '?')} validation / "
          f"{p.get('split.test_examples', '?')} test examples",
          f"- model: `{p.get('model.name', '?')}` hidden {p.get('model.hidden_units', '?')} "
          f"{p.get('model.activation', '?')}; precision {p.get('precision.policy', '?')}",
          f"- training: {p.get('train.epochs', '?')} epochs, batch {p.get('train.batch_size', '?')}, "
          f"Adam lr {p.get('train.learning_rate', '?')}",
          "- paired design: within a setting, runs with the same seed share initial weights and batch order.",
          f"- {provenance(report.environment)}", "",
          "## Decision rule", "", DECISION_RULE, "",
          "Ratio metrics (NLL, ECE, Brier, max |logit|) give the geometric-mean ratio arm / `logits` over seeds "
          "with its 95% interval; the others the mean difference (accuracy in percentage points). "
          "`*` marks an effect shown by the rule.", ""]
    if report.failed:
        md += [f"**{len(report.failed)} run(s) did not finish** and are left out: "
               + "; ".join(unfinished(r) for r in report.failed), ""]
    if report.atlas:
        md += ["## At a glance", "", f"![atlas]({report.atlas.name})", ""]
    for result in report.results:
        header, rows = table_rows(result)
        md += [f"## Setting: {result.setting.label}", "",
               "Whether the loss really consumed logits (probed per run, tag `effective_from_logits`): " +
               ", ".join(f"`{a}`: {v}" for a, v in result.effective.items()) + ".", "",
               *(f"> {note}\n" for note in result.notes),
               *markdown_table(header, rows), "", "### What the numbers say", ""]
        sentences = [sentence(c) for c in result.comparisons]
        md += [f"- {s}" for s in sentences] if sentences else ["- Nothing to compare in this setting."]
        md += [f"- {line}" for line in epoch_ratio_lines(result)]
        md += ["", *(f"![{path.stem}]({path.name})" for path in result.plots), ""]
    return "\n".join(md)


def to_html(report: Report, text: str, folder: Path) -> str:
    body = markdown_lib.markdown(text, extensions=["tables"], output_format="html")

    def embed(match: re.Match) -> str:
        path = folder / html.unescape(match.group(2))
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{match.group(1)}" src="data:image/png;base64,{data}"'

    body = re.sub(r'<img alt="([^"]*)" src="([^":]+\.png)"', embed, body)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Study " + html.escape(report.study) +
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
            "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}blockquote{color:#a33}</style></head><body>"
            + body + "</body></html>")


def write(report: Report, folder: Path) -> None:
    text = markdown(report)
    write_text(folder / "report.md", text)
    write_text(folder / "report.html", to_html(report, text, folder))


def console(report: Report) -> str:
    lines = [f"\n=== study {report.study}: paired comparison against {BASELINE} ===", *report.notes]
    for result in report.results:
        lines.append(f"\n[{result.setting.label}]  effective_from_logits: " +
                     ", ".join(f"{a}={v}" for a, v in result.effective.items()))
        lines += result.notes
        header, rows = table_rows(result)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines += [f"did not finish: {unfinished(r)}" for r in report.failed]
    lines += [f"\nreport: {report.html_path}", f"MLflow parent run: {report.parent_run_id}"]
    return "\n".join(lines)
