"""bf16 autocast (the default on CPUs with native bf16) must not change what a model predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.config import DataConfig
from cnnkit.data.dataset import load_split
from cnnkit.inference import load
from cnnkit.runtime import cpu_has_bf16, resolve_precision
from cnnkit.training.loop import TrainResult


def test_bf16_and_fp32_predictions_agree(
    trained_run: tuple[Path, TrainResult], shapes_dir: Path
) -> None:
    run, _ = trained_run
    fp32, bf16 = load(run, precision="fp32"), load(run, precision="bf16")
    meta = fp32.meta
    images = load_split(
        shapes_dir,
        "all",
        meta.classes,
        DataConfig(),
        meta.preprocessing.size,
        meta.preprocessing.channels,
    )
    p32 = torch.softmax(fp32.logits(images.images), 1).numpy()
    p16 = torch.softmax(bf16.logits(images.images), 1).numpy()
    assert p32.shape == p16.shape == (len(images), len(meta.classes))
    agreement = float((p32.argmax(1) == p16.argmax(1)).mean())
    assert agreement >= 0.99, agreement
    assert np.abs(p32 - p16).max() < 0.1
    acc32 = float((p32.argmax(1) == images.labels).mean())
    acc16 = float((p16.argmax(1) == images.labels).mean())
    assert abs(acc32 - acc16) <= 0.01


def test_auto_precision_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"


def test_unknown_precision_is_a_config_error() -> None:
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="precision: expected auto, fp32 or bf16, got 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))
