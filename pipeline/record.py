"""A run's identity — its name, tags and params — made from the typed config in one place.

Every writer of a run (the Hydra entry point, the DVC stages, the record of a failed sweep job) and
every reader (the report, the checkpoint key) uses the names defined here, so a tag or a param is
spelled once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT, Config


class Tag:
    """MLflow tag names the pipeline writes and reads."""

    FORMULATION = "formulation"
    SEED = "seed"
    STUDY = "study"
    ROLE = "role"  # "study" on a study's parent run
    DATASET = "dataset"
    DATASET_VERSION = "dataset_version"
    DATASET_SHA256 = "dataset_sha256"
    TASK = "task"
    PRECISION = "precision"
    BACKEND = "backend"
    VERSIONS = "versions"
    CPU = "cpu"  # the processor and its vector instructions: they decide the math kernels, hence round-off
    GIT_COMMIT = "git_commit"
    GIT_DIRTY = "git_dirty"
    EFFECTIVE_FROM_LOGITS = "effective_from_logits"
    OUTPUT_DTYPE = "output_dtype"
    DIVERGED = "diverged"
    ERROR = "error"
    FAILED_REASON = "failed_reason"
    CONFIG_DIGEST = "config_digest"  # which configuration a run trains, recorded where (config_digest)
    # A resumed run's earlier attempts made with another commit, package set or CPU than the attempt after them:
    # a JSON list of their PROVENANCE tags, oldest first (the run's own PROVENANCE tags are its last attempt's).
    EARLIER_PROVENANCE = "earlier_provenance"
    PARENT = "mlflow.parentRunId"


# Where a run's numbers were made: a chaotic setting's digits depend on the code, the packages and the CPU.
PROVENANCE = (Tag.GIT_COMMIT, Tag.GIT_DIRTY, Tag.VERSIONS, Tag.CPU)


def changed_provenance(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """The PROVENANCE tags a run resumed with tags `now` changes from `before` (a tag not given stays as it is)."""
    return [tag for tag in PROVENANCE if tag in before and tag in now and before[tag] != now[tag]]


def resumed_provenance(before: dict[str, str], now: dict[str, str]) -> str | None:
    """The EARLIER_PROVENANCE tag of a run resumed with tags `now`, whose tags were `before`: what it held, and the
    previous attempt's PROVENANCE if it differs from this one's; None while every attempt was made alike."""
    earlier = json.loads(before.get(Tag.EARLIER_PROVENANCE, "[]"))
    if changed_provenance(before, now):
        earlier.append({tag: before[tag] for tag in PROVENANCE if tag in before})
    return json.dumps(earlier) if earlier else None


def provenances(tags: dict[str, str]) -> list[dict[str, str]]:
    """Every PROVENANCE a run's epochs were made with: its last attempt's, then its earlier ones' that differed."""
    made = [tags, *json.loads(tags.get(Tag.EARLIER_PROVENANCE, "[]"))]
    return [{tag: attempt.get(tag, "not recorded") for tag in PROVENANCE} for attempt in made]


STUDY_ROLE = "study"
MODEL_NAME = "model"  # the name each run logs its model under: runs:/<run id>/model

# The two keys that make a run one arm of one pair inside a setting.
ARM_KEYS = ("loss.formulation", "seed")
# Where a run is recorded: not part of what is trained, but part of which run a checkpoint continues.
BELONGING_KEYS = ("tracking.uri", "tracking.experiment", "study")
# How the store is talked to: neither what is trained nor where it is recorded.
CONNECTION_KEYS = ("tracking.timeout_seconds", "tracking.give_up_seconds", "tracking.flush_seconds")
# Where files go and how the command behaves: neither what is trained nor where it is recorded.
PLACEMENT_KEYS = ("data_dir", "reports_dir", "checkpoints_dir", "output_dir", "allow_download", "resume",
                  "conf_digest", *CONNECTION_KEYS)
# Facts about the data a run saw (params logged beside the config), not settings chosen.
SPLIT_KEYS = ("split.train_examples", "split.val_examples", "split.test_examples")
# A setting is what every arm and seed of a comparison share: every param but these.
NOT_A_SETTING = frozenset(ARM_KEYS + BELONGING_KEYS + PLACEMENT_KEYS + SPLIT_KEYS)


def setting_params(params: dict[str, str]) -> dict[str, str]:
    """The params of a run that define its setting (grid.* is what DVC sweeps, not a run's setting)."""
    return {k: v for k, v in params.items() if k not in NOT_A_SETTING and not k.startswith("grid.")}


def config_params(cfg: Config) -> dict[str, str]:
    """The typed config as MLflow params: dotted keys, string values."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True), "")
    return flat


@dataclass(frozen=True)
class DatasetRef:
    """Which data a run saw: name, TFDS version, where it is prepared, sha256 of the bundled source."""

    name: str
    version: str
    data_dir: str
    checksum: str | None


@dataclass(frozen=True)
class RunRecord:
    name: str
    tags: dict[str, str]
    params: dict[str, str]


def run_name(cfg: Config) -> str:
    backend = "" if cfg.backend.name.value == "tensorflow" else f"-{cfg.backend.name.value}"
    return f"{cfg.loss.formulation.value}-seed{cfg.seed}{backend}"


def identity_tags(cfg: Config) -> dict[str, str]:
    """The tags that place a run in a study and a pair; known before any data is read."""
    tags = {
        Tag.FORMULATION: cfg.loss.formulation.value,
        Tag.SEED: str(cfg.seed),
        Tag.DATASET: cfg.dataset.name,
        Tag.TASK: cfg.dataset.task.value,
        Tag.PRECISION: cfg.precision.policy.value,
        Tag.BACKEND: cfg.backend.name.value,
    }
    if cfg.study:
        tags[Tag.STUDY] = cfg.study
    tags[Tag.CONFIG_DIGEST] = config_digest(cfg)
    return tags


def run_record(cfg: Config, dataset: DatasetRef) -> RunRecord:
    """The name, tags and params of the run that trains `cfg` on `dataset`."""
    tags = {**identity_tags(cfg), Tag.DATASET_VERSION: dataset.version, Tag.VERSIONS: package_versions(),
            Tag.CPU: cpu_description(), **git_state()}
    if dataset.checksum:
        tags[Tag.DATASET_SHA256] = dataset.checksum
    return RunRecord(run_name(cfg), tags, config_params(cfg))


PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "jax", "torch", "tensorflow-datasets", "numpy", "mlflow", "hydra-core")


@functools.cache
def package_versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return " ".join(found)


# The vector instructions that choose TensorFlow's (oneDNN's, Eigen's) and XLA's kernels: two CPUs that differ
# in them sum in different orders, so a chaotic setting (raw pixels, a high learning rate) ends elsewhere.
VECTOR_FLAGS = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "asimd", "sve", "sve2", "bf16", "i8mm")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS")  # settings that change which kernels run


@functools.cache
def cpu_description() -> str:
    """The processor a run trained on, e.g. "AMD EPYC, x86_64: sse4_1 avx avx2 fma" (plus any kernel cap set)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass  # not Linux: the model platform gives, no flags
    model = fields.get("model name") or fields.get("Model") or platform.processor() or "unknown"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    described = f"{model}, {platform.machine()}: {' '.join(f for f in VECTOR_FLAGS if f in flags) or 'flags unknown'}"
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    return " ".join([described, *caps])


@functools.cache
def git_state() -> dict[str, str]:
    """The commit the code came from and whether tracked files differ from it (read once a process)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)

    commit = git("rev-parse", "HEAD")
    if commit.returncode != 0:
        return {Tag.GIT_COMMIT: "unknown", Tag.GIT_DIRTY: "unknown"}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return {Tag.GIT_COMMIT: commit.stdout.strip(), Tag.GIT_DIRTY: str(dirty).lower()}


def checkpoint_key(cfg: Config) -> dict:
    """What a checkpoint continues: everything that changes what is trained and where it is recorded."""
    params = config_params(cfg)
    return {k: v for k, v in params.items() if k not in PLACEMENT_KEYS and not k.startswith("grid.")}


def config_digest(cfg: Config) -> str:
    """sha256 of `checkpoint_key`: equal for two runs exactly when they train the same configuration into
    the same store, experiment and study (names a checkpoint's folder; finds a finished run to keep)."""
    return hashlib.sha256(json.dumps(checkpoint_key(cfg), sort_keys=True).encode()).hexdigest()

