"""One "train, then report" workflow (``cnnkit.workflow``) behind the CLI, the API and the
demo: the report is written from what the run holds in memory, nothing is loaded again."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import cnnkit
import cnnkit.demo as demo_mod
from cnnkit import inference
from cnnkit.cli import app
from cnnkit.config import RunConfig, TrainConfig
from cnnkit.training.plan import settle
from cnnkit.workflow import train_and_report


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every run directory whose model is read from disk."""
    seen: list[Path] = []
    real = inference.load_model

    def counting(run_dir: str | Path) -> object:
        seen.append(Path(run_dir))
        return real(run_dir)

    monkeypatch.setattr(inference, "load_model", counting)
    return seen


def test_the_api_reports_from_the_network_in_memory(
    tiny_shapes: Path, tmp_path: Path, loads: list[Path]
) -> None:
    result = cnnkit.train(tiny_shapes, tmp_path / "run", model="seed", epochs=1, batch_size=4)
    assert (tmp_path / "run" / "report.html").is_file()
    assert loads == []
    assert result.model is not None and not result.model.training


def test_the_cli_reports_from_the_network_in_memory(
    tiny_shapes: Path, tmp_path: Path, loads: list[Path]
) -> None:
    out = tmp_path / "run"
    args = ["train", str(tiny_shapes), "--out", str(out), "--model", "seed", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.stdout
    assert loads == []


def test_the_demo_reads_no_model_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads: list[Path]
) -> None:
    monkeypatch.setattr(demo_mod, "DEMO_COUNT", 6)
    monkeypatch.setattr(demo_mod, "DEMO_SIZE", 16)
    config = RunConfig(model="seed", train=TrainConfig(epochs=1, batch_size=4))
    monkeypatch.setattr(demo_mod, "DEMO_CONFIG", config)
    report = demo_mod.run_demo(tmp_path / "demo", progress=False, data_root=tmp_path / "data")
    assert report.prediction.label in ("circle", "square", "triangle")
    assert (tmp_path / "demo" / "report.html").is_file()
    assert loads == []


def test_when_the_best_epoch_was_not_the_last_its_saved_weights_are_read_once(
    tiny_shapes: Path, tmp_path: Path, loads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnkit.training import loop

    original = loop._save

    def best_was_earlier(*args: object) -> object:
        result = original(*args)
        result.model = result.meta = None  # as when an earlier epoch was the best
        return result

    monkeypatch.setattr(loop, "_save", best_was_earlier)
    cfg = RunConfig.from_dict(
        {"model": "seed", "data": {"path": str(tiny_shapes)}, "train": {"epochs": 1}}
    )
    trained = train_and_report(settle(cfg), tmp_path / "run", progress=False)
    assert loads == [tmp_path / "run"]
    assert trained.reports and trained.classifier is not None and trained.report is not None
