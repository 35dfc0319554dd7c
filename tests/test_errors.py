"""Errors that carry facts: the library names a setting in its own terms, the CLI as the flag
its user typed, the server picks a status by type; and no library message names a flag."""

from __future__ import annotations

import ast
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.cli._app import FLAGS, error_line
from cnnkit.errors import (
    CnnkitError,
    ConfigError,
    ImageError,
    ImageTooLarge,
    MissingDependencyError,
    OutputError,
    TrainingInterrupted,
)
from cnnkit.export.onnx_export import export_onnx
from cnnkit.inspection.explain import explain_conv, explain_pool
from cnnkit.models.summary import summarize
from cnnkit.serve.runner import check_address
from cnnkit.serve.uploads import error_status

SRC = Path(cnnkit.__file__).parent


def test_a_message_names_settings_as_the_library_does_and_as_the_cli_spells_them() -> None:
    error = OutputError(
        "{setting} {path}: holds {names}; pass {overwrite=True}, got {value!r} of {limit:,}",
        setting="out",
        path="/runs/{x}",  # braces a user gave are shown, never read as fields
        value="a{b}",
        limit=1234567,
        names="x.txt, {y}/",
    )
    assert str(error) == (
        "out /runs/{x}: holds x.txt, {y}/; pass overwrite=True, got 'a{b}' of 1,234,567"
    )
    assert error.words({"out": "--out", "overwrite=True": "--overwrite"}) == (
        "--out /runs/{x}: holds x.txt, {y}/; pass --overwrite, got 'a{b}' of 1,234,567"
    )
    assert (error.setting, error.path, error.value, error.limit) == (
        "out",
        "/runs/{x}",
        "a{b}",
        1234567,
    )
    plain = ConfigError("a {message} without a setting is not a template")
    assert str(plain) == plain.words(FLAGS) == "a {message} without a setting is not a template"


def test_errors_keep_their_facts_through_pickling() -> None:
    """A DataLoader worker or a process pool sends errors across processes by pickling."""
    errors: list[CnnkitError] = [
        ConfigError("{setting}: got {value}", setting="opset", value=9, limit=13),
        ImageTooLarge("scan.jpg", "refused, too many scans", path="scan.jpg", limit=100),
        TrainingInterrupted("SIGTERM", "/runs/a"),
        MissingDependencyError("onnx is missing", "onnx", "pip install 'cnnkit[export]'"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert copy.__dict__ == error.__dict__
        assert copy.words(FLAGS) == error.words(FLAGS)


def test_an_image_error_keeps_its_source_and_reason_apart() -> None:
    error = ImageTooLarge("<image bytes>", "refused, a JPEG with more than 100 scans", limit=100)
    assert str(error) == "<image bytes>: refused, a JPEG with more than 100 scans"
    assert (error.source, error.reason, error.limit) == (
        "<image bytes>",
        "refused, a JPEG with more than 100 scans",
        100,
    )
    # the status comes from the type: no "decompression bomb" in this message
    assert error_status(error) == 413
    assert error_status(ImageError("a.png", "refused, too large")) == 400


def test_an_interrupted_run_says_how_to_continue_in_python_and_on_the_command_line() -> None:
    error = TrainingInterrupted("SIGINT", Path("/runs/a b"))
    assert str(error) == (
        "interrupted by SIGINT; checkpoint saved, continue with: "
        "cnnkit.training.train(None, '/runs/a b', resume=True)"
    )
    assert error_line(error) == (
        "error: interrupted by SIGINT; checkpoint saved, continue with: "
        "cnnkit train --resume /runs/a b"
    )
    assert (error.signal, error.setting) == ("SIGINT", "resume")


SAME_MISTAKES: list[tuple[Callable[[], object], str, list[str], str]] = [
    (
        lambda: summarize("fast", image_size=2),
        "image_size: expected 4 to 1024 pixels, got 2",
        ["model", "summary", "fast", "--image-size", "2"],
        "--image-size: expected 4 to 1024 pixels, got 2",
    ),
    (
        lambda: explain_conv(stride=0),
        "stride: expected a positive integer, got 0",
        ["explain", "conv", "--stride", "0"],
        "--stride: expected a positive integer, got 0",
    ),
    (
        lambda: explain_pool(np.ones((3, 3)), size=4),
        "size: the 4x4 window is larger than the 3x3 map",
        ["explain", "pool", "--map", "1 1 1; 1 1 1; 1 1 1", "--size", "4"],
        "--size: the 4x4 window is larger than the 3x3 map",
    ),
    (
        lambda: export_onnx("no-run", opset=9),
        "opset: expected 13 or newer, got 9",
        ["export", "no-run", "--format", "onnx", "--opset", "9"],
        "--opset: expected 13 or newer, got 9",
    ),
    (
        lambda: check_address("127.0.0.1", 0),
        "port: expected 1 to 65535, got 0",
        ["serve", "no-run", "--port", "0"],
        "--port: expected 1 to 65535, got 0",
    ),
]


@pytest.mark.parametrize(
    ("call", "in_python", "argv", "on_the_command_line"),
    SAME_MISTAKES,
    ids=[" ".join(argv[:2]) for _, _, argv, _ in SAME_MISTAKES],
)
def test_the_api_names_the_argument_and_the_cli_the_flag(
    call: Callable[[], object], in_python: str, argv: list[str], on_the_command_line: str
) -> None:
    with pytest.raises(CnnkitError) as info:
        call()
    assert str(info.value) == in_python
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {on_the_command_line}"]


def test_weights_the_api_and_the_cli_name_alike(tiny_shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        cnnkit.train(tiny_shapes, tmp_path / "run", weights="nope.pth", progress=False)
    reason = "nope.pth: not a file, URL, run directory or 'imagenet'"
    assert str(info.value) == f"train.weights {reason}"
    assert info.value.setting == "train.weights" and info.value.value == "nope.pth"
    argv = ["train", str(tiny_shapes), "--out", str(tmp_path / "run"), "--weights", "nope.pth"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: --weights {reason}"]
    assert not (tmp_path / "run").exists()


def _options(command) -> set[str]:
    found = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for sub in getattr(command, "commands", {}).values():
        found |= _options(sub)
    return found


def test_every_flag_an_error_is_spelled_with_is_an_option_of_cnnkit() -> None:
    import typer

    options = _options(typer.main.get_command(app))
    assert {flag.split()[0] for flag in FLAGS.values()} <= options


def _raises(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            yield node.exc


def test_no_library_message_names_a_flag() -> None:
    """Flags are the CLI's words: a library message names the setting (``out``,
    ``train.weights``) and the CLI spells it. A whole command given as advice (quoted,
    ``'cnnkit train --nproc N'``) may keep its flags."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "cli":
            continue
        for call in _raises(ast.parse(path.read_text())):
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    text = re.sub(r"'cnnkit [^']*'", "", node.value)
                    if re.search(r"(?<![\w-])--[a-z]", text):
                        found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_a_message_template_holds_no_formatted_values() -> None:
    """What a user gave goes into a template as a field: formatted into it, a brace in a file
    name would be read as a field."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for call in _raises(ast.parse(path.read_text())):
            names = {k.arg for k in call.keywords}
            if "setting" in names and call.args and not isinstance(call.args[0], ast.Constant):
                found.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert found == []
