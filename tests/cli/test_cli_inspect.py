"""``cnnkit explain conv|pool``, ``inspect`` and ``report``, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app

runner = CliRunner()

RESULT = (
    "   155 -155  155 -155\n  -155  310 -155  155\n   310  155  310    0\n  -155 -155 -155    0"
)
RELU = (
    "    0   0   0   0   0   0\n    0 155   0 155   0   0\n    0   0 310   0 155   0\n"
    "    0 310 155 310   0   0\n    0   0   0   0   0   0\n    0   0   0   0   0   0"
)


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_explain_conv_reproduces_the_material() -> None:
    result = _run("explain", "conv")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "  255 255 100 255 255 255\n" in text
    assert "(255 x 1) + (100 x -1) + (100 x 1)\n  = 155" in text
    assert "(100 x 1) + (100 x -1) + (100 x 1)\n  = -155" in text
    assert RESULT in text
    assert "     0  155 -155  155 -155    0\n" in text  # the 6x6 map with a zero border
    assert text.rstrip().endswith(RELU)


def test_explain_conv_json_and_user_matrices(tmp_path: Path) -> None:
    data = json.loads(_run("explain", "conv", "--json").stdout)
    assert [s["sum"] for s in data["steps"][:2]] == [155, -155]
    assert data["relu"][2] == [0, 0, 310, 0, 155, 0]
    kernel = tmp_path / "k.txt"
    kernel.write_text("1 0\n0 -1\n")
    result = _run(
        "explain", "conv", "--image", "1 2 3; 4 5 6; 7 8 9", "--kernel-file", str(kernel),
        "--padding", "zero", "--no-relu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["result"] == [[-4, -4, 3], [-4, -4, 6], [7, 8, 9]]
    assert data["relu"] is None and data["padding"] == "zero"
    all_steps = _run("explain", "conv", "--stride", "2", "--all-steps").stdout
    assert all_steps.count("Step ") == 4 and "more positions" not in all_steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "1 2; 3"], "error: --image: ragged rows: row 2 has 1 value, row 1 has 2"),
        (["--kernel", "1 a"], "error: --kernel: row 1, value 2: 'a' is not a number"),
        (["--image", "1 2; 3 4"], "error: --kernel: the 3x3 kernel is larger than the 2x2 image"),
        (["--stride", "0"], "error: --stride: expected a positive integer, got 0"),
        (["--padding", "same"], "error: --padding: expected border or zero, got 'same'"),
        (["--image", "1", "--image-file", "x"],
         "error: --image: give --image or --image-file, not both"),
        (["--image-file", "/nonexistent/m.txt"], "error: /nonexistent/m.txt: no such file"),
    ],
)  # fmt: skip
def test_explain_conv_errors_are_one_line(args: list[str], message: str) -> None:
    result = _run("explain", "conv", *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message
    assert "Traceback" not in result.output


def test_explain_pool() -> None:
    result = _run("explain", "pool")
    assert result.exit_code == 0, result.output
    assert "Window 1: rows 1-2, columns 1-2\n    0   0\n    0 155\n  max = 155" in result.stdout
    assert "  155 155   0\n  310 310 155\n    0   0   0" in result.stdout
    data = json.loads(_run("explain", "pool", "--map", "1 5; 3 2", "--json").stdout)
    assert data["result"] == [[5]] and data["steps"][0]["window"] == [[1, 5], [3, 2]]
    bad = _run("explain", "pool", "--size", "7")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: --size: the 7x7 window is larger than the 6x6 map"


@pytest.mark.parametrize(
    "command", [["explain"], ["explain", "conv"], ["explain", "pool"], ["inspect"], ["report"]]
)
def test_help(command: list[str]) -> None:
    result = _run(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_inspect_command(trained_run, shapes_dir: Path, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    image = sorted((shapes_dir / "square").iterdir())[0]
    out = tmp_path / "out"
    result = _run("inspect", str(run_dir), str(image), "--out", str(out), "--layers", "conv1")
    assert result.exit_code == 0, result.output
    assert f"open {out / 'index.html'}" in result.stdout
    assert (out / "maps_conv1.png").is_file() and not (out / "maps_relu1.png").exists()
    bad = _run("inspect", str(run_dir), str(image), "--out", str(out), "--class", "star")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == (
        "error: --class: unknown class 'star', expected one of: circle, square, triangle"
    )
    missing = _run("inspect", str(run_dir), str(tmp_path / "no.png"), "--out", str(out))
    assert missing.exit_code == 1 and "file not found" in missing.stderr


def test_report_command(trained_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    target = tmp_path / "elsewhere.html"
    result = _run("report", str(run_dir), "--out", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"report: {target}"
    assert "<h2>Feature maps of a validation image</h2>" in target.read_text()
    empty = _run("report", str(tmp_path / "nothing"))
    assert empty.exit_code == 1 and empty.stderr.startswith("error: ")
