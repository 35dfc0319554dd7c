"""Fine-tuning in phases (``training.phases``): the head alone on a frozen backbone from
cached features, then the whole network with a lower learning rate for the backbone.

The pretrained network is ``fast_trained_run`` (the ``fast`` preset trained on 600 shapes);
the new task has other class names (so a new classification layer) and 20 images a class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.config import AugmentConfig, DataConfig, Overrides, RunConfig, TrainConfig
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import ConfigError, TrainingInterrupted
from cnnkit.evaluation import evaluate
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.training import checkpoints as ckpt
from cnnkit.training import optim
from cnnkit.training.loop import train
from cnnkit.training.phases import Phases, make_optimizer, make_schedule
from cnnkit.training.plan import settings
from interrupt import interrupt_at

HEAD = "dense1"  # fast's classification layer


def _renamed(folder: Path, seed: int, count: int) -> Path:
    """Shapes whose classes have other names than the pretrained run's: a new head."""
    raw = generate_shapes(folder.with_name(folder.name + "-raw"), count=count, size=32, seed=seed)
    for old, new in (("circle", "round"), ("square", "box"), ("triangle", "pointy")):
        shutil.copytree(raw / old, folder / new)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images a class (48 training, 12 validation)."""
    return _renamed(tmp_path_factory.mktemp("small") / "data", seed=31, count=20)


def _config(data: Path, **train: object) -> RunConfig:
    options = {"epochs": 12, "batch_size": 8, "lr": 3e-3, "seed": 31, **train}
    return RunConfig(
        model="fast",
        data=DataConfig(path=str(data), image_size=32),
        augment=AugmentConfig(vflip=True),
        train=TrainConfig(**options),  # type: ignore[arg-type]
    )


def _finetune(source: Path, data: Path, **train: object) -> RunConfig:
    options = {"weights": str(source), "freeze_epochs": 10, "backbone_lr_factor": 0.1, **train}
    return _config(data, **options)


def test_a_fine_tune_beats_training_from_scratch(
    fast_trained_run, small: Path, tmp_path: Path, single_thread: None, caplog
) -> None:
    source = fast_trained_run[0]
    held_out = _renamed(tmp_path / "held-out", seed=32, count=30)  # never trained on
    scratch = train(_config(small), tmp_path / "scratch", progress=False)
    with caplog.at_level("INFO", logger="cnnkit"):
        tuned = train(_finetune(source, small), tmp_path / "tuned", progress=False)
    assert "epochs 1-10 of 12: the head (dense1) alone on the frozen backbone (up to gmp1)" in (
        caplog.text
    )
    assert "epochs 11-12 of 12: the whole network, the backbone at 0.1x the learning rate" in (
        caplog.text
    )
    assert "epoch 10/12 (head)" in caplog.text and "epoch 11/12  train_loss" in caplog.text
    assert "each image or its flips (plain, hflip, vflip, hvflip)" in caplog.text
    ours = evaluate(tmp_path / "tuned", held_out, plot=False).accuracy
    theirs = evaluate(tmp_path / "scratch", held_out, plot=False).accuracy
    # measured: 0.84 against 0.33 (seeds 11 and 21 of the data: 0.66/0.43, 0.72/0.42)
    assert ours >= theirs + 0.15, (ours, theirs)
    assert (tuned.epochs_run, scratch.epochs_run) == (12, tuned.epochs_run) or ours > theirs


def test_head_epochs_leave_the_backbone_and_its_statistics_as_they_were(
    fast_trained_run, small: Path, tmp_path: Path, single_thread: None
) -> None:
    source = fast_trained_run[0]
    cache = tmp_path / "cache"
    config = _finetune(source, small, epochs=3, freeze_epochs=3)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir=cache))
    train(config, tmp_path / "run", progress=False)
    start, end = (
        load_file(str(source / "model.safetensors")),
        load_file(str(tmp_path / "run" / "model.safetensors")),
    )
    backbone = [k for k in start if not k.startswith(f"layers.{HEAD}.")]
    assert all(torch.equal(start[k], end[k]) for k in backbone)  # weights and running stats
    assert end[f"layers.{HEAD}.weight"].shape == (3, start[f"layers.{HEAD}.weight"].shape[1])
    assert len(list((cache / "features").glob("*.npz"))) == 4  # the image and its 3 flips
    # Another run on the same images reads them all from the cache.
    again = train(config, tmp_path / "again", progress=False)
    assert again.epochs_run == 3


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_weights_statistics_in_the_full_epochs(
    fast_trained_run, small: Path, tmp_path: Path, single_thread: None, freeze_bn: bool
) -> None:
    source = fast_trained_run[0]
    config = _finetune(source, small, epochs=2, freeze_epochs=1, freeze_bn=freeze_bn)
    train(config, tmp_path / "run", progress=False)
    start = load_file(str(source / "model.safetensors"))
    (newest, *_) = ckpt.list_checkpoints(tmp_path / "run")  # the last epoch's weights
    end = load_file(str(newest / "model.safetensors"))
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(start[k], end[k]) for k in stats) == freeze_bn
    assert not torch.equal(start["layers.conv1.weight"], end["layers.conv1.weight"])


def test_discriminative_learning_rates_and_a_schedule_per_phase() -> None:
    cfg = TrainConfig(epochs=5, freeze_epochs=2, backbone_lr_factor=0.1, lr=0.01, weights="x")
    model = build_network(load_model_spec("fast").layers, 3, 3, 32)
    phases = Phases.plan(cfg, model)
    opt = make_optimizer(model, cfg, phases)
    head = {id(p) for p in model.layers[HEAD].parameters()}
    for group in opt.param_groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1  # a group is all head or all backbone
        assert group["lr"] == pytest.approx(0.01 if is_head.pop() else 0.001)
    sched = make_schedule(opt, cfg, steps=10, phases=phases)
    factors = []
    for _ in range(50):
        factors.append(opt.param_groups[0]["lr"] / 0.01)
        sched.step()
    one_cycle = optim.one_cycle(20)
    assert factors[:20] == pytest.approx([one_cycle(s) for s in range(20)])
    assert factors[20:] == pytest.approx([optim.one_cycle(30)(s) for s in range(30)])
    assert factors[20] == pytest.approx(factors[0])  # the full phase warms up anew


def test_freeze_epochs_without_weights_freeze_nothing(small: Path, tmp_path, caplog) -> None:
    model = build_network(load_model_spec("fast").layers, 3, 3, 32)
    with caplog.at_level("INFO", logger="cnnkit"):
        phases = Phases.plan(TrainConfig(epochs=3, freeze_epochs=2), model)
    assert phases.head_epochs == 0
    assert "train.freeze_epochs=2 ignored: no weights to freeze" in caplog.text
    assert Phases.plan(TrainConfig(epochs=3, freeze_epochs=9, weights="w"), model).head_epochs == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("freeze_epochs", -1, "train.freeze_epochs: expected 0 or more epochs, got -1"),
        ("freeze_epochs", 1.5, "train.freeze_epochs: expected 0 or more epochs, got 1.5"),
        ("backbone_lr_factor", 0, "train.backbone_lr_factor: expected a number from 1e-06 to 10"),
        ("freeze_bn", "yes", "train.freeze_bn: expected true or false, got 'yes'"),
    ],
)
def test_fine_tune_settings_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_pretrained_presets_recommend_fine_tuning_only_from_weights(tmp_path, caplog) -> None:
    data = {"path": tmp_path, "model": "efficientnet_lite0"}
    with caplog.at_level("INFO", logger="cnnkit"):
        tuned = settings(None, Overrides.of(**data, weights="imagenet"))
    spec = load_model_spec("efficientnet_lite0")
    assert tuned.train.freeze_epochs == spec.finetune["train"]["freeze_epochs"] > 0
    assert tuned.train.backbone_lr_factor < 1 and tuned.augment.shear == 0
    assert "efficientnet_lite0's recommended settings for fine-tuning: train.epochs=" in caplog.text
    scratch = settings(None, Overrides.of(**data))
    assert scratch.train.freeze_epochs == 0 and scratch.train.backbone_lr_factor == 1.0
    flagged = settings(None, Overrides.of(**data, weights="imagenet", freeze_epochs=1))
    assert flagged.train.freeze_epochs == 1
    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_lite0"):
        assert load_model_spec(name).finetune["train"]["freeze_epochs"] > 0, name


# ----------------------------------------------------------------------- resume, processes


def test_a_run_interrupted_in_each_phase_resumes_bit_identical(
    fast_trained_run, small: Path, tmp_path: Path, single_thread: None
) -> None:
    source = fast_trained_run[0]
    config = _finetune(
        source, small, epochs=4, freeze_epochs=2, deterministic=True, precision="fp32",
        checkpoint_every=2,
    )  # fmt: skip
    train(config, tmp_path / "whole", progress=False)
    run = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:  # 6 steps an epoch: one cut in each phase
        interrupt_at(patch, {9})
        with pytest.raises(TrainingInterrupted):
            train(config, run, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, {6})  # the resumed session's 6th step: epoch 3, step 3
        with pytest.raises(TrainingInterrupted):
            train(None, run, resume=True, progress=False)
    train(None, run, resume=True, progress=False)
    for name in ("model.safetensors", "metrics.csv"):
        if name.endswith(".csv"):
            cut = (run / name).read_text().splitlines()
            whole = (tmp_path / "whole" / name).read_text().splitlines()
            assert [r.rsplit(",", 1)[0] for r in cut] == [r.rsplit(",", 1)[0] for r in whole]
        else:
            assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_two_processes_fine_tune_in_phases(fast_trained_run, small: Path, tmp_path: Path) -> None:
    source = fast_trained_run[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNKIT_CACHE_DIR": str(tmp_path / "cache"),
           "CNNKIT_DIST_TIMEOUT": "60", "MPLBACKEND": "Agg"}  # fmt: skip
    cmd = [
        sys.executable, "-m", "cnnkit", "train", str(small), "--out", str(tmp_path / "run"),
        "--nproc", "2", "--model", "fast", "--image-size", "32", "--weights", str(source),
        "--epochs", "3", "--freeze-epochs", "2", "--batch-size", "8", "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_run"]) == (2, 3)
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 4
    # Rank 0 filled the cache (the image, its mirror image) and rank 1 found it: computed
    # from the weights rank 0 loaded, not from rank 1's random ones (another key)
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 2


def test_a_run_from_before_the_fine_tune_settings_still_resumes(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    from cnnkit.training import loop
    from cnnkit.training.outputs import fingerprint

    def as_before(*args: object) -> dict:
        old = fingerprint(*args)  # type: ignore[arg-type]
        for name in ("freeze_epochs", "backbone_lr_factor", "freeze_bn"):
            del old["settings"][f"train.{name}"]
        return old

    config = _config(tiny_shapes, epochs=1, batch_size=4)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=16))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "fingerprint", as_before)
        train(config, tmp_path / "run", progress=False)
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=2))
    result = train(longer, tmp_path / "run", resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
