"""The configuration: typed schemas for `conf/`, the check of a command line's overrides, and the
one-line error a user gets for what they can fix (`PipelineError`, quoting other tools with `first_line`).

Imports no TensorFlow, so composing and checking a config takes well under a second.

OmegaConf checks types when a config is composed or overridden (`train.epochs=ten` fails there); the
`__post_init__` checks below run when `validate` turns the composed config into these dataclasses, so
an out-of-range value fails before any data is touched or any MLflow run is opened.
`pipeline/config/overrides.py` does both for every value of a sweep before Hydra starts.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_project_root() -> Path:
    """PROJECT_ROOT, except in DVC's queued experiments (run in .dvc/tmp/exps/... copies of the repo):
    there, the repository they were queued from, so that their runs land in its MLflow store."""
    parts = PROJECT_ROOT.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return PROJECT_ROOT


class Task(str, enum.Enum):
    multiclass = "multiclass"
    binary = "binary"


class FormulationName(str, enum.Enum):
    """The three arms; pipeline/formulations.py says what each one computes."""

    probs = "probs"
    logits = "logits"
    probs_naive = "probs_naive"


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing data): reported in one line, without a traceback."""


def first_line(message: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (its type's name when it has none) or of a text, cut at
    `limit` characters and then marked "…": what a one-line error quotes from another tool's error."""
    text = str(message).strip()
    if not text:
        return type(message).__name__ if isinstance(message, BaseException) else ""
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit - 1] + "…"


# What OmegaConf's "Value 'ten' of type 'str' could not be converted to Integer" means, as the pipeline's own
# errors say what they accept.
_OMEGACONF_TYPES = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false"}


def value_problem(error: BaseException) -> str:
    """What is wrong with a value OmegaConf refused: "expected a whole number" for a value of the wrong type,
    else the first line of its error (a key the schema lacks, an option not among those it names)."""
    converted = re.search(r"could not be converted to (\w+)", str(error))
    if converted and converted.group(1) in _OMEGACONF_TYPES:
        return f"expected {_OMEGACONF_TYPES[converted.group(1)]}"
    return first_line(error)


def error_summary(error: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error whose type tells more than its message alone (OSError, KeyError, ...)."""
    return f"{type(error).__name__}: {first_line(str(error), limit)}"


class ConfigError(PipelineError, ValueError):
    """A configuration value outside what the pipeline accepts."""


def _require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is not accepted: expected {accepted}")


# A TFDS dataset name, optionally with its builder config; never a path of its own.
TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
TFDS_VERSION = re.compile(r"\d+\.\d+\.\d+")  # also the name of a prepared version's folder
# Study and experiment names become folder names and MLflow filter values: a closed alphabet, no path.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
SEED_LIMIT = 2**32  # numpy's and Keras's seeds are unsigned 32-bit


def require_folder(key: str, value: str, path: Path, writable: bool) -> None:
    """A folder the pipeline uses: an existing folder (writable if `writable`), or one that can be created
    (its nearest existing parent is a writable folder). Leaves nothing behind (see `_takes_new_folders`).
    An empty `value` is refused: it would be the folder the path is relative to (the project root, say); so is
    one starting with '~', which would be a folder of that name there, not a home folder."""
    if not value.strip():
        raise ConfigError(f"{key}={value!r} is not accepted: it is empty; expected the path of a folder")
    parts = Path(value).parts  # none for "."
    if parts and parts[0].startswith("~"):  # a shell expands it, Python does not: `rm -rf ~` would remove the wrong one
        home, within = parts[0], path.parents[len(parts) - 1]
        written_out = os.path.expanduser(value)
        raise ConfigError(f"{key}={value!r} is not accepted: '~' is not expanded here, so it would be a folder named "
                          f"{home!r} in {within}; expected the path written out"
                          + (f", e.g. {written_out}" if written_out != value else ""))
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        written = writable or existing != path
        problem = (f"{existing} is not a folder" if not existing.is_dir()
                   else f"{existing} is not writable" if written and not os.access(existing, os.W_OK | os.X_OK)
                   else _takes_new_folders(existing) if written else None)
    except OSError as error:  # e.g. a parent this user may not search
        problem = f"{error.filename} cannot be read ({error.strerror})"
    if problem:
        raise ConfigError(f"{key}={value!r} is not accepted: {problem}; expected a folder that exists or can be "
                          f"created{' and written' if writable else ''}")


def _takes_new_folders(folder: Path) -> str | None:
    """None if a folder can be created in `folder`, else why not. Tried, with an empty temporary folder removed
    at once: access() cannot tell, as root passes it everywhere (/proc, /sys, where mkdir fails). Named before it
    is made, so that a stop (Ctrl-C) landing as it is made removes it too; its name holds this process's id."""
    import secrets

    probe = folder / f".fromlogits-check-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            probe.mkdir()
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
    except OSError as error:
        return f"{folder} takes no new folders ({error.strerror})"
    return None


def check_name(key: str, value: str) -> str:
    """A user-typed name that may become a path: accepted only from NAME_PATTERN."""
    _require(isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None, key, value, NAME_RULE)
    return value


STORE_URI = "a store's URI (sqlite:///<file>, http://<host>:<port>, …)"  # what an empty one is refused for


def check_store_uri(key: str, value: str, unset: str) -> str:
    """A tracking store's URI as typed: an empty one (tracking.uri=$SERVER, SERVER unset) would mean the local store,
    as none given does (`unset`: how to give none)."""
    if not value.strip():
        raise ConfigError(f"{key}={value!r} is not accepted: it is empty; expected {STORE_URI}, or {unset} for "
                          "$MLFLOW_TRACKING_URI, else the local store")
    return value


# "1/255" maps pixels to [0, 1]; "none" keeps raw 0..255, the setting where probabilities saturate early.
PIXEL_SCALES = {"1/255": 1.0 / 255.0, "none": 1.0}


HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu", "elu", "linear")


@dataclass
class DatasetConfig:
    name: str = "mnist_sample"  # TFDS builder name
    task: Task = Task.multiclass
    classes: Optional[List[int]] = None  # None keeps every class; binary tasks name two (-> labels 0, 1)
    pixel_scale: str = "1/255"
    validation_fraction: float = 0.1
    version: Optional[str] = None  # TFDS version; None = the builder's default

    def __post_init__(self):
        # Both become parts of paths under data_dir (TFDS's layout: <name>[/<config>]/<version>).
        _require(TFDS_NAME.fullmatch(self.name) is not None, "dataset.name", self.name,
                 "a TFDS dataset name: lower-case letters, digits and _, optionally /<config>, e.g. mnist_sample")
        _require(self.version is None or TFDS_VERSION.fullmatch(self.version) is not None, "dataset.version",
                 self.version, "null (the builder's default) or a version such as 1.0.0")
        _require(self.pixel_scale in PIXEL_SCALES, "dataset.pixel_scale", self.pixel_scale, " or ".join(PIXEL_SCALES))
        _require(0.0 <= self.validation_fraction < 1.0, "dataset.validation_fraction", self.validation_fraction, "a number in [0, 1)")
        if self.task is Task.binary:
            _require(
                self.classes is not None and len(self.classes) == 2 and len(set(self.classes)) == 2,
                "dataset.classes", self.classes, "two distinct class ids for a binary task, e.g. [0, 1]",
            )
        elif self.classes is not None:
            _require(len(set(self.classes)) >= 2, "dataset.classes", self.classes, "at least two distinct class ids, or null for all")


@dataclass
class ModelConfig:
    name: str = "seed_relu"
    hidden_units: List[int] = field(default_factory=lambda: [25, 15])
    activation: str = "relu"

    def __post_init__(self):
        _require(all(u > 0 for u in self.hidden_units), "model.hidden_units", self.hidden_units, "positive layer widths")
        _require(self.activation in HIDDEN_ACTIVATIONS, "model.activation", self.activation, f"one of {', '.join(HIDDEN_ACTIVATIONS)}")


@dataclass
class LossConfig:
    formulation: FormulationName = FormulationName.logits


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    # Diagnostics on the training set use a fixed subset of at most this many examples per epoch.
    diagnostics_examples: int = 10_000

    def __post_init__(self):
        _require(self.epochs > 0, "train.epochs", self.epochs, "a whole number > 0")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "a whole number > 0")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "train.learning_rate", self.learning_rate,
                 "a finite number > 0")
        _require(self.diagnostics_examples > 0, "train.diagnostics_examples", self.diagnostics_examples, "a whole number > 0")


class Precision(str, enum.Enum):
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


@dataclass
class PrecisionConfig:
    policy: Precision = Precision.float32
    output_float32: bool = False  # keep the output layer in float32 under a mixed policy


DEFAULT_EXPERIMENT = "fromlogits"


class Backend(str, enum.Enum):
    """Keras's backend; one per process (pipeline/keras_backend.py runs other jobs in a child process)."""

    tensorflow = "tensorflow"
    jax = "jax"
    torch = "torch"  # where PyTorch is installed (an optional extra: README, Backends)


def _require_installed(backends: list[Backend], key: str, value: Any) -> None:
    _require(Backend.torch not in backends or importlib.util.find_spec("torch") is not None, key, value,
             "tensorflow or jax: torch needs PyTorch, which is not installed here (pip install -e '.[torch]'; "
             "README, Backends)")


@dataclass
class BackendConfig:
    name: Backend = Backend.tensorflow

    def __post_init__(self):
        _require_installed([self.name], "backend", self.name.value)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    # A tracking server that stops answering: each request gives up after `timeout_seconds`, and the
    # run fails once the server has been unreachable for `give_up_seconds` in all.
    timeout_seconds: float = 10.0
    give_up_seconds: float = 45.0
    # Per-epoch metrics are sent in batches this often (a checkpoint follows each batch).
    flush_seconds: float = 5.0

    def __post_init__(self):
        if self.uri is not None:
            check_store_uri("tracking.uri", self.uri, unset="null")
        check_name("tracking.experiment", self.experiment)
        _require(math.isfinite(self.timeout_seconds) and self.timeout_seconds > 0, "tracking.timeout_seconds",
                 self.timeout_seconds, "a finite number > 0")
        _require(math.isfinite(self.flush_seconds) and self.flush_seconds >= 0, "tracking.flush_seconds",
                 self.flush_seconds, "a finite number >= 0")
        _require(math.isfinite(self.give_up_seconds) and self.give_up_seconds >= self.timeout_seconds,
                 "tracking.give_up_seconds", self.give_up_seconds, "a finite number >= tracking.timeout_seconds")


@dataclass
class GridConfig:
    """The formulations x seeds that `dvc repro` trains (a Hydra study sweeps hydra.sweeper.params)."""

    formulations: List[FormulationName] = field(default_factory=lambda: list(FormulationName))
    backends: List[Backend] = field(default_factory=lambda: [Backend.tensorflow])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])

    def __post_init__(self):
        _require(len(self.formulations) > 0, "grid.formulations", self.formulations, "at least one formulation")
        _require(len(self.backends) > 0, "grid.backends", self.backends, "at least one backend")
        _require_installed(self.backends, "grid.backends", [b.value for b in self.backends])
        _require(len(self.seeds) > 0, "grid.seeds", self.seeds, "at least one seed")


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    seed: int = 0
    # A study groups the runs of one multirun under an MLflow parent run and a report of that name.
    study: Optional[str] = None
    data_dir: str = "data/tfds"  # TFDS data directory; relative paths are relative to the project root
    reports_dir: str = "reports"  # a study's report goes to <reports_dir>/<study>
    checkpoints_dir: str = "outputs/checkpoints"  # per-configuration state for resuming interrupted runs
    # Where this run's files go (metrics.json); None: Hydra's run directory.
    output_dir: Optional[str] = None
    # Downloads are tried only when the dataset is not prepared yet and its host resolves.
    allow_download: bool = True
    # Continue an interrupted run of the same configuration from its checkpoint, in the same MLflow run.
    resume: bool = True
    # The state of conf/ this config was composed from (conf/config.yaml fills it in); DVC's stages
    # compare it with conf/ as it is, so a stale params.yaml cannot train silently.
    conf_digest: Optional[str] = None

    def __post_init__(self):
        _require(0 <= self.seed < SEED_LIMIT, "seed", self.seed, f"a whole number in [0, {SEED_LIMIT})")
        if self.study is not None:
            check_name("study", self.study)
        # Relative to the project root; an absolute path stays as it is. A prepared data_dir may be read-only.
        for key, writable in (("data_dir", False), ("reports_dir", True), ("checkpoints_dir", True)):
            typed = getattr(self, key)
            setattr(self, key, str(PROJECT_ROOT / typed))
            require_folder(key, typed, Path(getattr(self, key)), writable)
        if self.output_dir is not None:
            require_folder("output_dir", self.output_dir, Path(self.output_dir).absolute(), writable=True)


def conf_digest() -> str:
    """sha256 (16 hex digits) of every file under conf/: lets a reader of params.yaml tell whether
    conf/ changed since it was composed."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((PROJECT_ROOT / "conf").rglob("*.yaml")):
        digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def register_configs() -> None:
    """Makes `schema` available to `conf/config.yaml`, which types every group against it, and the
    `conf_digest` resolver that stamps a composed config with the state of conf/."""
    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("fromlogits_conf_digest"):
        OmegaConf.register_new_resolver("fromlogits_conf_digest", conf_digest)


def validate(cfg: DictConfig) -> Config:
    """The composed config as typed objects (Hydra's own `hydra` node aside); raises ConfigError for
    out-of-range values, and OmegaConf's errors for keys the schema lacks (Hydra lets `+key=...` add one)."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    # As plain data: merged as a typed node, a key Hydra added would be carried over unchecked.
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(body)))
