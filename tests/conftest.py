"""Shared fixtures: small generated data sets and one trained run, made once per session.

Every test runs with its own decode cache (``CNNKIT_CACHE_DIR``) so nothing touches the
user's cache, and everything runs on the CPU in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.data.shapes import generate_shapes
from cnnkit.model_io import ModelMeta
from cnnkit.models.network import Network
from cnnkit.training.loop import TrainResult, train


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 circles, squares and triangles each, 32x32 PNG (read-only: copy before changing)."""
    return generate_shapes(tmp_path_factory.mktemp("shapes"), count=200, size=32, seed=1)


def quick_config(data: Path, **train: object) -> RunConfig:
    """A config that trains the default model on ``data`` in a few seconds."""
    options = {"epochs": 12, "batch_size": 16, "lr": 3e-3, **train}
    return RunConfig(
        model="fast",
        data=DataConfig(path=str(data), image_size=32),
        augment=AugmentConfig(vflip=True, rotate=15.0),
        train=TrainConfig(**options),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def trained_run(
    shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult]:
    """A run directory trained on ``shapes_dir`` (read-only: copy before changing)."""
    os.environ["CNNKIT_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "cache")
    out = tmp_path_factory.mktemp("run") / "run"
    result = train(quick_config(shapes_dir), out, progress=False)
    return out, result


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 circles, squares and triangles each, 16x16 PNG, for runs that must only work, not
    learn well (read-only: copy before changing)."""
    return generate_shapes(tmp_path_factory.mktemp("tiny"), count=8, size=16, seed=2)


def tiny_config(data: Path, **train: object) -> RunConfig:
    """A config that runs two short epochs on ``tiny_shapes`` (about a second)."""
    options = {"epochs": 2, "batch_size": 4, "lr": 3e-3, **train}
    return RunConfig(
        model="fast",
        data=DataConfig(path=str(data), image_size=16),
        augment=AugmentConfig(vflip=True),
        train=TrainConfig(**options),  # type: ignore[arg-type]
    )


@pytest.fixture
def single_thread(monkeypatch: pytest.MonkeyPatch):
    """Run torch on one intra-op thread for this test. On two cores shared with other work, two
    threads spin-wait for each other and make tiny training runs about five times slower; the
    results are the same."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # training's thread count follows it
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fast_trained_run(request: pytest.FixtureRequest) -> tuple[Path, TrainResult]:
    """``trained_run``, trained on one thread if it does not exist yet (see ``single_thread``:
    about 20 s instead of minutes on busy cores); torch's threads are restored afterwards."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        torch.set_num_threads(1)
        patch.setenv("OMP_NUM_THREADS", "1")
        try:
            return request.getfixturevalue("trained_run")
        finally:
            torch.set_num_threads(before)


def model_meta(
    model: Network,
    classes: tuple[str, ...] = ("a", "b", "c"),
    size: int = 16,
    channels: int = 3,
    resize: str = "pad",
    model_name: str = "fast",
) -> ModelMeta:
    """What ``save_model`` needs for an untrained ``model``: mean 0.5 and std 0.25 per channel."""
    return ModelMeta(
        classes=tuple(classes),
        preprocessing=Preprocessing(
            size=size,
            channels=channels,
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            resize=resize,
        ),
        architecture=tuple(model.architecture()),
        model_name=model_name,
    )


def training_state() -> dict[str, Any]:
    """A checkpoint state as the training loop writes it: cnnkit's optimizer and schedule
    after one step on a small model, a history row, the random states, a fingerprint."""
    import torch

    from cnnkit.training import checkpoints as ckpt
    from cnnkit.training.optim import Optimizer, Schedule, constant
    from cnnkit.training.progress import Best, Position, Progress, progress_to_state

    model = torch.nn.Linear(4, 2)
    opt = Optimizer([{"params": model.parameters(), "weight_decay": 0.1}], "adamw", 0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    row = {"epoch": 1, "train_loss": 0.7, "train_acc": 0.5, "val_loss": 0.6, "val_acc": 0.5}
    progress = Progress(Position(epoch=1, step=3), Best(epoch=1, acc=0.5), history=[row])
    return {
        "progress": progress_to_state(progress),
        "optimizer": opt.state_dict(),
        "scheduler": Schedule(opt, constant).state_dict(),
        "total_steps": 10,
        "rng": ckpt.rng_state(),
        "fingerprint": {"data": "0" * 64, "classes": ["a", "b"], "images": [4, 2]},
    }
