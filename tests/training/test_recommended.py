"""A model's recommended training settings: under the config file and the flags, over defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.config import AugmentConfig, Overrides, RunConfig, TrainConfig
from cnnkit.errors import ConfigError
from cnnkit.models.registry import list_presets, load_model_spec
from cnnkit.training.plan import settings


def test_a_preset_s_recommendations_replace_the_defaults() -> None:
    cfg = settings(None, Overrides.of(model="mnist", path="digits"))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (1, 128, 0.01)
    assert cfg.train.label_smoothing == 0.1 and not cfg.augment.enabled
    assert cfg.train.optimizer == TrainConfig().optimizer  # not recommended: the default
    cifar = settings(None, Overrides.of(model="cifar"))
    assert cifar.train.tta and cifar.train.optimizer == "muon" and cifar.train.ema is None
    assert cifar.train.schedule == "linear" and cifar.augment.translate == 0.0625
    assert cifar.augment.rotate == 0 and cifar.augment.hflip


def test_flags_and_the_config_file_win_over_recommendations() -> None:
    raw = {"train": {"epochs": 3}, "augment": {"enabled": True}}
    cfg = settings(raw, Overrides.of(model="mnist", lr=0.5, batch_size=None))
    assert cfg.train.epochs == 3 and cfg.augment.enabled  # the config file
    assert cfg.train.lr == 0.5  # the flag
    assert cfg.train.batch_size == 128 and cfg.train.label_smoothing == 0.1  # recommended
    from_file = settings({"model": "mnist"}, Overrides())
    assert from_file.model == "mnist" and from_file.train.epochs == 1


def test_presets_without_recommendations_keep_cnnkit_s_defaults() -> None:
    for name in ("fast", "seed"):
        cfg = settings(None, Overrides.of(model=name))
        assert cfg.train == TrainConfig() and cfg.augment == AugmentConfig()
    assert settings(None, Overrides.of(model="fast")) == RunConfig(model="fast")


def test_every_preset_s_recommendations_are_valid() -> None:
    for name in list_presets():
        spec = load_model_spec(name)
        RunConfig.from_dict(dict(spec.recommended))


def test_the_applied_recommendations_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cnnkit"):
        settings({"train": {"epochs": 2}}, Overrides.of(model="mnist", lr=0.1))
    (line,) = [r.getMessage() for r in caplog.records if "recommended" in r.getMessage()]
    assert line == (
        "mnist's recommended settings: train.batch_size=128, train.label_smoothing=0.1, "
        "augment.enabled=False"
    )


def _model_file(tmp_path: Path, recommended: object) -> Path:
    path = tmp_path / "net.yaml"
    layers = [{"conv": {"filters": 4}}, "relu", "gap"]
    path.write_text(yaml.safe_dump({"name": "mine", "layers": layers, "recommended": recommended}))
    return path


def test_a_model_file_may_recommend_settings(tmp_path: Path) -> None:
    path = _model_file(tmp_path, {"train": {"epochs": 4, "lr": 0.02}})
    cfg = settings(None, Overrides.of(model=str(path)))
    assert (cfg.train.epochs, cfg.train.lr) == (4, 0.02)


@pytest.mark.parametrize(
    ("recommended", "message"),
    [
        ({"data": {"seed": 1}}, "recommended: unknown section 'data', expected augment or train"),
        ({"train": {"epoch": 4}}, "recommended: config.train: unknown field 'epoch'"),
        ({"train": {"epochs": 0}}, "recommended: train.epochs"),
        ([1, 2], "recommended: expected a mapping of sections"),
    ],
)
def test_bad_recommendations_are_one_line_errors(
    tmp_path: Path, recommended: object, message: str
) -> None:
    path = _model_file(tmp_path, recommended)
    with pytest.raises(ConfigError, match=message):
        load_model_spec(str(path))


def test_cli_and_api_apply_them(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cnnkit train --model M` and `cnnkit.train(model=M)` take M's recommendations."""
    path = _model_file(
        tmp_path, {"train": {"epochs": 1, "batch_size": 8}, "augment": {"enabled": False}}
    )
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app, ["train", str(tiny_shapes), "--out", str(out), "--model", str(path), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    saved = RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert (saved.train.epochs, saved.train.batch_size, saved.augment.enabled) == (1, 8, False)
    api = cnnkit.train(tiny_shapes, tmp_path / "api", model=str(path), image_size=16)
    assert api.epochs_run == 1
    again = cnnkit.train(tiny_shapes, tmp_path / "api2", model=str(path), image_size=16, epochs=2)
    assert again.epochs_run == 2
