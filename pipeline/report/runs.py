"""A study read back from MLflow as plain data: the only module of the report that touches the store.

Per-epoch histories are indexed by step (the epoch), never by position: a resumed run's history may
have been written in two parts, and a run that stopped early has fewer epochs.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, PipelineError, check_name, first_line
from pipeline.record import STUDY_ROLE, Tag, setting_params
from pipeline.tracking.store import NO_SUCH_RUN, TrackingUnavailable, not_answering

CURVE_KEYS = ("train_epoch_loss", "val_nll_float64", "train_clipped_fraction", "grad_norm_ratio")


class StudyNotFound(PipelineError):
    pass


@dataclass
class RunData:
    run_id: str
    name: str
    status: str
    arm: str
    seed: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # key -> {epoch: value}
    reliability: dict[str, list] | None = None


@dataclass
class Setting:
    """Runs that share every setting param; within it, runs with the same seed are a pair."""

    params: dict[str, str]
    runs: list[RunData] = field(default_factory=list)
    factors: dict[str, str] = field(default_factory=dict)  # the params that tell it from the study's others
    label: str = ""

    def by_arm(self, arm: str) -> dict[int, RunData]:
        """The arm's runs by seed, in seed order: sums over seeds do not depend on the order the store lists them."""
        return {r.seed: r for r in sorted(self.runs, key=lambda r: r.seed) if r.arm == arm}


@dataclass
class StudyData:
    study: str
    parent_run_id: str
    experiment_id: str
    finished: list[RunData]
    failed: list[RunData]
    notes: list[str]  # e.g. which of several parent runs of this name was chosen


def find_parent(client: MlflowClient, experiment: str, study: str | None, parent_run_id: str | None) -> tuple[Run, list[str]]:
    """The parent run to report on, and notes for the reader (other parents of the same name)."""
    if parent_run_id is not None:
        if not parent_run_id.strip():  # --parent-run-id "$RUN" with RUN unset: named, not read as no id given
            raise ConfigError(f"--parent-run-id={parent_run_id!r} is not accepted: it is empty; expected the id of a "
                              "study's parent run, as the study prints it (MLflow parent run: <id>)")
        try:
            return client.get_run(parent_run_id), []
        except MlflowException as error:
            if error.error_code not in NO_SUCH_RUN:
                raise TrackingUnavailable(f"the tracking store did not return run {parent_run_id} "
                                          f"({first_line(error)})") from None
            raise StudyNotFound(f"--parent-run-id {parent_run_id!r} is not a run in this store") from None
    check_name("--study", study)
    found = client.get_experiment_by_name(experiment)
    parents = [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=f"tags.{Tag.ROLE} = '{STUDY_ROLE}' and tags.{Tag.STUDY} = '{study}'",
        order_by=["attributes.start_time DESC"], max_results=100)
    if not parents:
        raise StudyNotFound(f"study={study!r} has no parent run in experiment {experiment!r}; run it with "
                            f"`python -m pipeline.run -m experiment={study}` (or name the study with study=...)")
    finished = [p for p in parents if p.info.status == "FINISHED"]
    chosen = (finished or parents)[0]
    notes = []
    if len(parents) > 1:
        others = ", ".join(f"{p.info.run_id} ({p.info.status})" for p in parents if p is not chosen)
        notes.append(f"{len(parents)} parent runs are named study-{study}; this report uses the latest "
                     f"{'FINISHED ' if finished else ''}one, {chosen.info.run_id}. Others: {others}. "
                     "Choose one with --parent-run-id.")
    return chosen, notes


def metric_histories(client: MlflowClient, run_id: str, keys) -> dict[str, dict[int, float]]:
    """Each metric's values by step; a step logged twice (a resumed run re-sending a batch) keeps its last value."""
    return {key: {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
            for key in keys}


def _run_data(client: MlflowClient, run: Run, with_details: bool) -> RunData:
    tags = run.data.tags
    data = RunData(run.info.run_id, run.info.run_name or run.info.run_id, run.info.status,
                   tags.get(Tag.FORMULATION, "?"), int(tags.get(Tag.SEED, "-1")), tags, run.data.params,
                   run.data.metrics)
    if with_details:
        data.curves = metric_histories(client, run.info.run_id, CURVE_KEYS)
        data.reliability = None  # a run that stopped before evaluation has none
        # Listed first: MLflow reports a file it could not download as one it could not find, and a report
        # drawn without a run's diagrams would not say why.
        if any(a.path == "reliability.json" for a in client.list_artifacts(run.info.run_id)):
            try:
                data.reliability = json.loads(Path(client.download_artifacts(run.info.run_id, "reliability.json"))
                                              .read_text())
            except (MlflowException, OSError) as error:
                raise TrackingUnavailable(f"the tracking store did not return run {run.info.run_id}'s reliability.json "
                                          f"({first_line(error)})") from None
    return data


@contextlib.contextmanager
def answered(doing: str) -> Iterator[None]:
    """A request of the block that a tracking server did not answer becomes one line saying what was being done."""
    try:
        yield
    except Exception as error:
        if not not_answering(error):
            raise
        raise TrackingUnavailable(f"the tracking store did not answer while {doing} ({first_line(error)})") from None


def read_study(uri: str, experiment: str, study: str | None = None, parent_run_id: str | None = None,
               at_study_end: bool = False) -> StudyData:
    """A study's runs, finished and not. `at_study_end`: read by the study's own command after its last job,
    whose parent run ends once the report is written; otherwise a RUNNING parent run is noted as a study that
    has not ended (running, or its command killed)."""
    client = MlflowClient(uri)
    parent, notes = find_parent(client, experiment, study, parent_run_id)
    with answered(f"the report read the runs of parent run {parent.info.run_id}"):
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.{Tag.PARENT} = '{parent.info.run_id}'", max_results=5000)
        finished = [_run_data(client, r, True) for r in runs if r.info.status == "FINISHED"]
        failed = [_run_data(client, r, False) for r in runs if r.info.status != "FINISHED"]
    name = parent.data.tags.get(Tag.STUDY, parent.info.run_id)
    if parent.info.status == "RUNNING" and not at_study_end:  # asked for while the study runs, or its command was killed
        running = sum(r.status == "RUNNING" for r in failed)
        notes.append(f"The study's parent run {parent.info.run_id} is still RUNNING (the study is running, or its "
                     f"command was killed): this report covers the {len(finished)} run(s) finished so far; "
                     f"{running} run(s) are RUNNING.")
    return StudyData(name, parent.info.run_id, parent.info.experiment_id, finished, failed, notes)


def group_settings(runs: list[RunData]) -> list[Setting]:
    """Splits runs by their setting params; labels settings by the params that vary between them."""
    keyed: dict[tuple, Setting] = {}
    for run in runs:
        params = setting_params(run.params)
        keyed.setdefault(tuple(sorted(params.items())), Setting(params)).runs.append(run)
    settings = list(keyed.values())
    varying = sorted({k for s in settings for k, v in s.params.items() if any(o.params.get(k) != v for o in settings)},
                     key=lambda k: (LABEL_ORDER.index(k) if k in LABEL_ORDER else len(LABEL_ORDER), k))
    shown: list[str] = []
    for key in varying:  # a param that only ever changes together with one already shown says nothing new
        if not any(_confounded(settings, key, other) for other in shown):
            shown.append(key)
    for s in settings:
        s.factors = {k: s.params.get(k) for k in shown}
        s.label = ", ".join(f"{k}={v}" for k, v in s.factors.items()) or "all runs"
    return settings


# Which of several params that always change together names a setting (e.g. dataset.task, not model.name).
LABEL_ORDER = ("backend.name", "dataset.name", "dataset.task", "precision.policy", "dataset.pixel_scale",
               "train.learning_rate", "train.epochs")


def _confounded(settings: list[Setting], a: str, b: str) -> bool:
    """Whether the values of `a` and `b` correspond one to one across the settings."""
    pairs = {(s.params.get(a), s.params.get(b)) for s in settings}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def log_report(uri: str, parent_run_id: str, summary: dict[str, float], folder: Path) -> None:
    """The report's folder as the parent run's `report` artifacts and its numbers as the parent's metrics."""
    from pipeline.tracking import MetricBuffer

    client = MlflowClient(uri)
    buffer = MetricBuffer(client, parent_run_id)
    buffer.log(summary, step=0)
    buffer.flush()
    with answered(f"the report was stored in parent run {parent_run_id}"):
        client.log_artifacts(parent_run_id, str(folder), artifact_path="report")
