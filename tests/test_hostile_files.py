"""Hostile config, model and checkpoint files: each refused with one clear error, nothing built.

Every hostile file is generated here and is small: an alias bomb of a few hundred bytes that
would expand to billions of nodes, layer lists that ask for gigabytes, a ``model.json`` whose
classes do not match its weights, checkpoints with a deeply nested manifest or a state with
fields resuming does not know. Values that break cnnkit's bounds are chosen so that, were
they not refused, building them would still fit in memory: these tests fail, not crash, on
code without the checks.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.config import MAX_YAML_BYTES, RunConfig, load_yaml, parse_yaml
from cnnkit.errors import CheckpointError, ConfigError, RunDirError
from cnnkit.model_io import load_model, save_model
from cnnkit.models import limits
from cnnkit.models.layers import LayerInfo, LayerSpec, infer_shapes, parse_layers
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.training import checkpoints as ckpt
from cnnkit.training.loop import train
from conftest import model_meta, tiny_config, training_state

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnkit"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    """The one ``error:`` line of a command that failed cleanly."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def alias_bomb(levels: int = 9, width: int = 9, under: str = "train") -> str:
    """YAML whose last alias names ``width ** levels`` strings: a billion-laughs file."""
    lines = [f"{under}:", '  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An untrained ``fast`` model on 16x16 images, saved as a run directory."""
    out = tmp_path / "run"
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    save_model(out, model, model_meta(model))
    RunConfig().save(out / "config.yaml")
    return out


# ---------------------------------------------------------------------------------- YAML


def test_an_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 1500  # 9 ** 9 * 8 = 3 billion strings once expanded
    with pytest.raises(ConfigError) as info:
        load_yaml(bomb)
    assert str(info.value) == (
        f"{bomb}: anchors and aliases (&name, *name) are not accepted (line 2)"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("train: &t {epochs: 3}\n", "anchors and aliases (&name, *name) are not accepted (line 1)"),
        ("a: 1\nb: *a\n", "anchors and aliases (&name, *name) are not accepted (line 2)"),
        ("base: &b {epochs: 2}\ntrain:\n  <<: *b\n", "anchors and aliases"),
        ("[" * 10_000 + "]" * 10_000, "nested deeper than 64 levels (line 1)"),
        ("train: {epochs: " + "9" * 5000 + "}\n", "not valid YAML (a number too long to read)"),
        ("train: {epochs: 3\n", "not valid YAML (line 2)"),
        ("a: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML (line 1)"),
        ("a: 1\n\x00", "not valid YAML"),
    ],
)
def test_hostile_yaml_is_one_config_error(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value).startswith(f"{path}: {reason}"), str(info.value)
    assert not (Path.cwd() / "pwned").exists()


def test_a_yaml_file_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=rf"^{path}: over {MAX_YAML_BYTES:,} bytes"):
        load_yaml(path)
    with pytest.raises(ConfigError, match=r"^text: over"):
        parse_yaml(path.read_text(), "text")


def test_cnnkit_reads_back_the_yaml_it_writes(tmp_path: Path) -> None:
    """Configs are written without anchors (PyYAML writes one for a repeated list)."""
    cfg = RunConfig(model="seed")
    cfg.save(tmp_path / "config.yaml")
    assert "&" not in (tmp_path / "config.yaml").read_text()
    assert RunConfig.from_dict(load_yaml(tmp_path / "config.yaml")) == cfg


def test_every_yaml_read_goes_through_the_one_loader() -> None:
    """A source scan: PyYAML's loaders are called in config.py only, where the bounds are."""
    call = re.compile(r"yaml\.(safe_|full_|unsafe_)?load(_all)?\(|yaml\.(compose|parse)\(")
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "config.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if call.search(line)
    ]
    assert found == []
    assert call.search("x = yaml.safe_load(text)")  # the scan does find a call


def test_cli_refuses_an_alias_bomb_wherever_it_reads_yaml(
    run_dir: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(levels=3, width=4))  # small: refused, not merely survived
    refused = "anchors and aliases (&name, *name) are not accepted"
    error = one_error(invoke("train", tiny_shapes, "--out", tmp_path / "new", "--config", bomb))
    assert error == f"error: {bomb}: {refused} (line 2)"
    assert one_error(invoke("model", "summary", bomb)).endswith(f"{refused} (line 2)")
    (run_dir / "config.yaml").write_text(alias_bomb(levels=3, width=4))
    assert refused in one_error(invoke("train", "--resume", run_dir))
    assert refused in one_error(invoke("evaluate", run_dir, tiny_shapes, "--split", "val"))
    report = invoke("report", run_dir, "--out", tmp_path / "report.html")
    assert report.exit_code == 0, report.output  # the report says what it could not read
    assert html.escape(refused) in (tmp_path / "report.html").read_text()


# ------------------------------------------------------------------------ layer budgets


def conv(filters: int, kernel: int = 3, padding: int | str = "same") -> dict[str, Any]:
    return {"conv": {"filters": filters, "kernel": kernel, "padding": padding}}


BUDGET_BREAKERS = {
    "2 M filters": ([conv(2_000_000)], 16, r"layer 1 \(conv\): 56,000,000 parameters"),
    "dense of 100,000 units": (
        ["flatten", {"dense": {"units": 100_000}}, "dense"],
        16,
        r"layer 2 \(dense\): 76,900,000 parameters",
    ),
    "200 filters on 1024 px": (
        [conv(200)],
        1024,
        r"layer 1 \(conv\): 209,715,200 output values per image \(output \(200, 1024, 1024\)\)",
    ),
    "padding of 100,000": ([conv(1, padding=100_000)], 16, r"layer 1 \(conv\): 40,[\d,]+ output"),
    "a 255x255 kernel on 512 px": (
        [conv(64, kernel=255, padding=0)],
        512,
        r"the network has 1,6[\d,]+ FLOPs per image, more than the 200,000,000,000 cnnkit",
    ),
    "three wide layers": (
        [conv(64), conv(64), conv(64), "gap"],
        1024,
        r"the network has 201,326,659 output values per image, more than the 134,217,728 "
        r"cnnkit builds \(the largest is layer 1 \(conv\) with 67,108,864\)",
    ),
    "1,001 layers": (["relu"] * 1_001, 16, r"layers: 1,003 layers, more than the 1,000"),
}


@pytest.mark.parametrize("case", sorted(BUDGET_BREAKERS))
def test_a_network_beyond_the_bounds_is_refused_before_it_is_built(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers, size, message = BUDGET_BREAKERS[case]
    built: list[int] = []
    monkeypatch.setattr(torch.nn.Module, "__init__", _counting(torch.nn.Module.__init__, built))
    with pytest.raises(ConfigError, match=message):
        build_network(parse_layers(layers), 3, 3, size)
    assert built == []  # not one module made


def _counting(init: Callable[..., None], calls: list[int]) -> Callable[..., None]:
    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        init(self, *args, **kwargs)

    return counted


def test_the_presets_are_far_within_the_bounds() -> None:
    for name in ("seed", "fast", "mnist", "cifar"):
        spec = load_model_spec(name)
        net = build_network(spec.layers, 10, 3, 1024 if name == "fast" else spec.input_size)
        limits.check_budget(net.infos)  # fast at the largest input cnnkit takes, too


def test_check_budget_names_the_layer_over_a_bound() -> None:
    infos = infer_shapes([LayerSpec("relu", {}), LayerSpec("flatten", {})], (3, 8, 8))
    limits.check_budget(infos)
    huge = LayerInfo("dense1", LayerSpec("dense", {"units": 9}), (9,), (9,), 10**9, 2 * 10**9)
    with pytest.raises(ConfigError, match=r"^layer 3 \(dense\): 1,000,000,000 parameters"):
        limits.check_budget([*infos, huge])


def test_model_summary_refuses_what_cnnkit_would_not_build(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump({"input_size": 16, "layers": [conv(2_000_000)]}))
    error = one_error(invoke("model", "summary", path))
    assert error.startswith("error: layer 1 (conv): 56,000,000 parameters, more than")


# ------------------------------------------------------------------- hostile model.json


MODEL_JSON = {
    "2 M filters": (
        lambda m: m["architecture"].__setitem__(0, {"type": "conv", **conv(2_000_000)["conv"]}),
        r"architecture is invalid \(layer 1 \(conv\): 56,000,000 parameters",
    ),
    "100,000 layers": (
        lambda m: m.__setitem__("architecture", [{"type": "relu"}] * 100_000),
        r"architecture is invalid \(layers: 100,000 layers, more than the 1,000",
    ),
    "image size 30000": (
        lambda m: m["preprocessing"].__setitem__("size", 30_000),
        r"damaged \(size: expected 4 to 1024 pixels, got 30000\)",
    ),
    "7 channels": (
        lambda m: m["preprocessing"].__setitem__("channels", 7),
        r"damaged \(channels: expected 1 or 3, got 7\)",
    ),
    "a NaN mean": (
        lambda m: m["preprocessing"].__setitem__("mean", [float("nan")] * 3),
        r"damaged \(normalisation mean\[0\] is nan: not a finite number\)",
    ),
    "one class": (
        lambda m: m.__setitem__("classes", ["a"]),
        r"damaged \(classes: expected 2 to 100,000 names, got 1\)",
    ),
    "a class more than the weights": (
        lambda m: m["classes"].append("d"),
        r"lists 4 classes, but the network's last layer gives \(3,\) scores",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_JSON))
def test_a_hostile_model_json_is_one_run_dir_error(run_dir: Path, case: str) -> None:
    change, message = MODEL_JSON[case]
    meta = json.loads((run_dir / "model.json").read_text())
    change(meta)
    (run_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match=rf"^{run_dir / 'model.json'}: {message}"):
        load_model(run_dir)


def test_a_deeply_nested_model_json_is_damaged_not_a_crash(run_dir: Path) -> None:
    (run_dir / "model.json").write_text('{"classes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RunDirError, match=r"model\.json: damaged \(nested too deeply\)$"):
        load_model(run_dir)


def test_predict_with_a_hostile_model_json_is_one_error_line(
    run_dir: Path, tiny_shapes: Path
) -> None:
    meta = json.loads((run_dir / "model.json").read_text())
    meta["architecture"][0]["filters"] = 2_000_000
    (run_dir / "model.json").write_text(json.dumps(meta))
    image = next((tiny_shapes / "circle").iterdir())
    error = one_error(invoke("predict", run_dir, image))
    assert error.startswith(f"error: {run_dir / 'model.json'}: architecture is invalid (layer 1")


# ---------------------------------------------------------------------------- checkpoints


def plant(folder: Path, name: str, data: bytes) -> None:
    """Put ``data`` into a checkpoint file with a manifest that vouches for it."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def state_bytes(state: dict[str, Any], tmp_path: Path) -> bytes:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path.read_bytes()


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for _ in range(2):
        ckpt.save_checkpoint(run, torch.nn.Linear(2, 2), training_state())
    return run


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = state
        for key in parents:
            target = target[int(key) if isinstance(target, list) else key]
        target[int(last) if isinstance(target, list) else last] = value

    return change


STATE_DAMAGE = {
    "an unknown field": (_set("extra", 1), "unknown field 'extra'"),
    "an unknown progress field": (_set("progress.lives", 3), "unknown progress field 'lives'"),
    "a progress count as text": (
        _set("progress.position.epoch", "2"),
        "progress.position.epoch is str '2'",
    ),
    "a progress group that is not a mapping": (_set("progress.best", 3), "progress.best is not"),
    "a count as text in an older checkpoint's flat progress": (
        _set("progress", {"epoch": "2", "best_acc": 0.5}),
        "progress.epoch is str '2'",
    ),
    "a history row without its epoch": (
        _set("progress.history", [{"val_acc": 0.5}]),
        "progress.history is list",
    ),
    "an optimizer of torch's": (_set("optimizer", {"state": {}}), "optimizer is not cnnkit's"),
    "optimizer state of a parameter that is not there": (
        _set("optimizer.state", {7: {"step": 1}}),
        "optimizer.state: expected tensors and numbers per parameter",
    ),
    "a short torch random state": (_set("rng.torch", torch.zeros(8, dtype=torch.uint8)), "rng"),
    "a python random state of numbers as text": (_set("rng.python.0", "3"), "rng"),
    "a scheduler without steps": (_set("scheduler", {"base_lrs": [0.1]}), "scheduler"),
    "fingerprint settings as a list": (_set("fingerprint", {"settings": []}), "fingerprint"),
    "an ema that is not tensors": (_set("ema", {"module.weight": "x"}), "ema"),
    "total steps below zero": (_set("total_steps", -1), "total_steps"),
}


@pytest.mark.parametrize("case", sorted(STATE_DAMAGE))
def test_a_state_resuming_cannot_use_falls_back_to_the_previous_checkpoint(
    two_checkpoints: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    change, reason = STATE_DAMAGE[case]
    newest, previous = ckpt.list_checkpoints(two_checkpoints)
    state = training_state()
    change(state)
    plant(newest, "state.pt", state_bytes(state, tmp_path))
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(newest)
    assert str(info.value).startswith(f"{newest / 'state.pt'}: not a training state ({reason}")
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        folder, _, _ = ckpt.find_checkpoint(two_checkpoints)
    assert folder == previous
    assert "trying the previous checkpoint" in caplog.text


@pytest.mark.parametrize(
    "manifest",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 50_000 + "1" + "}" * 50_000,
        "{" + " " * 65_536 + "}",
    ],
)
def test_a_deeply_nested_or_huge_manifest_falls_back(two_checkpoints: Path, manifest: str) -> None:
    newest, previous = ckpt.list_checkpoints(two_checkpoints)
    (newest / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=r"manifest\.json: damaged \((not valid JSON|over)"):
        ckpt.load_checkpoint(newest)
    assert ckpt.find_checkpoint(two_checkpoints)[0] == previous


def test_training_resumes_from_the_previous_checkpoint_past_an_unknown_field(
    tiny_shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny_config(tiny_shapes, epochs=2, checkpoint_every=2), run, progress=False)
    newest = ckpt.list_checkpoints(run)[0]
    state = torch.load(newest / "state.pt", weights_only=True)
    state["progress"]["lives"] = 3
    plant(newest, "state.pt", state_bytes(state, tmp_path))
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        result = train(None, run, resume=True, progress=False)
    assert "unknown progress field 'lives'" in caplog.text
    assert result.epochs_run == 2
    assert (run / "checkpoints" / f"damaged-{newest.name}").is_dir()
