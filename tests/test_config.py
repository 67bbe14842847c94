"""Composition of every option of every config group, and the checks on bad values."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ValidationError

from conftest import CONF_DIR, compose_config
from pipeline.config import ConfigError, validate
from pipeline.formulations import FormulationName, Task

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_validates(group, option):
    cfg = validate(compose_config(f"{group}={option}"))
    if group in ("experiment", "task"):
        return  # presets set several groups; test_study_presets_set_what_their_names_say checks them
    chosen = OmegaConf.to_container(OmegaConf.structured(getattr(cfg, group)), enum_to_str=True)
    written = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    written.pop("defaults", None)
    assert {k: chosen[k] for k in written} == written  # the typed config holds what the option file says


def test_groups_offer_what_the_readme_promises():
    assert options("loss") == ["logits", "probs", "probs_naive"]
    assert {"mnist_sample", "mnist_sample_binary", "mnist", "mnist_binary", "fashion_mnist"} <= set(options("dataset"))
    assert options("model") == ["seed_relu", "seed_sigmoid"]
    assert options("precision") == ["float32", "mixed_bfloat16", "mixed_float16"]
    assert options("experiment") == ["atlas", "backends", "high_lr", "mixed_float16", "raw_pixels", "seed_logistic",
                                     "seed_mnist"]
    assert options("backend") == ["jax", "tensorflow", "torch"]
    assert options("task") == ["logistic", "multiclass"]


def test_study_presets_set_what_their_names_say():
    raw = validate(compose_config("experiment=raw_pixels"))
    assert raw.dataset.pixel_scale == "none" and raw.study == "raw_pixels"
    assert validate(compose_config("experiment=high_lr")).train.learning_rate == 0.05
    assert validate(compose_config("experiment=mixed_float16")).precision.policy.value == "mixed_float16"
    for seeds_ten in ("raw_pixels", "high_lr", "mixed_float16"):  # stress presets: seed-dependent effects
        assert "range(10)" in open(CONF_DIR / "experiment" / f"{seeds_ten}.yaml").read(), seeds_ten
    atlas = validate(compose_config("experiment=atlas", "task=logistic"))
    assert atlas.study == "atlas" and atlas.dataset.task is Task.binary and atlas.model.activation == "sigmoid"
    logistic = validate(compose_config("experiment=seed_logistic"))
    assert logistic.dataset.task is Task.binary and logistic.model.activation == "sigmoid"


def test_defaults_are_the_course_notes_settings():
    cfg = validate(compose_config())
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (100, 32, 1e-3)
    assert cfg.model.hidden_units == [25, 15] and cfg.model.activation == "relu"
    assert cfg.dataset.name == "mnist_sample" and cfg.dataset.pixel_scale == "1/255"


def test_binary_dataset_is_two_classes_relabelled():
    cfg = validate(compose_config("dataset=mnist_sample_binary", "model=seed_sigmoid", "loss=probs"))
    assert cfg.dataset.task is Task.binary and cfg.dataset.classes == [0, 1]
    assert cfg.loss.formulation is FormulationName.probs and cfg.model.activation == "sigmoid"


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.epochs=0", "train.epochs=0"),
        ("train.batch_size=-4", "train.batch_size=-4"),
        ("train.learning_rate=-0.001", "train.learning_rate=-0.001"),
        ("dataset.validation_fraction=1.0", "dataset.validation_fraction=1.0"),
        ("dataset.pixel_scale=half", "dataset.pixel_scale='half'"),
        ("model.activation=swishy", "model.activation='swishy'"),
        ("dataset=mnist_sample_binary dataset.classes=[0,1,2]", "dataset.classes=[0, 1, 2]"),
    ],
)
def test_out_of_range_values_fail_validation_naming_the_value(override, fragment):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*override.split()))
    assert fragment in str(error.value) and "expected" in str(error.value)


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train.epochs=ten")
    assert "ten" in str(error.value.__cause__ or error.value)


def test_unknown_group_option_fails_listing_the_options():
    with pytest.raises(HydraException) as error:
        compose_config("loss=prob")
    message = str(error.value)
    assert "loss/prob" in message and "probs_naive" in message


def test_unknown_key_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("train.epoch=3")


def test_first_line_quotes_one_line_and_marks_where_it_cut():
    """A quoted error cut at its limit ended mid-word, its parentheses open, as if the tool had said that much."""
    from pipeline.config import first_line

    assert first_line(ValueError("short\nsecond line")) == "short"
    assert first_line(ValueError()) == "ValueError"
    cut = first_line("x" * 301)
    assert cut == "x" * 299 + "…" and len(cut) == 300
    assert first_line("y" * 300) == "y" * 300
