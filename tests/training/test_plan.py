"""Settings reach training typed and settled in one place (``cnnkit.training.plan``)."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit import config as config_mod
from cnnkit.cli import app
from cnnkit.config import DataConfig, Overrides, RunConfig, TrainConfig
from cnnkit.models import registry
from cnnkit.training import plan as plan_mod
from cnnkit.training.outputs import describe_changes
from cnnkit.training.plan import RunPlan, plan_run, settle


def test_settling_names_the_input_size_and_an_absolute_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = settle(RunConfig(model="fast", data=DataConfig(path="shapes")))
    assert plan.spec is registry.load_model_spec("fast")  # parsed once, then shared
    assert plan.config.data.image_size == plan.spec.input_size == 64
    assert plan.config.data.path == os.path.join(tmp_path, "shapes")
    assert plan.pretrained is None
    assert settle(plan.config).config == plan.config  # settled: nothing left to settle


def test_a_given_input_size_and_channels_are_kept() -> None:
    cfg = RunConfig(model="seed", data=DataConfig(path="/x", image_size=40, channels=1))
    settled = settle(cfg).config
    assert (settled.data.image_size, settled.data.channels) == (40, 1)


def _captured(monkeypatch: pytest.MonkeyPatch) -> list[Overrides]:
    """Stop ``cnnkit train`` and ``cnnkit.train`` at planning and keep what they planned."""
    seen: list[Overrides] = []

    def plan_run(overrides: Overrides, **_: Any) -> RunPlan:
        seen.append(overrides)
        raise cnnkit.ConfigError("stop here")

    monkeypatch.setattr(plan_mod, "plan_run", plan_run)
    return seen


def test_the_cli_and_the_api_hand_over_the_same_typed_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _captured(monkeypatch)
    flags = ["--epochs", "2", "--lr", "0.01", "--channels", "1", "--no-augment", "--seed", "3"]
    flags += ["--model", "seed", "--strict", "--freeze-bn", "--weights", "imagenet"]
    cli = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), *flags])
    assert cli.exit_code == 1 and "stop here" in cli.stderr
    with pytest.raises(cnnkit.ConfigError, match="stop here"):
        cnnkit.train(
            tmp_path, tmp_path / "r", model="seed", epochs=2, lr=0.01, channels="1",
            augment=False, seed=3, strict=True, freeze_bn=True, weights="imagenet",
        )  # fmt: skip
    from_cli, from_api = seen
    assert from_cli == from_api
    assert from_cli.train == {
        "epochs": 2, "lr": 0.01, "seed": 3, "freeze_bn": True, "weights": "imagenet"
    }  # fmt: skip
    assert from_cli.data == {"path": tmp_path, "channels": "1", "seed": 3, "strict": True}
    assert type(from_cli.train["epochs"]) is int and type(from_cli.train["lr"]) is float
    applied = from_cli.apply(RunConfig())
    assert applied.data.channels == 1 and applied.augment.enabled is False


def test_a_run_parses_each_preset_once(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry._preset.cache_clear()
    parsed: collections.Counter[str] = collections.Counter()
    real = config_mod.parse_yaml

    def counting(data: bytes | str, origin: str) -> Any:
        parsed[origin] += 1
        return real(data, origin)

    monkeypatch.setattr(registry, "parse_yaml", counting)
    cnnkit.train(tiny_shapes, tmp_path / "run", epochs=1, batch_size=4)  # model auto
    assert parsed and max(parsed.values()) == 1, parsed


def test_resuming_a_run_that_recorded_channels_as_text_is_no_change() -> None:
    """Runs started before channels were numbers recorded ``"3"`` in their fingerprint."""
    old = {"settings": {"data.channels": "3"}}
    assert describe_changes(old, {"settings": {"data.channels": 3}}) == []
    changed = describe_changes(old, {"settings": {"data.channels": 1}})
    assert changed == ["data.channels changed from '3' to '1'"]


def test_a_resumed_plan_is_the_run_s_config_with_the_overrides(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    RunConfig(model="seed", data=DataConfig(path=str(tmp_path)), train=TrainConfig()).save(
        run / "config.yaml"
    )
    plan = plan_run(Overrides.of(epochs=9), resume=run)
    assert (plan.config.model, plan.config.train.epochs) == ("seed", 9)
    assert plan.config.data.image_size == plan.spec.input_size
