"""Nothing cnnkit loads can run code: crafted pickles, malformed safetensors, damaged manifests.

Each hostile file is planted inside an otherwise valid checkpoint or run directory (with its
manifest rewritten so the checksum matches) and must be refused with cnnkit's own error,
without the payload ever running. A source scan keeps every ``torch.load`` call safe.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cnnkit.errors import CheckpointError, RunDirError
from cnnkit.model_io import load_model, save_model
from cnnkit.models.network import Network
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.training import checkpoints as ckpt
from conftest import model_meta, training_state

SRC = Path(__file__).resolve().parents[2] / "src" / "cnnkit"


# ------------------------------------------------------------------------------ helpers


class RunsCommand:
    """A pickle whose loading runs ``os.system(command)``: what a hostile checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def tiny_network() -> Network:
    spec = load_model_spec("fast")
    return build_network(spec.layers, 3, 3, 16)


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """Put ``data`` into a checkpoint file and fix the manifest so that the checksum matches."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def safetensors_file(header: dict[str, Any], data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from its parts: 8-byte little-endian header length, JSON, data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32_2 = {"dtype": "F32", "shape": [2]}
MALFORMED_SAFETENSORS = {
    "header length of 2**62": struct.pack("<Q", 2**62) + b"{}",
    "header length past the end": struct.pack("<Q", 4096) + b'{"a": 1}',
    "header over 100 MB": struct.pack("<Q", 100_000_001) + b"{" + b" " * 64,
    "overlapping offsets": safetensors_file(
        {"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [4, 12]}},
        bytes(12),
    ),
    "the same offsets twice": safetensors_file(
        {"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [0, 8]}},
        bytes(8),
    ),
    "offsets past the end": safetensors_file(
        {"a": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}}, bytes(16)
    ),
    "shape larger than memory": safetensors_file(
        {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "header not JSON": struct.pack("<Q", 5) + b"{{{{{",
    "a pickle": pickle.dumps(RunsCommand("true")),
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with a model and two checkpoints (the newest and the previous one)."""
    out = tmp_path / "run"
    model = tiny_network()
    meta = model_meta(model, resize="crop")
    save_model(out, model, meta)
    for _ in range(2):
        ckpt.save_checkpoint(out, model, training_state())
    return out


# ------------------------------------------------------------------------ round trip


def test_checkpoint_round_trip_restores_weights_state_and_random_streams(tmp_path: Path) -> None:
    model = tiny_network()
    state = training_state()
    folder = ckpt.save_checkpoint(tmp_path, model, state)
    assert folder.name == "ckpt-000001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.pt",
    ]
    draws = (torch.rand(3), np.random.rand(3), [np.random.randn() for _ in range(3)])
    weights, loaded = ckpt.load_checkpoint(folder)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert loaded["progress"] == state["progress"]
    assert loaded["fingerprint"] == state["fingerprint"]
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    ckpt.set_rng_state(loaded["rng"])  # the streams continue exactly as after the save
    again = (torch.rand(3), np.random.rand(3), [np.random.randn() for _ in range(3)])
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_gpu_random_states_are_saved_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Plumbing only (no GPU here): the CUDA generators' states travel with the checkpoint."""
    state = training_state()
    generators = [torch.arange(16, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: generators)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state["rng"] = ckpt.rng_state()
    folder = ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), state)
    _, loaded = ckpt.load_checkpoint(folder)
    ckpt.set_rng_state(loaded["rng"])
    assert len(restored) == 1 and torch.equal(restored[0][0], generators[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        ckpt.set_rng_state(loaded["rng"])
    assert len(restored) == 1
    assert "random state of 1 GPU(s), this machine has 2" in caplog.text


def test_newest_two_are_kept_and_cut_short_writes_are_cleaned(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    for _ in range(4):
        ckpt.save_checkpoint(tmp_path, model, training_state())
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt-000004", "ckpt-000003"]
    leftover = tmp_path / "checkpoints" / ".tmp-killed"  # a write cut short by a kill
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    folder, _, _ = ckpt.find_checkpoint(tmp_path)
    assert folder.name == "ckpt-000004"
    assert not leftover.exists()
    leftover.mkdir()  # the next save also clears what an earlier session's kill left
    ckpt.save_checkpoint(tmp_path, model, training_state())
    assert not leftover.exists()


def test_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from \(looked in .*"):
        ckpt.find_checkpoint(tmp_path)


# ------------------------------------------------------------------- crafted pickles


def test_the_payload_is_armed(tmp_path: Path) -> None:
    """Sanity check of the test itself: unpickling the payload does run the command."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCommand(f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize("encoding", ["torch.save", "plain pickle"])
def test_state_pickle_that_runs_a_command_is_refused(
    run_dir: Path, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    marker = run_dir.parent / "pwned"
    payload = {"progress": RunsCommand(f"touch {marker}")}
    if encoding == "torch.save":
        path = run_dir.parent / "evil.pt"
        torch.save(payload, path)
        data = path.read_bytes()
    else:
        data = pickle.dumps(payload, protocol=2)
    newest, previous = ckpt.list_checkpoints(run_dir)
    replace_file(newest, "state.pt", data)
    with pytest.raises(CheckpointError, match=r"state\.pt: refused or unreadable \(.*"):
        ckpt.load_checkpoint(newest)
    assert not marker.exists()
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        folder, _, _ = ckpt.find_checkpoint(run_dir)  # falls back to the good one
    assert folder == previous
    assert f"{newest / 'state.pt'}: refused" in caplog.text
    assert not marker.exists()


def test_only_a_hostile_checkpoint_means_no_usable_checkpoint(run_dir: Path) -> None:
    marker = run_dir.parent / "pwned"
    folders = ckpt.list_checkpoints(run_dir)
    for folder in folders:
        replace_file(folder, "state.pt", pickle.dumps(RunsCommand(f"touch {marker}"), 2))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint \(.*state\.pt: refused"):
        ckpt.find_checkpoint(run_dir)
    assert not marker.exists()
    assert ckpt.list_checkpoints(run_dir) == folders  # nothing moved when none is usable


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ([1, 2, 3], "not a training state"),
        ({"progress": {}}, "not a training state (no 'optimizer')"),
    ],
)
def test_a_loadable_state_of_the_wrong_shape_is_refused(
    run_dir: Path, state: object, reason: str
) -> None:
    newest = ckpt.list_checkpoints(run_dir)[0]
    path = run_dir.parent / "other.pt"
    torch.save(state, path)
    replace_file(newest, "state.pt", path.read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(f"state.pt: {reason}")):
        ckpt.load_checkpoint(newest)


def test_model_file_that_is_a_pickle_runs_nothing(run_dir: Path) -> None:
    marker = run_dir.parent / "pwned"
    (run_dir / "model.safetensors").write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors"):
        load_model(run_dir)
    assert not marker.exists()


# --------------------------------------------------------------- malformed safetensors


@pytest.mark.parametrize("case", sorted(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_is_refused_by_load_model(run_dir: Path, case: str) -> None:
    (run_dir / "model.safetensors").write_bytes(MALFORMED_SAFETENSORS[case])
    with pytest.raises(CheckpointError, match=rf"^{run_dir}/model\.safetensors: not a valid"):
        load_model(run_dir)


@pytest.mark.parametrize("case", sorted(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_is_refused_on_resume(
    run_dir: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    newest, previous = ckpt.list_checkpoints(run_dir)
    replace_file(newest, "model.safetensors", MALFORMED_SAFETENSORS[case])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable \(.+\)"):
        ckpt.load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        folder, _, _ = ckpt.find_checkpoint(run_dir)
    assert folder == previous
    assert f"{newest / 'model.safetensors'}: unreadable" in caplog.text


def test_weights_that_do_not_fit_the_architecture(run_dir: Path) -> None:
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(run_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights do not fit the architecture"):
        load_model(run_dir)
    (run_dir / "model.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"model\.json: damaged"):
        load_model(run_dir)


# ----------------------------------------------------------------- damaged manifests


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ("", "damaged (not valid JSON)"),
        ("null", "damaged (not a JSON object)"),
        ("[1, 2]", "damaged (not a JSON object)"),
        ('{"state.pt": {}}', "damaged (no entry for model.safetensors)"),
        ('{"model.safetensors": 3, "state.pt": 4}', "damaged (no entry for model.safetensors)"),
    ],
)
def test_damaged_manifest_is_reported_with_its_reason(
    run_dir: Path, manifest: str, reason: str
) -> None:
    newest = ckpt.list_checkpoints(run_dir)[0]
    (newest / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(newest)
    assert str(info.value) == f"{newest / 'manifest.json'}: {reason}"


def test_damaged_checkpoint_is_moved_aside_so_pruning_keeps_good_ones(run_dir: Path) -> None:
    newest, previous = ckpt.list_checkpoints(run_dir)
    (newest / "state.pt").write_bytes(b"")
    folder, _, _ = ckpt.find_checkpoint(run_dir)
    assert folder == previous
    assert (run_dir / "checkpoints" / f"damaged-{newest.name}" / "state.pt").is_file()
    ckpt.save_checkpoint(run_dir, tiny_network(), training_state())
    kept = ckpt.list_checkpoints(run_dir)
    assert [p.name for p in kept] == [newest.name, previous.name]  # both good
    for folder in kept:
        ckpt.load_checkpoint(folder)


# --------------------------------------------------------------------- source scan

UNSAFE_CALLS = ("pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "joblib.load")


def unsafe_loads(source: str, where: str) -> tuple[int, list[str]]:
    """(number of ``torch.load`` calls, the unsafe loading calls) in Python ``source``."""
    torch_loads, unsafe = 0, []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
            names = [a.name for a in node.names if a.name in ("load", "loads")]
            if names:  # an alias would hide the call from this scan
                unsafe.append(f"{where}:{node.lineno}: from {node.module} import {names[0]}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        flags = {k.arg: k.value for k in node.keywords}
        line = f"{where}:{node.lineno}"
        if name == "torch.load":
            torch_loads += 1
            value = flags.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                unsafe.append(f"{line}: torch.load without weights_only=True")
        elif name in UNSAFE_CALLS:
            unsafe.append(f"{line}: {name}")
        elif name in ("np.load", "numpy.load"):
            value = flags.get("allow_pickle")
            if not (value is None or (isinstance(value, ast.Constant) and value.value is False)):
                unsafe.append(f"{line}: np.load with allow_pickle")
    return torch_loads, unsafe


def test_every_torch_load_in_src_passes_weights_only_true() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    total, unsafe = 0, []
    for path in files:
        count, found = unsafe_loads(path.read_text(), str(path.relative_to(SRC)))
        total += count
        unsafe += found
    assert total >= 1  # the checkpoint loader: the scan would notice it vanish
    assert unsafe == []


@pytest.mark.parametrize(
    "source",
    [
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(path, weights_only=flag)",
        "pickle.loads(data)",
        "np.load(path, allow_pickle=True)",
        "from torch import load",
    ],
)
def test_the_source_scan_flags_unsafe_loading(source: str) -> None:
    assert unsafe_loads(source, "x.py")[1] != []


def test_the_source_scan_passes_safe_loading() -> None:
    source = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
    assert unsafe_loads(source, "x.py") == (1, [])


# ------------------------------------------------------------------- torch.export files


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, replace.get(item.filename, zin.read(item.filename)))


@pytest.mark.parametrize("where", ["sample inputs", "a weight marked use_pickle"])
def test_a_crafted_pt2_archive_runs_nothing(tmp_path: Path, where: str) -> None:
    export = pytest.importorskip("cnnkit.export")
    program = torch.export.export(torch.nn.Linear(2, 2).eval(), (torch.ones(1, 2),))
    clean = tmp_path / "clean.pt2"
    torch.export.save(program, str(clean))
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save(RunsCommand(f"touch {marker}"), payload)
    with zipfile.ZipFile(clean) as archive:
        names = archive.namelist()
        if where == "sample inputs":
            (inputs,) = [n for n in names if n.endswith("sample_inputs/model.pt")]
            replace = {inputs: payload.read_bytes()}
        else:  # torch.export.load unpickles such a weight with weights_only=False
            (config_name,) = [n for n in names if n.endswith("model_weights_config.json")]
            config = json.loads(archive.read(config_name))
            entry = config["config"]["weight"]
            entry["use_pickle"] = True
            weight = config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]
            replace = {config_name: json.dumps(config).encode(), weight: payload.read_bytes()}
    crafted = tmp_path / "crafted.pt2"
    _rewrite_zip(clean, crafted, replace)
    with pytest.raises(CheckpointError):
        export.load_pt2(crafted)
    assert not marker.exists(), "loading the .pt2 ran the command inside it"
