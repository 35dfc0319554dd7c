"""Training: a short run learns the shapes; what a run directory holds; when training stops."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

import cnnkit.data.dataset as dataset_mod
import cnnkit.training.loop as loop_mod
from cnnkit.config import DataConfig, RunConfig, TrainConfig, load_yaml
from cnnkit.errors import ConfigError, DataError, RunDirError
from cnnkit.evaluation import evaluate
from cnnkit.model_io import load_model
from cnnkit.training.loop import TrainResult, train
from conftest import quick_config, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
SUMMARY_KEYS = {
    "best_val_acc",
    "final_val_acc",
    "best_epoch",
    "epochs_run",
    "wall_seconds",
    "images_per_second",
    "seconds_to_target",
    "stopped_because",
    "precision",
    "device",
}


def _metrics(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ------------------------------------------------------------------- the trained run


def test_a_short_run_learns_the_shapes(fast_trained_run: tuple[Path, TrainResult]) -> None:
    run, result = fast_trained_run
    assert result.best_val_acc >= 0.85
    assert result.epochs_run == 12 and result.stopped_because == "epochs"
    assert 1 <= result.best_epoch <= 12
    assert result.final_val_acc == result.history[-1]["val_acc"]
    assert result.best_val_acc == max(row["val_acc"] for row in result.history)
    assert result.images_per_second > 0 and result.wall_seconds > 0
    assert result.run_dir == run
    # It learned: the training loss fell well below chance (ln 3 for three classes).
    assert result.history[-1]["train_loss"] < 0.5 * math.log(3) < result.history[0]["train_loss"]


def test_metrics_csv(fast_trained_run: tuple[Path, TrainResult]) -> None:
    run, result = fast_trained_run
    columns, rows = _metrics(run)
    assert columns == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, result.epochs_run + 1))
    for row, hist in zip(rows, result.history, strict=True):
        for name in METRIC_COLUMNS[1:]:
            value = float(row[name])
            assert math.isfinite(value)
            assert value == pytest.approx(hist[name], abs=1e-6)
        assert 0 <= float(row["train_acc"]) <= 1 and 0 <= float(row["val_acc"]) <= 1
        assert float(row["lr"]) > 0


def test_summary_json(fast_trained_run: tuple[Path, TrainResult]) -> None:
    run, result = fast_trained_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary == json.loads(json.dumps(result.summary()))
    assert summary["best_val_acc"] == result.best_val_acc
    assert summary["stopped_because"] == "epochs" and summary["seconds_to_target"] is None
    assert summary["precision"] in ("fp32", "bf16") and summary["device"] == "cpu"


def test_config_yaml_round_trips(
    fast_trained_run: tuple[Path, TrainResult], shapes_dir: Path
) -> None:
    run, _ = fast_trained_run
    expected = quick_config(shapes_dir)
    # as settled before training: auto channels stay auto (model.json has those used)
    assert RunConfig.from_dict(load_yaml(run / "config.yaml")) == expected


def test_model_json_describes_the_preprocessing(fast_trained_run: tuple[Path, TrainResult]) -> None:
    run, _ = fast_trained_run
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    pre = meta["preprocessing"]
    assert (pre["size"], pre["channels"], pre["resize"]) == (32, 3, "crop")
    assert meta["model_name"] == "fast"
    assert len(pre["mean"]) == len(pre["std"]) == 3
    assert not {"image_size", "input_size", "channels", "mean", "std"} & set(meta)  # once


def test_the_best_epoch_is_what_was_saved(
    fast_trained_run: tuple[Path, TrainResult], shapes_dir: Path
) -> None:
    run, result = fast_trained_run
    scored = evaluate(run, shapes_dir, split="val", plot=False)
    assert scored.count == 120
    assert scored.accuracy == pytest.approx(result.best_val_acc, abs=1.5 / scored.count)


# --------------------------------------------------------------------- stopping early


def _scripted_validation(monkeypatch: pytest.MonkeyPatch, scores: list[tuple[float, float]]):
    """Replace validation by a fixed list of (loss, accuracy), one per epoch (no logits)."""
    remaining = list(scores)
    monkeypatch.setattr(loop_mod, "validate", lambda *args, **kwargs: (*remaining.pop(0), None))


def test_patience_stops_after_epochs_without_improvement(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_validation(
        monkeypatch, [(1.0, 0.5), (0.8, 0.6), (0.9, 0.6), (0.7, 0.55), (0.1, 0.99), (0.1, 0.99)]
    )
    result = train(tiny_config(tiny_shapes, epochs=6, patience=2), tmp_path / "run", progress=False)
    # epoch 3 ties on accuracy with a higher loss, epoch 4 is worse: two without improvement
    assert result.stopped_because == "patience"
    assert (result.epochs_run, result.best_epoch, result.best_val_acc) == (4, 2, 0.6)
    assert [int(r["epoch"]) for r in _metrics(tmp_path / "run")[1]] == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_because"] == "patience" and summary["best_epoch"] == 2


def test_a_lower_loss_at_equal_accuracy_counts_as_improvement(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_validation(monkeypatch, [(1.0, 0.5), (0.9, 0.5), (0.8, 0.5), (0.85, 0.5)])
    result = train(tiny_config(tiny_shapes, epochs=4, patience=1), tmp_path / "run", progress=False)
    assert (result.epochs_run, result.best_epoch, result.stopped_because) == (4, 3, "patience")


def test_at_100_percent_a_lower_loss_is_no_reason_to_go_on(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is left to improve: the run stops ``patience`` epochs after reaching 100%,
    keeping the weights of the lowest loss."""
    _scripted_validation(monkeypatch, [(0.5, 0.9), (0.3, 1.0), (0.2, 1.0), (0.1, 1.0), (0.1, 1)])
    result = train(tiny_config(tiny_shapes, epochs=5, patience=2), tmp_path / "run", progress=False)
    assert (result.epochs_run, result.best_epoch, result.stopped_because) == (4, 4, "patience")


def test_the_default_patience_stops_a_stalled_run_and_0_turns_it_off(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert TrainConfig().patience == 5
    _scripted_validation(monkeypatch, [(1.0, 0.5)] * 8)
    result = train(tiny_config(tiny_shapes, epochs=8), tmp_path / "a", progress=False)
    assert (result.epochs_run, result.stopped_because) == (6, "patience")
    _scripted_validation(monkeypatch, [(1.0, 0.5)] * 8)
    result = train(tiny_config(tiny_shapes, epochs=8, patience=0), tmp_path / "b", progress=False)
    assert (result.epochs_run, result.stopped_because) == (8, "epochs")


def test_the_cli_says_why_the_run_stopped(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cnnkit.cli import app

    _scripted_validation(monkeypatch, [(0.5, 0.9), (0.3, 1.0), (0.2, 1.0), (0.1, 1.0)])
    args = ["train", str(tiny_shapes), "--out", str(tmp_path / "r"), "--epochs", "4"]
    result = CliRunner().invoke(app, [*args, "--patience", "2", "--image-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (
        "stopped early: validation accuracy was 100% and stayed there for 2 more epochs "
        "(patience 2; --patience 0 runs every epoch)"
    ) in result.output


def test_target_accuracy_stops_the_run(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_validation(monkeypatch, [(1.0, 0.5), (0.5, 0.8), (0.3, 0.9), (0.2, 0.95)])
    result = train(
        tiny_config(tiny_shapes, epochs=4, target_accuracy=0.9), tmp_path / "run", progress=False
    )
    assert (result.epochs_run, result.stopped_because) == (3, "target_accuracy")
    assert result.seconds_to_target is not None and result.seconds_to_target > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_because"] == "target_accuracy"
    assert summary["seconds_to_target"] == pytest.approx(result.seconds_to_target, abs=1e-3)


def test_target_accuracy_on_a_real_run(tiny_shapes: Path, tmp_path: Path) -> None:
    result = train(
        tiny_config(tiny_shapes, epochs=3, target_accuracy=0.0), tmp_path / "run", progress=False
    )
    assert (result.epochs_run, result.stopped_because) == (1, "target_accuracy")
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---------------------------------------------------------------- data and settings


def test_memory_mapped_training_equals_in_ram_training(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_shapes, precision="fp32")
    in_ram = train(cfg, tmp_path / "ram", progress=False)
    monkeypatch.setattr(dataset_mod, "_ram_bytes", lambda: 1024)  # data "larger than RAM"
    mapped = train(cfg, tmp_path / "mapped", progress=False)
    for a, b in zip(in_ram.history, mapped.history, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_greyscale_data_trains_a_one_channel_model(tiny_shapes: Path, tmp_path: Path) -> None:
    from PIL import Image

    grey = tmp_path / "grey"
    for path in tiny_shapes.rglob("*.png"):
        target = grey / path.relative_to(tiny_shapes)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(target)
    train(tiny_config(grey), tmp_path / "run", progress=False)
    model, meta = load_model(tmp_path / "run")
    assert meta.preprocessing.channels == 1 and model.in_shape == (1, 16, 16)


def test_train_val_folders_are_used_as_given(tiny_shapes: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "split"
    shutil.copytree(tiny_shapes, data / "train")
    # three images per class (the generated folder also holds its .cnnkit-manifest)
    shutil.copytree(
        tiny_shapes,
        data / "val",
        ignore=lambda d, names: sorted(n for n in names if n.endswith(".png"))[3:],
    )
    result = train(tiny_config(data), tmp_path / "run", progress=False)
    assert result.epochs_run == 2
    assert evaluate(tmp_path / "run", data, split="val", plot=False).count == 9


def test_an_occupied_run_directory_is_refused(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError) as info:
        train(tiny_config(tiny_shapes), out, progress=False)
    assert str(info.value) == (
        f"out {out} already holds files; choose a new folder, pass overwrite=True, or "
        "resume=True to continue it"
    )
    with pytest.raises(RunDirError) as info:  # --overwrite deletes only what cnnkit wrote
        train(tiny_config(tiny_shapes), out, overwrite=True, progress=False)
    assert str(info.value) == (
        f"out {out} holds files cnnkit did not write: notes.txt (no .cnnkit-manifest: "
        "cnnkit wrote nothing there); move them away or choose another out"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_settings_fail_before_anything_is_written(tiny_shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown model 'nope': not a preset"):
        train(RunConfig(model="nope", data=DataConfig(path=str(tiny_shapes))), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected a positive integer, got 0$"):
        tiny_config(tiny_shapes, epochs=0)
    with pytest.raises(DataError, match=f"^data folder not found: {tmp_path / 'none'}$"):
        train(tiny_config(tmp_path / "none"), tmp_path / "b", progress=False)


def test_same_seed_same_run(tiny_shapes: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_shapes, epochs=1, batch_size=2, precision="fp32")
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


# ---------------------------------------- short runs, no validation, resolved config


def test_a_run_of_four_steps_or_fewer_trains(tiny_shapes: Path, tmp_path: Path) -> None:
    # 18 training images, batch 8: two steps an epoch, two epochs: four steps in all.
    result = train(tiny_config(tiny_shapes, batch_size=8), tmp_path / "run", progress=False)
    assert result.epochs_run == 2


def test_training_without_a_validation_split_still_saves_a_model(
    tiny_shapes: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_shapes)
    cfg = RunConfig(
        model=cfg.model,
        data=DataConfig(path=str(tiny_shapes), image_size=16, val_split=0.0),
        augment=cfg.augment,
        train=cfg.train,
    )
    train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_config_yaml_holds_the_resolved_input_size(tiny_shapes: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        model="fast",
        data=DataConfig(path=str(tiny_shapes)),  # the preset's own input size: 64
        train=tiny_config(tiny_shapes, epochs=1, batch_size=2).train,
    )
    train(cfg, tmp_path / "run", progress=False)
    written = load_yaml(tmp_path / "run" / "config.yaml")["data"]
    assert written["image_size"] == 64
    assert written["channels"] is None  # auto: model.json records the channels used
    assert load_model(tmp_path / "run")[1].preprocessing.channels == 3
    assert np.isfinite(load_model(tmp_path / "run")[1].preprocessing.mean).all()


def test_a_data_error_leaves_no_empty_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DataError, match="data folder not found"):
        train(tiny_config(tmp_path / "missing"), out, progress=False)
    assert not out.exists()


def test_deterministic_mode_does_not_outlive_the_run(tiny_shapes: Path, tmp_path: Path) -> None:
    import torch

    cfg = tiny_config(tiny_shapes, epochs=1, deterministic=True)
    train(cfg, tmp_path / "run", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_muon_trains_the_filters_and_adamw_the_rest(shapes_dir: Path, tmp_path: Path) -> None:
    cfg = quick_config(
        shapes_dir, optimizer="muon", muon_lr=0.05, momentum=0.6, schedule="linear", epochs=8
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.best_val_acc >= 0.85
    assert load_yaml(tmp_path / "run" / "config.yaml")["train"]["optimizer"] == "muon"


def test_the_muon_group_holds_the_trainable_filters_only() -> None:
    from cnnkit.models.registry import build_network, load_model_spec
    from cnnkit.training.phases import Phases, make_optimizer

    def _optimizer(model, cfg):
        return make_optimizer(model, cfg, Phases.plan(cfg, model))

    model = build_network(load_model_spec("cifar").layers, 10, 3, 32)
    opt = _optimizer(model, dataclasses.replace(RunConfig().train, optimizer="muon"))
    (muon,) = [g for g in opt.param_groups if g["muon"]]
    convs = [m.weight for m in model.modules() if type(m).__name__ == "Conv2d"]
    assert len(muon["params"]) == len(convs) == 6  # the frozen whitening filters are not in it
    assert muon["lr"] == RunConfig().train.muon_lr
    others = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert len(others) + len(muon["params"]) == len(list(model.parameters()))
    plain = _optimizer(model, RunConfig().train)
    assert not any(g["muon"] for g in plain.param_groups)
