"""Typed schemas for the Hydra configuration in `conf/`.

OmegaConf checks types when a config is composed or overridden (`train.epochs=ten` fails there); the
`__post_init__` checks below run when `validate` turns the composed config into these dataclasses, so
an out-of-range value fails before any data is touched or any MLflow run is opened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.formulations import FormulationName, Task

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing data): reported in one line, without a traceback."""


class ConfigError(PipelineError, ValueError):
    """A configuration value outside what the pipeline accepts."""


def _require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is not accepted: expected {accepted}")


# "1/255" maps pixels to [0, 1]; "none" keeps raw 0..255, the setting where probabilities saturate early.
PIXEL_SCALES = {"1/255": 1.0 / 255.0, "none": 1.0}


class Precision(str, enum.Enum):
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


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
        _require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a number > 0")
        _require(self.diagnostics_examples > 0, "train.diagnostics_examples", self.diagnostics_examples, "a whole number > 0")


@dataclass
class PrecisionConfig:
    policy: Precision = Precision.float32
    output_float32: bool = False  # keep the output layer in float32 under a mixed policy


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns/mlflow.db
    experiment: str = "fromlogits"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    # A study groups the runs of one multirun under an MLflow parent run and a report of that name.
    study: Optional[str] = None
    data_dir: str = str(PROJECT_ROOT / "data" / "tfds")
    # Where this run's files go (metrics.json, the resolved config); Hydra sets it to its run dir.
    output_dir: str = "."
    # Downloads are tried only when the dataset is not prepared yet and its host resolves.
    allow_download: bool = True


def register_configs() -> None:
    """Makes `schema` available to `conf/config.yaml`, which types every group against it."""
    ConfigStore.instance().store(name="schema", node=Config)


def validate(cfg: DictConfig) -> Config:
    """The composed config as typed objects; raises ConfigError for out-of-range values."""
    return OmegaConf.to_object(cfg)
