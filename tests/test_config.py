"""Configuration: every bad value fails where it is set, naming the field and the value."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnnkit.config import (
    INPUT_SIDES,
    AugmentConfig,
    DataConfig,
    Overrides,
    RunConfig,
    TrainConfig,
    load_yaml,
)
from cnnkit.errors import ConfigError


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DataConfig(image_size=0), "data.image_size: expected a positive integer, got 0"),
        (lambda: DataConfig(image_size=True), "data.image_size: expected a positive integer"),
        (lambda: DataConfig(image_size=2), "data.image_size: expected 4 to 1024 pixels, got 2"),
        (lambda: DataConfig(image_size=64.0), "data.image_size: expected a positive integer"),
        (lambda: DataConfig(channels="2"), "data.channels: expected one of auto, 1, 3, got '2'"),
        (
            lambda: DataConfig(resize="zoom"),
            "data.resize: expected one of crop, squash, pad, got 'zoom'",
        ),
        (
            lambda: DataConfig(val_split=0.95),
            "data.val_split: expected a number from 0 to 0.9, got 0.95",
        ),
        (lambda: DataConfig(val_split="0.2"), "data.val_split: expected a number, got '0.2'"),
        (lambda: DataConfig(seed="x"), "data.seed: expected an integer, got 'x'"),
        (lambda: DataConfig(strict="no"), "data.strict: expected true or false, got 'no'"),
        (lambda: DataConfig(path=5), "data.path: expected a folder path, got 5"),
        (lambda: DataConfig(cache_dir=["x"]), "data.cache_dir: expected a folder path, got ['x']"),
        (lambda: TrainConfig(epochs=0), "train.epochs: expected a positive integer, got 0"),
        (lambda: TrainConfig(epochs=True), "train.epochs: expected a positive integer, got True"),
        (lambda: TrainConfig(batch_size=-4), "train.batch_size: expected a positive integer"),
        (lambda: TrainConfig(lr=-1), "train.lr: expected a positive number, got -1"),
        (lambda: TrainConfig(lr=0), "train.lr: expected a positive number, got 0"),
        (lambda: TrainConfig(lr=100.0), "train.lr: expected a number from 0 to 10, got 100.0"),
        (lambda: TrainConfig(lr=math.inf), "train.lr: expected a number, got inf"),
        (
            lambda: TrainConfig(optimizer="rmsprop"),
            "train.optimizer: expected one of adam, adamw, sgd, muon, got 'rmsprop'",
        ),
        (
            lambda: TrainConfig(schedule="step"),
            "train.schedule: expected one of onecycle, cosine, linear, constant, got 'step'",
        ),
        (lambda: TrainConfig(muon_lr=0), "train.muon_lr: expected a number from 1e-09 to 10"),
        (lambda: TrainConfig(weight_decay=2.0), "train.weight_decay: expected a number from 0"),
        (lambda: TrainConfig(momentum=1.0), "train.momentum: expected a number from 0 to 0.999"),
        (lambda: TrainConfig(label_smoothing=0.6), "train.label_smoothing: expected a number"),
        (
            lambda: TrainConfig(patience=-1),
            "train.patience: expected 0 (never stop early) or more, got -1",
        ),
        (lambda: TrainConfig(threads=0), "train.threads: expected a positive integer, got 0"),
        (
            lambda: TrainConfig(target_accuracy=1.5),
            "train.target_accuracy: expected a number from 0 to 1, got 1.5",
        ),
        (lambda: TrainConfig(device="tpu"), "train.device: expected one of auto, cpu, cuda"),
        (lambda: TrainConfig(precision="fp16"), "train.precision: expected one of auto, fp32"),
        (lambda: TrainConfig(seed=1.5), "train.seed: expected an integer, got 1.5"),
        (lambda: TrainConfig(tta="yes"), "train.tta: expected true or false, got 'yes'"),
        (lambda: TrainConfig(deterministic=1), "train.deterministic: expected true or false"),
        (lambda: TrainConfig(sync_bn=None), "train.sync_bn: expected true or false, got None"),
        (lambda: TrainConfig(ema=1.0), "train.ema: expected a number from 0 to 0.99999, got 1.0"),
        (lambda: TrainConfig(checkpoint_every=0), "train.checkpoint_every: expected a positive"),
        (
            lambda: AugmentConfig(rotate=200),
            "augment.rotate: expected a number from 0 to 180, got 200",
        ),
        (lambda: AugmentConfig(shear="x"), "augment.shear: expected a number, got 'x'"),
        (lambda: AugmentConfig(scale=-0.1), "augment.scale: expected a number from 0 to 0.9"),
        (lambda: AugmentConfig(translate=0.6), "augment.translate: expected a number from 0"),
        (lambda: AugmentConfig(hflip="false"), "augment.hflip: expected true or false"),
        (lambda: AugmentConfig(enabled=1), "augment.enabled: expected true or false, got 1"),
    ],
)
def test_bad_values_name_field_and_value(make, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value).startswith(message), str(info.value)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        TrainConfig(epochs=-1)


def test_defaults_are_valid_and_documented_values() -> None:
    cfg = RunConfig()
    assert cfg.model == "auto" and cfg.train.patience == 5 and cfg.train.threads is None
    assert cfg.data.resize == "crop" and cfg.data.channels is None  # auto
    assert cfg.data.image_size is None
    assert cfg.train.optimizer == "adamw" and cfg.train.schedule == "onecycle"
    DataConfig(channels=1)  # an integer is accepted as well as "1"
    as_path = DataConfig(path=Path("data/x"), cache_dir=Path("/tmp/c"))
    assert (as_path.path, as_path.cache_dir) == ("data/x", "/tmp/c")  # stored as str


def test_run_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = RunConfig(
        model="seed",
        data=DataConfig(path="data/x", image_size=48, channels="1", resize="pad", seed=3),
        augment=AugmentConfig(vflip=True, rotate=30.0, translate=0.1),
        train=TrainConfig(epochs=3, lr=0.01, optimizer="sgd", patience=2, target_accuracy=0.9),
    )
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.from_dict(load_yaml(tmp_path / "config.yaml")) == cfg


def test_from_dict_fills_missing_sections_with_defaults() -> None:
    cfg = RunConfig.from_dict({"train": {"epochs": 4}})
    assert cfg.train == TrainConfig(epochs=4)
    assert cfg.data == DataConfig() and cfg.augment == AugmentConfig()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "config: expected a mapping of sections, got list"),
        ({"trian": {}}, "config: unknown section 'trian', expected augment, data, model, train"),
        ({"model": 3}, "config.model: expected a preset name or file, got 3"),
        ({"train": 5}, "config.train: expected a mapping, got 5"),
        ({"train": {"epoch": 3}}, "config.train: unknown field 'epoch', expected one of "),
        ({"data": {"val_split": 2}}, "data.val_split: expected a number from 0 to 0.9, got 2"),
    ],
)
def test_from_dict_errors(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(raw)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)


def test_overrides_skip_none_keep_types_and_validate() -> None:
    base = RunConfig(train=TrainConfig(epochs=7, lr=0.01))
    given = Overrides.of(model="seed", epochs=2, lr=None, seed=4, channels="1", augment=False)
    assert given.given() == {
        "train.epochs", "data.seed", "train.seed", "data.channels", "augment.enabled"
    }  # fmt: skip
    merged = given.apply(base)
    assert merged.model == "seed"
    assert merged.train.epochs == 2 and merged.train.lr == 0.01
    assert (merged.data.seed, merged.train.seed, merged.data.channels) == (4, 4, 1)
    assert not merged.augment.enabled
    assert base.train.epochs == 7  # frozen: the original is untouched
    assert Overrides().apply(base) == base
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected a positive integer, got 0"):
        Overrides.of(epochs=0).apply(base)


@pytest.mark.parametrize("key", ["epoch", "enabled", "train.epochs", "data"])
def test_overrides_reject_unknown_settings(key: str) -> None:
    with pytest.raises(ConfigError, match=f"^unknown setting '{re.escape(key)}'"):
        Overrides.of(**{key: 1})


def test_every_setting_has_one_name() -> None:
    """Flags and keyword arguments name settings without their section: two sections may
    share a field name only where ``Overrides.of`` sets both (``seed``)."""
    names = [f.name for cls in (DataConfig, AugmentConfig, TrainConfig) for f in fields(cls)]
    assert {n for n in names if names.count(n) > 1} == {"seed"}


@pytest.mark.parametrize(("given", "expected"), [("auto", None), (None, None), ("3", 3), (1, 1)])
def test_channels_are_a_number_or_auto(given: object, expected: int | None) -> None:
    assert DataConfig(channels=given).channels == expected  # type: ignore[arg-type]
    for wrong in ("2", 2, True, "rgb"):
        with pytest.raises(ConfigError, match=r"^data\.channels: expected one of auto, 1, 3"):
            DataConfig(channels=wrong)  # type: ignore[arg-type]


def test_load_yaml_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^config file not found: {missing}$"):
        load_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(bad)
    assert str(info.value).startswith(f"{bad}: not valid YAML (line ")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    assert load_yaml(good) == {"train": {"epochs": 3}}


def _flat_spec(folder: Path, side: int) -> str:
    path = folder / f"spec{side}.yaml"
    path.write_text(yaml.safe_dump({"input_size": side, "layers": ["flatten"]}))
    return str(path)


def _side_checks() -> dict[str, Any]:
    from cnnkit.data.preprocessing import Preprocessing
    from cnnkit.models import load_model_spec
    from cnnkit.models.summary import summarize

    return {
        "setting": lambda folder, side: DataConfig(image_size=side),
        "model file": lambda folder, side: load_model_spec(_flat_spec(folder, side)),
        "summary": lambda folder, side: summarize(_flat_spec(folder, 8), image_size=side),
        "preprocessing": lambda folder, side: Preprocessing(side, 1, (0.5,), (0.25,)),
    }


@pytest.mark.parametrize("check", ["setting", "model file", "summary", "preprocessing"])
def test_every_check_of_an_input_side_uses_the_same_bounds(tmp_path: Path, check: str) -> None:
    """A setting, a model file's input_size, a summary and a model's Preprocessing accept the
    same sides: the bound is one fact (``config.INPUT_SIDES``), not four copies."""
    run = _side_checks()[check]
    low, high = INPUT_SIDES
    for side in (low, high):
        run(tmp_path, side)  # accepted
    for side in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"expected {low} to {high} pixels, got {side}"):
            run(tmp_path, side)
