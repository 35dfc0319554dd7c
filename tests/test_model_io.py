"""The one saver and the one loader: identical outputs after a round trip, precise errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cnnkit.errors import CheckpointError, RunDirError
from cnnkit.files import atomic_write
from cnnkit.model_io import ModelMeta, load_model, save_model
from cnnkit.models import build_network, load_model_spec
from cnnkit.training.loop import TrainResult
from conftest import model_meta


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    with torch.no_grad():  # make the batchnorm buffers differ from their defaults
        model.train()
        model(torch.randn(8, 3, 16, 16))
    model.eval()
    save_model(tmp_path / "run", model, model_meta(model))
    return tmp_path / "run", model


def test_save_then_load_gives_identical_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    run, original = saved
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = load_model(run)
    again, _ = load_model(run)
    assert not loaded.training
    assert weights_equal(loaded, original) and weights_equal(loaded, again)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        a, b, c = original(x), loaded(x), again(x)
    assert a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(b, c)  # bit for bit
    assert meta == model_meta(original)
    assert loaded.infos == original.infos


def test_trained_run_loads_identically_twice(
    fast_trained_run: tuple[Path, TrainResult],
) -> None:
    run, _ = fast_trained_run
    (m1, meta1), (m2, meta2) = load_model(run), load_model(run)
    assert meta1 == meta2 and meta1.classes == ("circle", "square", "triangle")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
    state = load_file(str(run / "model.safetensors"))
    assert state.keys() == m1.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in m1.state_dict().items())


def test_meta_json_round_trip_and_preprocessing_block(saved) -> None:
    run, model = saved
    data = json.loads((run / "model.json").read_text())
    assert data["preprocessing"] == {
        "size": 16,
        "channels": 3,
        "resize": "pad",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    assert not {"image_size", "input_size", "channels", "resize", "mean", "std"} & set(data)
    assert ModelMeta.from_json((run / "model.json").read_text()) == model_meta(model)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two modules hold identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_equal_notices_a_change(saved) -> None:
    run, model = saved
    loaded, _ = load_model(run)
    with torch.no_grad():
        loaded.layers["dense1"].bias[0] += 1e-6
    assert not weights_equal(loaded, model)


# --------------------------------------------------------------------------- errors


def test_missing_run_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirError) as info:
        load_model(tmp_path / "nope")
    assert str(info.value) == f"not a run directory: {tmp_path / 'nope'} does not exist"


@pytest.mark.parametrize("missing", ["model.json", "model.safetensors"])
def test_missing_files(saved, missing: str) -> None:
    run, _ = saved
    (run / missing).unlink()
    with pytest.raises(RunDirError) as info:
        load_model(run)
    assert str(info.value) == (
        f"not a run directory: {run} has no {missing} "
        "(train one with 'cnnkit train DATA --out RUN_DIR')"
    )


def test_an_empty_folder_is_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match=r"has no model\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"classes": ["a", "b"]}', '{"classes": ["a"], "channels": "x"}', ""],
)
def test_damaged_model_json(saved, text: str) -> None:
    run, _ = saved
    (run / "model.json").write_text(text)
    with pytest.raises(RunDirError) as info:
        load_model(run)
    assert str(info.value).startswith(f"{run / 'model.json'}: damaged (")


def test_invalid_architecture_in_model_json(saved) -> None:
    run, _ = saved
    data = json.loads((run / "model.json").read_text())
    data["architecture"][0]["filters"] = 0
    (run / "model.json").write_text(json.dumps(data))
    with pytest.raises(RunDirError) as info:
        load_model(run)
    assert str(info.value) == (
        f"{run / 'model.json'}: architecture is invalid "
        "(layer 1 (conv): filters: expected a positive integer, got 0)"
    )


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "pickle"])
def test_damaged_weights(saved, how: str) -> None:
    run, _ = saved
    weights = run / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "garbage":
        weights.write_bytes(b"\xff" * 64)
    else:  # a pickle must never be unpickled: it could run code
        weights.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}))
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    assert str(info.value).startswith(f"{weights}: not a valid safetensors file (")


def test_weights_that_do_not_fit_the_architecture(saved) -> None:
    run, _ = saved
    data = json.loads((run / "model.json").read_text())
    data["classes"] = ["a", "b", "c", "d"]
    data["architecture"][-1]["units"] = 4
    (run / "model.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'model.safetensors'}: weights do not fit the architecture (")
    assert "dense1.weight" in message and "\n" not in message


def test_missing_tensor(saved) -> None:
    run, _ = saved
    state = load_file(str(run / "model.safetensors"))
    del state["layers.conv1.weight"]
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights do not fit the architecture \(.*conv1"):
        load_model(run)


def test_a_copied_run_directory_loads(saved, tmp_path: Path) -> None:
    run, model = saved
    shutil.copytree(run, tmp_path / "elsewhere")
    loaded, _ = load_model(str(tmp_path / "elsewhere"))  # a str works as well as a Path
    assert weights_equal(loaded, model)


# -------------------------------------------------------------------------- writing


def test_atomic_write_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda p: p.write_text("first"))
    assert target.read_text() == "first"

    def fail(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises((OSError, RunDirError)) as info:  # RunDirError names the file
        atomic_write(target, fail)
    assert "disk full" in str(info.value)
    assert target.read_text() == "first"  # the old file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temporary left


def test_save_model_overwrites_atomically(saved) -> None:
    run, model = saved
    with torch.no_grad():
        model.layers["dense1"].bias.fill_(0.25)
    save_model(run, model, model_meta(model))
    loaded, _ = load_model(run)
    assert torch.equal(loaded.layers["dense1"].bias, torch.full((3,), 0.25))
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.safetensors"]
