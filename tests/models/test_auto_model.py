"""``--model auto``: the preset and input size chosen from measurable facts of the data (image
size, greyscale, count), said in one line, and recorded resolved in ``config.yaml``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnkit
import cnnkit.data.facts as facts_mod
from cnnkit.cli import app
from cnnkit.config import Overrides, RunConfig
from cnnkit.data.facts import DataFacts, measure_data
from cnnkit.errors import ConfigError, DataError
from cnnkit.models.registry import choose_model
from cnnkit.training.plan import settings, settle

pytestmark = pytest.mark.usefixtures("single_thread")


def _folder(
    root: Path, side: int, mode: str, per_class: int = 6, height: int | None = None
) -> Path:
    """Two classes of random images ``side`` x ``height`` (default square) in ``mode``."""
    rng = np.random.default_rng(0)
    shape = (height or side, side) + (() if mode == "L" else (3,))
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i}.png")
    return root


def _facts(side: int | None, greyscale: bool, train_images: int) -> DataFacts:
    return DataFacts("d", train_images, train_images, 10, side, greyscale, 256)


# ----------------------------------------------------------------------------- the facts


def test_facts_are_measured_from_the_files(tmp_path: Path) -> None:
    grey = measure_data(_folder(tmp_path / "grey", 28, "L", per_class=10))
    assert (grey.images, grey.train_images, grey.classes) == (20, 16, 2)  # 20% validation
    assert (grey.side, grey.greyscale, grey.sampled) == (28, True, 20)
    wide = measure_data(_folder(tmp_path / "wide", 90, "RGB", height=40), val_split=0.5)
    assert (wide.side, wide.greyscale, wide.train_images) == (40, False, 6)  # shorter side
    (tmp_path / "wide" / "a" / "broken.png").write_bytes(b"not a png")
    assert measure_data(tmp_path / "wide").sampled == 12  # unreadable files are left out
    with pytest.raises(DataError, match="data folder not found"):
        measure_data(tmp_path / "none")


def test_a_given_split_counts_its_training_part(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train", 28, "L", per_class=5)
    _folder(tmp_path / "d" / "test", 28, "L", per_class=2)
    facts = measure_data(tmp_path / "d")
    assert (facts.images, facts.train_images) == (10, 10)


# ----------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("facts", "model", "size"),
    [
        (_facts(28, True, 60_000), "mnist", 28),  # MNIST: native size, mnist's one epoch
        (_facts(28, True, 2_000), "fast", 28),  # small digits, too few for that recipe
        (_facts(32, False, 50_000), "cifar", 32),  # CIFAR-10
        (_facts(32, False, 10_000), "fast", 32),  # 70 of cifar's 300 steps
        (_facts(20, True, 60_000), "mnist", 20),  # never upscaled...
        (_facts(8, True, 600), "fast", 16),  # ...except to what three poolings need
        (_facts(48, False, 600), "fast", 48),
        (_facts(500, False, 100_000), "fast", 64),  # photos: the general preset's size
        (_facts(None, False, 10), "fast", 64),  # nothing readable: training will say so
    ],
)
def test_the_choice_follows_the_facts(facts: DataFacts, model: str, size: int) -> None:
    choice = choose_model(facts)
    assert (choice.model, choice.image_size) == (model, size)
    assert choice.describe().startswith(f"model auto: {model} at {size}x{size} px (")


def test_given_size_and_channels_change_the_regime() -> None:
    digits = _facts(28, True, 60_000)
    assert choose_model(digits, image_size=64).model == "fast"  # what the network will see
    assert (choose_model(digits, channels=3).model, choose_model(digits).model) == (
        "cifar",
        "mnist",
    )
    assert choose_model(_facts(200, False, 60_000), image_size=32).model == "cifar"


def test_the_choice_ignores_the_folder_s_name(tmp_path: Path) -> None:
    """A folder called mnist holding large colour photos is not digits."""
    facts = measure_data(_folder(tmp_path / "mnist", 100, "RGB"))
    assert choose_model(facts).model == "fast"


# ------------------------------------------------------------------ resolving a run config


def test_auto_is_the_default_and_resolves_with_the_preset_s_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = _folder(tmp_path / "digits", 28, "L")
    many = DataFacts(str(data), 60_000, 60_000, 10, 28, True, 256)
    monkeypatch.setattr(facts_mod, "measure_data", lambda *_a, **_k: many)
    assert RunConfig().model == "auto"
    with caplog.at_level(logging.INFO, logger="cnnkit"):
        cfg = settings(None, Overrides.of(path=data))
    assert (cfg.model, cfg.data.image_size) == ("mnist", 28)
    assert (cfg.train.epochs, cfg.train.batch_size) == (1, 128)  # mnist's recommended
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model auto")]
    assert lines == [
        "model auto: mnist at 28x28 px (60,000 training images, typically 28x28 px, "
        "greyscale: small greyscale images, enough for mnist's recipe (468 steps))"
    ]
    flags = settings({"model": "auto"}, Overrides.of(path=data, image_size=20))
    assert (flags.model, flags.data.image_size) == ("mnist", 20)


def test_auto_needs_a_data_folder() -> None:
    with pytest.raises(ConfigError, match=r"model auto chooses from the data: data\.path"):
        settings(None, Overrides())
    assert settle(RunConfig(model="seed")).config.model == "seed"  # named: as is


def test_cli_and_api_without_a_model_record_the_resolved_one(tmp_path: Path) -> None:
    data = _folder(tmp_path / "grey", 20, "L", per_class=8)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "model auto: fast at 20x20 px (" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"], saved["data"]["image_size"]) == ("fast", 20)
    # channels auto stays auto in the settings; the model records what the decode found
    assert saved["data"]["channels"] is None
    assert json.loads((out / "model.json").read_text())["preprocessing"]["channels"] == 1
    api = cnnkit.train(data, tmp_path / "api", epochs=1)
    cfg = RunConfig.from_dict(yaml.safe_load((tmp_path / "api" / "config.yaml").read_text()))
    assert (cfg.model, cfg.data.image_size, api.epochs_run) == ("fast", 20, 1)
