"""The Python API mirrors the CLI: ``cnnkit.train``, ``load(...).predict``, ``evaluate``,
``generate_shapes``, and one exception hierarchy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.shapes import generate_shapes as generate_directly
from cnnkit.evaluation import EvalResult
from cnnkit.inference import Classifier, Prediction
from cnnkit.training.loop import TrainResult
from numerics import PROB_ATOL

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def api_run(
    tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TrainResult]]:
    """A run trained through ``cnnkit.train`` (one thread, see ``single_thread``)."""
    out = tmp_path_factory.mktemp("api") / "run"
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        torch.set_num_threads(1)
        patch.setenv("OMP_NUM_THREADS", "1")
        result = cnnkit.train(
            tiny_shapes, out, image_size=16, epochs=2, batch_size=4, seed=3, augment=False
        )
    torch.set_num_threads(before)
    yield out, result


def test_train_returns_a_result_and_writes_a_run(api_run: tuple[Path, TrainResult]) -> None:
    out, result = api_run
    assert isinstance(result, TrainResult) and result.run_dir == out
    assert result.epochs_run == 2 and 0 <= result.best_val_acc <= 1
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "model.json", "summary.json"):
        assert (out / name).is_file(), name
    cfg = RunConfig.from_dict(load_yaml(out / "config.yaml"))
    assert cfg.model == "fast" and cfg.data.image_size == 16
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, 4)
    assert cfg.data.seed == cfg.train.seed == 3
    assert cfg.augment.enabled is False


def test_train_options_and_errors(tiny_shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(
        cnnkit.ConfigError, match=r"^unknown setting 'epoch' \(did you mean 'epochs'\?\)$"
    ):
        cnnkit.train(tiny_shapes, tmp_path / "a", epoch=2)
    with pytest.raises(cnnkit.ConfigError, match=r"^train\.epochs: expected a positive integer"):
        cnnkit.train(tiny_shapes, tmp_path / "b", epochs=0)
    with pytest.raises(cnnkit.ConfigError, match=r"^data\.resize: expected one of crop"):
        cnnkit.train(tiny_shapes, tmp_path / "c", resize="stretch")
    with pytest.raises(cnnkit.DataError, match="data folder not found"):
        cnnkit.train(tmp_path / "missing", tmp_path / "d", epochs=1)
    with pytest.raises(cnnkit.ConfigError, match="unknown model 'tiny'"):
        cnnkit.train(tiny_shapes, tmp_path / "e", model="tiny")


def test_train_from_a_config_file(tiny_shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "data: {image_size: 16, resize: pad}\ntrain: {epochs: 5, batch_size: 4, lr: 0.005}\n"
    )
    cnnkit.train(tiny_shapes, tmp_path / "run", config=config, epochs=2)
    cfg = RunConfig.from_dict(load_yaml(tmp_path / "run" / "config.yaml"))
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.005 and cfg.data.resize == "pad"
    assert cnnkit.load(tmp_path / "run").meta.preprocessing.resize == "pad"


def test_load_and_predict(api_run: tuple[Path, TrainResult], tiny_shapes: Path) -> None:
    out, _ = api_run
    model = cnnkit.load(out)
    assert isinstance(model, Classifier)
    assert model.classes == ("circle", "square", "triangle")
    path = tiny_shapes / "square" / "square_00000.png"
    predictions = model.predict([path, str(path), path.read_bytes(), Image.open(path)])
    assert all(isinstance(p, Prediction) for p in predictions)
    # Four rows of one batch: equal to the precision's rounding, not bit for bit (a row's
    # kernel code may differ; tests/numerics.py). The default precision may be bf16.
    atol = PROB_ATOL[model.precision]
    for p in predictions[1:]:
        assert p.probabilities == pytest.approx(predictions[0].probabilities, abs=atol)
    (one,) = model.predict(np.asarray(Image.open(path)))
    assert one.label in model.classes
    assert sum(one.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(cnnkit.ImageError):
        model.predict([b"not an image"])
    with pytest.raises(cnnkit.RunDirError):
        cnnkit.load(tiny_shapes)


def test_evaluate(api_run: tuple[Path, TrainResult], tiny_shapes: Path) -> None:
    out, result = api_run
    everything = cnnkit.evaluate(out, tiny_shapes, "all")
    assert isinstance(everything, EvalResult) and everything.count == 24
    val = cnnkit.evaluate(out, tiny_shapes)  # the run's own folder: its validation part
    assert val.count == 6 and val.split == "val"  # round(8 * 0.2) = 2 of each class
    assert val.accuracy == pytest.approx(result.best_val_acc, abs=0.2)
    saved = out / "evaluations" / f"{tiny_shapes.name}-val"
    assert (saved / "evaluation.json").is_file() and (saved / "confusion_matrix.png").is_file()
    probs = cnnkit.load(out, precision="fp32").predict_proba(list(val.paths))
    assert (probs.argmax(1) == val.probabilities.argmax(1)).mean() >= 5 / 6


def test_generate_shapes(tmp_path: Path) -> None:
    root = cnnkit.generate_shapes(tmp_path / "a", count=2, size=16, seed=5)
    assert root == tmp_path / "a"
    reference = generate_directly(tmp_path / "b", count=2, size=16, seed=5)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert len(files) == 6
    assert all((root / f).read_bytes() == (reference / f).read_bytes() for f in files)
    with pytest.raises(cnnkit.ConfigError, match="count: expected a positive integer"):
        cnnkit.generate_shapes(tmp_path / "c", count=0)


def test_public_names_and_errors() -> None:
    for name in cnnkit.__all__:
        assert hasattr(cnnkit, name), name
    assert {"train", "load", "evaluate", "generate_shapes"} <= set(cnnkit.__all__)
    assert isinstance(cnnkit.__version__, str) and cnnkit.__version__.count(".") == 2
    assert issubclass(cnnkit.ImageError, cnnkit.DataError)
    for error in (
        cnnkit.ConfigError,
        cnnkit.DataError,
        cnnkit.RunDirError,
        cnnkit.CheckpointError,
        cnnkit.ExportError,
        cnnkit.OutputError,
    ):
        assert issubclass(error, cnnkit.CnnkitError)
    assert issubclass(cnnkit.ConfigError, ValueError)


def test_train_accepts_every_setting_by_name(tiny_shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cnnkit.train(
        tiny_shapes,
        run,
        image_size=16,
        epochs=1,
        batch_size=4,
        ema=0.9,
        tta=True,
        checkpoint_every=2,
        resize="squash",
        vflip=True,
        label_smoothing=0.1,
    )
    saved = RunConfig.from_dict(load_yaml(run / "config.yaml"))
    assert (saved.train.ema, saved.train.tta, saved.train.checkpoint_every) == (0.9, True, 2)
    assert saved.data.resize == "squash" and saved.augment.vflip
    assert any((run / "checkpoints").iterdir())
