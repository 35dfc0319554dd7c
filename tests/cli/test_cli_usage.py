"""The command line's own errors read as one line, ``--help`` shows types and defaults, and
``--version`` answers; in-process through typer's CliRunner."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.config import TrainConfig
from cnnkit.errors import ConfigError

runner = CliRunner()
BOX = set("╭╮╰╯│─")  # what typer's rich errors and help are drawn with


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def commands() -> list[tuple[list[str], object]]:
    """Every command and group, with its path (typer vendors click: found by duck type)."""

    def walk(cmd, path: list[str]):
        yield path, cmd
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = commands()


def assert_usage_error(result, starts: str) -> None:
    """Exit status 2, one ``error: ...`` line on stderr, no box, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {starts}"), lines[0]
    assert not BOX & set(result.output) and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "cnnkit" for p, _ in COMMANDS]
)
def test_help_shows_types_and_defaults(path: list[str], command) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0 and result.stderr == "", result.output
    text = result.stdout
    assert text.startswith(" ".join(["Usage: cnnkit", *path]))
    assert "<bool>" not in text and not BOX & set(text)
    packed = "".join(text.split())  # help lines wrap, even inside "no-quiet"
    ctx = command.context_class(command, info_name=path[-1] if path else "cnnkit")
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        names, help_text = param.get_help_record(ctx)  # what the help prints for it
        assert "".join(f"{names}{help_text}".split()) in packed, param.name
        if not param.is_flag:
            assert "<" in names, (param.name, "shows no type")
        if param.default is not None and (not param.is_flag or param.secondary_opts):
            assert "[default: " in help_text, (param.name, "shows no default")


def test_train_help_shows_the_defaults_its_unset_flags_stand_for() -> None:
    flat = " ".join(invoke("train", "--help").stdout.split())
    defaults = TrainConfig()
    assert f"--epochs <int> [default: {defaults.epochs}]" in flat
    assert f"--batch-size <int> [default: {defaults.batch_size}]" in flat
    assert f"[default: {defaults.lr}]" in flat.split("--lr <float>", 1)[1][:60]
    assert "--vflip / --no-vflip [default: no-vflip]" in flat
    assert "--hflip / --no-hflip [default: hflip]" in flat
    assert "the settings the model recommends" in flat


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"cnnkit {cnnkit.__version__}\n"


def test_no_arguments_show_the_help() -> None:
    for path in ([], ["data"], ["model"]):
        result = invoke(*path)
        assert result.exit_code == 0 and result.stdout.startswith("Usage: cnnkit")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "d", "--epoch", "3"], "no such option: --epoch (Possible options: --epochs"),
        (["predict"], "missing argument 'run_dir'; see 'cnnkit predict --help'"),
        (["predict", "r", "x.png", "--top-k", "abc"], "invalid value for '--top-k': "),
        (["nosuch"], "no such command 'nosuch'; see 'cnnkit --help'"),
        (["data", "shapes", "out", "--count", "many"], "invalid value for '--count'"),
        (["explain", "conv", "--stride"], "option '--stride' requires an argument"),
        (["--versio"], "no such option: --versio"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    assert_usage_error(invoke(*args), message)


def assert_one_error(result, starts: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", 10**20, "train.epochs: expected at most 100,000, got 100000000000000000000"),
        ("--batch-size", 10**6, "train.batch_size: expected at most 65,536, got 1000000"),
        ("--patience", 10**6, "train.patience: expected at most 100,000, got 1000000"),
        ("--image-size", 5000, "data.image_size: expected 4 to 1024 pixels, got 5000"),
    ],
)
def test_absurd_sizes_are_refused_before_training(tiny_shapes, tmp_path, flag, value, message):
    result = invoke("train", tiny_shapes, "--out", tmp_path / "run", flag, value)
    assert_one_error(result, message)
    assert not (tmp_path / "run").exists()


def test_the_bounds_live_in_the_config_so_the_api_has_them_too() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected at most 100,000"):
        TrainConfig(epochs=10**20)
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected at most 65,536"):
        cnnkit.train("nowhere", out="nowhere", batch_size=10**9)
    assert TrainConfig(epochs=100_000, batch_size=65_536).epochs == 100_000


def test_a_binary_file_where_numbers_go_is_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\xff\xfe\x80\x81")
    result = invoke("explain", "conv", "--image-file", image)
    assert_one_error(result, f"{image}: not a text file of numbers")
    assert "UnicodeDecodeError" not in result.output


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = invoke("serve", tmp_path / "no-model-needed", "--port", port)
    assert_one_error(result, f"port {port} is in use (127.0.0.1:{port})")
    assert "uvicorn" not in result.output.lower()
