"""Every command in-process: its help, its output, and one ``error:`` line for every mistake."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import typer.main
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnkit.demo as demo_mod
from cnnkit.cli import app
from cnnkit.config import AugmentConfig, RunConfig, TrainConfig, load_yaml
from cnnkit.data.shapes import generate_shapes
from cnnkit.models import list_presets
from cnnkit.training.loop import TrainResult
from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()
PRESETS = ", ".join(list_presets())
TINY_TRAIN = ["--image-size", "16", "--epochs", "2", "--batch-size", "4", "--quiet"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error(result, starts: str) -> str:
    """Exit status 1, nothing but one ``error: ...`` line on stderr, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {starts}"), lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def _command_paths() -> list[list[str]]:
    def walk(cmd, path: list[str]):  # typer vendors click: look for sub-commands by duck type
        yield path
        if isinstance(getattr(cmd, "commands", None), dict):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = _command_paths()


def test_the_documented_commands_exist() -> None:
    names = {" ".join(p) for p in COMMANDS}
    expected = {"train", "evaluate", "predict", "demo", "data shapes", "data check"}
    assert expected | {"model summary", "model list"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "cnnkit" for p in COMMANDS])
def test_help_of_every_command(path: list[str]) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and "--help" in result.stdout
    assert result.stderr == ""


# ----------------------------------------------------------------------------- data


def test_data_shapes(tmp_path: Path) -> None:
    result = invoke("data", "shapes", tmp_path / "s", "--count", 2, "--size", 16, "--seed", 4)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"wrote 6 images (circle, square, triangle) to {tmp_path / 's'}"
    )
    reference = generate_shapes(tmp_path / "ref", count=2, size=16, seed=4)
    for path in reference.rglob("*.png"):
        assert (tmp_path / "s" / path.relative_to(reference)).read_bytes() == path.read_bytes()


def test_data_shapes_material_style(tmp_path: Path) -> None:
    result = invoke(
        "data", "shapes", tmp_path / "m", "--count", 2, "--size", 32, "--style", "material"
    )
    assert result.exit_code == 0, result.output
    reference = generate_shapes(tmp_path / "ref", count=2, size=32, style="material")
    for path in reference.rglob("*.png"):
        assert (tmp_path / "m" / path.relative_to(reference)).read_bytes() == path.read_bytes()
    assert_one_error(
        invoke("data", "shapes", tmp_path / "x", "--style", "photo"),
        "style: expected one of cnnkit, material, got 'photo'",
    )


def test_data_shapes_bad_arguments(tmp_path: Path) -> None:
    assert_one_error(
        invoke("data", "shapes", tmp_path, "--count", 0), "count: expected a positive integer"
    )
    assert_one_error(invoke("data", "shapes", tmp_path, "--size", 4), "size: expected 8 to 1024")


@pytest.fixture
def messy_set(tmp_path: Path) -> Path:
    """A data set with a duplicate across classes, an unreadable file and imbalance."""
    root = generate_shapes(tmp_path / "messy", count=6, size=16, seed=0)
    for i in range(4):
        (root / "square" / f"square_{i:05d}.png").unlink()
    shutil.copy(root / "circle" / "circle_00000.png", root / "triangle" / "copy.png")
    (root / "circle" / "broken.png").write_bytes(b"")
    return root


def test_data_check_text(messy_set: Path) -> None:
    result = invoke("data", "check", messy_set)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name, count in (("circle", 6), ("square", 2), ("triangle", 7)):
        assert any(
            name in line and line.rstrip(" │").endswith(str(count)) for line in out.splitlines()
        )
    assert "sizes (min/median/max): width 16/16/16, height 16/16/16" in out
    assert "modes: RGB 15" in out
    assert f"bad file: {messy_set / 'circle' / 'broken.png'}: empty file (0 bytes)" in out
    copy, original = messy_set / "triangle" / "copy.png", messy_set / "circle" / "circle_00000.png"
    assert f"identical: {original}, {copy}" in out
    assert "warning: class imbalance: 'triangle' has 7 images, 'square' only 2 (3.5x)" in out
    assert "warning: 1 group(s) of identical files, 1 of them across classes" in out
    assert "warning: 1 unreadable file(s) will be skipped" in out
    assert "no problems found" not in out


def test_data_check_json(messy_set: Path) -> None:
    result = invoke("data", "check", messy_set, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {"all": {"circle": 6, "square": 2, "triangle": 7}}
    assert report["bad"] == [
        {
            "path": str(messy_set / "circle" / "broken.png"),
            "reason": f"{messy_set / 'circle' / 'broken.png'}: empty file (0 bytes)",
        }
    ]
    assert len(report["duplicates"]) == 1 and len(report["warnings"]) == 3


def test_data_check_clean(tiny_shapes: Path) -> None:
    result = invoke("data", "check", tiny_shapes)
    assert result.exit_code == 0
    assert "no problems found" in result.stdout and "warning" not in result.stdout


# ---------------------------------------------------------------------------- model


def test_model_summary_table() -> None:
    result = invoke("model", "summary", "seed")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "seed: input (3, 128, 128)" in out
    assert "conv1" in out and "(12, 128, 128)" in out and "dense1" in out
    assert "77,991" in out and "27,045,888" in out


def test_model_summary_json_and_options() -> None:
    result = invoke(
        "model", "summary", "seed", "--json", "--image-size", 64, "--classes", 5, "--channels", 1
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["input_shape"] == [1, 64, 64]
    assert info["layers"][-1]["output_shape"] == [5]
    assert info["total_params"] == sum(r["params"] for r in info["layers"])


def test_model_list() -> None:
    result = invoke("model", "list")
    assert result.exit_code == 0
    rows = result.stdout.strip().splitlines()
    lines = {line.split()[0]: line for line in rows if not line.startswith(" ")}
    assert list(lines) == list_presets()
    assert "input 64x64" in lines["fast"] and "input 128x128" in lines["seed"]
    after_mnist = rows[rows.index(lines["mnist"]) + 1]
    assert after_mnist.split() == [
        "recommended:",
        "train.epochs=1,",
        "train.batch_size=128,",
        "train.lr=0.01,",
        "train.label_smoothing=0.1,",
        "augment.enabled=False",
    ]


def test_model_errors(tmp_path: Path) -> None:
    assert_one_error(invoke("model", "summary", "nope"), "unknown model 'nope': not a preset")
    assert_one_error(invoke("model", "summary", "fast", "--channels", 2), "--channels: expected")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"layers": [{"conv": {"filters": 0}}]}))
    assert_one_error(
        invoke("model", "summary", bad),
        f"{bad}: layer 1 (conv): filters: expected a positive integer, got 0",
    )


# ------------------------------------------------------------------------- training


def test_train_writes_a_run_directory(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", tiny_shapes, "--out", out, *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("best validation accuracy ")
    assert f"run directory {out}" in result.stdout
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "model.json", "summary.json"):
        assert (out / name).is_file(), name
    cfg = RunConfig.from_dict(load_yaml(out / "config.yaml"))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.image_size) == (2, 4, 16)
    assert "Traceback" not in result.output


def test_train_config_file_and_flags(tiny_shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    tiny = tiny_config(tiny_shapes, epochs=3, lr=0.01)
    RunConfig(
        model=tiny.model,
        data=tiny.data,
        augment=AugmentConfig(enabled=False),
        train=TrainConfig(epochs=3, batch_size=4, lr=0.01),
    ).save(config)
    out = tmp_path / "run"
    result = invoke(
        "train", tiny_shapes, "--out", out, "--config", config, "--epochs", 2, "--quiet"
    )
    assert result.exit_code == 0, result.output
    cfg = RunConfig.from_dict(load_yaml(out / "config.yaml"))
    assert cfg.train.epochs == 2  # the flag wins over the file
    assert cfg.train.lr == 0.01 and cfg.augment.enabled is False  # the file wins over defaults


def test_train_optimizer_flags(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--optimizer", "muon", "--muon-lr", 0.1, "--momentum", 0.5, "--schedule", "linear"]
    result = invoke("train", tiny_shapes, "--out", out, *TINY_TRAIN, *flags)
    assert result.exit_code == 0, result.output
    cfg = RunConfig.from_dict(load_yaml(out / "config.yaml")).train
    assert (cfg.optimizer, cfg.muon_lr, cfg.momentum, cfg.schedule) == ("muon", 0.1, 0.5, "linear")


def test_train_shows_progress_without_quiet(tiny_shapes: Path, tmp_path: Path) -> None:
    args = [a for a in TINY_TRAIN if a != "--quiet"]
    result = invoke("train", tiny_shapes, "--out", tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.stderr  # one log line per epoch, on stderr
    assert result.stdout.startswith("best validation accuracy ")  # the result, on stdout
    assert "run directory" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "train.epochs: expected a positive integer, got 0"),
        (["--lr", "-1"], "train.lr: expected a positive number, got -1.0"),
        (["--channels", "2"], "data.channels: expected one of auto, 1, 3, got '2'"),
        (["--resize", "zoom"], "data.resize: expected one of crop, squash, pad, got 'zoom'"),
        (["--val-split", "0.95"], "data.val_split: expected a number from 0 to 0.9, got 0.95"),
        (["--optimizer", "lion"], "train.optimizer: expected one of adam, adamw, sgd"),
        (["--model", "nope"], f"unknown model 'nope': not a preset ({PRESETS}) nor a YAML file"),
    ],
)
def test_train_bad_settings(tiny_shapes: Path, tmp_path: Path, args: list[str], message: str):
    assert_one_error(invoke("train", tiny_shapes, "--out", tmp_path / "run", *args), message)


def test_train_bad_config_file(tiny_shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: -3\n")
    assert_one_error(
        invoke("train", tiny_shapes, "--out", tmp_path / "r", "--config", config),
        "train.epochs: expected a positive integer, got -3",
    )
    config.write_text("train:\n  epoch: 3\n")
    assert_one_error(
        invoke("train", tiny_shapes, "--out", tmp_path / "r", "--config", config),
        "config.train: unknown field 'epoch'",
    )
    assert_one_error(
        invoke("train", tiny_shapes, "--out", tmp_path / "r", "--config", tmp_path / "no.yaml"),
        f"config file not found: {tmp_path / 'no.yaml'}",
    )


def test_train_data_errors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert_one_error(
        invoke("train", tmp_path / "missing", "--out", out, "--quiet"),
        f"data folder not found: {tmp_path / 'missing'}",
    )
    (tmp_path / "empty").mkdir()
    assert_one_error(
        invoke("train", tmp_path / "empty", "--out", out, "--quiet"),
        f"{tmp_path / 'empty'}: need at least two classes (one sub-folder of images each), "
        "found none",
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "loose.png")
    (tmp_path / "empty" / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "only" / "a.png")
    assert_one_error(
        invoke("train", tmp_path / "empty", "--out", out, "--quiet"),
        f"{tmp_path / 'empty'}: need at least two classes (one sub-folder of images each), "
        "found only 'only'",
    )


def test_train_refuses_an_occupied_folder(tiny_shapes: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x.txt").write_text("keep me")
    assert_one_error(
        invoke("train", tiny_shapes, "--out", tmp_path / "run", *TINY_TRAIN),
        f"--out {tmp_path / 'run'} already holds files",
    )


def test_train_strict_with_a_bad_file(tiny_shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    (data / "circle" / "zero.png").write_bytes(b"")
    result = invoke("train", data, "--out", tmp_path / "run", *TINY_TRAIN, "--strict")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [  # each bad file is named, then the error
        f"warning: skipped {data / 'circle' / 'zero.png'}: empty file (0 bytes)",
        "warning: 24 images used, 1 skipped",
        f"error: 1 unreadable image(s) with --strict, first: {data / 'circle' / 'zero.png'}: "
        "empty file (0 bytes)",
    ]
    result = invoke("train", data, "--out", tmp_path / "run2", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[:2] == [
        f"warning: skipped {data / 'circle' / 'zero.png'}: empty file (0 bytes)",
        "warning: 24 images used, 1 skipped",
    ]


# ---------------------------------------------------------------- evaluate, predict


@pytest.fixture
def run_copy(fast_trained_run: tuple[Path, TrainResult], tmp_path: Path) -> Path:
    """The trained run, copied (evaluate writes its figures into the run directory)."""
    copy = tmp_path / "run"
    shutil.copytree(fast_trained_run[0], copy)
    return copy


def test_evaluate_text(run_copy: Path, shapes_dir: Path) -> None:
    result = invoke("evaluate", run_copy, shapes_dir, "--split", "val")
    assert result.exit_code == 0, result.output
    out = result.stdout
    scored, first = out.splitlines()[:2]
    assert scored == f"validation part of {shapes_dir}: 120 images"
    assert first.startswith("accuracy ") and first.split()[2:5] == ["on", "120", "images"]
    assert float(first.split()[1].rstrip("%")) >= 85
    assert "per class" in out and "confusion matrix (rows: true, columns: predicted)" in out
    saved = run_copy / "evaluations" / f"{shapes_dir.name}-val"
    assert f"results: {saved}/ (evaluation.json, confusion_matrix.png)" in out
    assert (saved / "confusion_matrix.png").is_file()


def test_evaluate_json(run_copy: Path, shapes_dir: Path) -> None:
    result = invoke("evaluate", run_copy, shapes_dir, "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["count"] == 120 and data["accuracy"] >= 0.85
    assert data["classes"] == ["circle", "square", "triangle"]
    assert sum(map(sum, data["confusion_matrix"])) == 120
    assert data["data"] == str(shapes_dir) and data["split"] == "val"
    saved = run_copy / "evaluations" / f"{shapes_dir.name}-val" / "evaluation.json"
    assert data == json.loads(saved.read_text())


def test_evaluate_errors(run_copy: Path, shapes_dir: Path, tmp_path: Path) -> None:
    assert_one_error(
        invoke("evaluate", tmp_path / "nothing", shapes_dir),
        f"not a run directory: {tmp_path / 'nothing'} does not exist",
    )
    (tmp_path / "plain").mkdir()
    assert_one_error(
        invoke("evaluate", tmp_path / "plain", shapes_dir),
        f"not a run directory: {tmp_path / 'plain'} has no model.json",
    )
    assert_one_error(
        invoke("evaluate", run_copy, tmp_path / "nodata"),
        f"data folder not found: {tmp_path / 'nodata'}",
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = generate_shapes(tmp_path_factory.mktemp("predict"), count=2, size=32, seed=42)
    return sorted(root.rglob("*.png"))


def test_predict_text(fast_trained_run: tuple[Path, TrainResult], images: list[Path]) -> None:
    run = fast_trained_run[0]
    result = invoke("predict", run, images[0], images[3])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (images[0], images[3]), strict=True):
        assert line.startswith(f"{path}: ")
        inside = line.split("(", 1)[1].rstrip(")")
        assert len(inside.split(", ")) == 3  # --top-k 3 by default
    one = invoke("predict", run, images[0], "--top-k", 1)
    assert one.stdout.count("%") == 1


def test_predict_json_lines(fast_trained_run: tuple[Path, TrainResult], images: list[Path]):
    result = invoke("predict", fast_trained_run[0], *images, "--json", "--top-k", 2)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["source"] for r in rows] == [str(p) for p in images]
    for row in rows:
        assert len(row["probabilities"]) == 2
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == max(row["probabilities"].values())


def test_predict_csv_of_a_folder(fast_trained_run: tuple[Path, TrainResult], images: list[Path]):
    folder = images[0].parent.parent
    result = invoke("predict", fast_trained_run[0], folder, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "label", "confidence", "p_circle", "p_square", "p_triangle"]
    assert [r[0] for r in rows[1:]] == [str(p) for p in images]
    for row in rows[1:]:
        probs = [float(v) for v in row[3:]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert float(row[2]) == max(probs)
    right = sum(Path(r[0]).parent.name == r[1] for r in rows[1:])
    assert right >= 5  # of 6 new shapes


def test_predict_an_unreadable_image(
    fast_trained_run: tuple[Path, TrainResult], images: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = invoke("predict", fast_trained_run[0], images[0], bad, images[1])
    assert_one_error(result, f"{bad}: not an image in a supported format")
    assert len(result.stdout.strip().splitlines()) == 2  # the good ones are still answered
    missing = invoke("predict", fast_trained_run[0], tmp_path / "gone.png")
    assert_one_error(missing, f"{tmp_path / 'gone.png'}: file not found")


def test_predict_errors(fast_trained_run: tuple[Path, TrainResult], images: list[Path], tmp_path):
    assert_one_error(
        invoke("predict", tmp_path, images[0]), f"not a run directory: {tmp_path} has no"
    )
    assert_one_error(
        invoke("predict", fast_trained_run[0], images[0], "--top-k", 0),
        "--top-k: expected a positive integer, got 0",
    )
    (tmp_path / "none").mkdir()
    assert_one_error(
        invoke("predict", fast_trained_run[0], tmp_path / "none"),
        f"{tmp_path / 'none'}: no images found",
    )


# ----------------------------------------------------------------------------- demo


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_mod, "DEMO_COUNT", 6)
    monkeypatch.setattr(demo_mod, "DEMO_SIZE", 16)
    monkeypatch.setattr(
        demo_mod,
        "DEMO_CONFIG",
        RunConfig(model="fast", train=TrainConfig(epochs=2, batch_size=4)),
    )
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("accuracy ")
    assert "a new " in text and ": predicted " in text
    assert "after 2 epochs" in text
    assert f"outputs: {out}/" in text
    for name in ("model.safetensors", "metrics.csv", "confusion_matrix.png", "new_shape.png"):
        assert (out / name).is_file(), name
    again = invoke("demo", "--out", out, "--quiet")  # replaces its own previous run
    assert again.exit_code == 0, again.output
