"""Outputs besides training's: ``data shapes``, ``inspect --out``, ``report --out``, ``export
--out`` and ``demo --out`` refuse to replace files cnnkit did not write (unless
``--overwrite``) and replace cnnkit's own outputs whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import cnnkit.demo as demo_mod
from cnnkit.cli import app
from cnnkit.config import RunConfig, TrainConfig
from cnnkit.training.loop import train
from conftest import tiny_config


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    return line


@pytest.fixture(scope="module")
def tiny_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run on ``tiny_shapes`` (read-only)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    train(tiny_config(tiny_shapes, epochs=1), out, progress=False)
    return out


def test_data_shapes_refuses_a_folder_of_the_users_files(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert one_error(invoke("data", "shapes", out, "--count", 2, "--size", 16)) == (
        f"error: {out} holds files cnnkit did not write (notes.txt); choose another folder, "
        "or pass --overwrite to write into it (only the files cnnkit writes are replaced)"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert invoke("data", "shapes", out, "--count", 2, "--size", 16, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.glob("*/*.png"))) == 6


def test_data_shapes_replaces_its_own_shapes_whole(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    assert invoke("data", "shapes", out, "--count", 3, "--size", 16).exit_code == 0
    assert invoke("data", "shapes", out, "--count", 2, "--size", 16, "--seed", 1).exit_code == 0
    assert sorted(p.name for p in out.glob("circle/*")) == ["circle_00000.png", "circle_00001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left


def test_report_out_refuses_a_users_file(tiny_run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "report.html"
    mine.write_text("my report")
    assert one_error(invoke("report", tiny_run, "--out", mine)) == (
        f"error: {mine} exists and cnnkit did not write it; choose another name, or pass "
        "--overwrite to replace it"
    )
    assert mine.read_text() == "my report"
    assert invoke("report", tiny_run, "--out", mine, "--overwrite").exit_code == 0
    assert mine.read_text().startswith("<!DOCTYPE html>")
    mine.write_bytes(b"")  # cnnkit's own file now: replaced without --overwrite
    assert invoke("report", tiny_run, "--out", mine).exit_code == 0
    assert mine.stat().st_size > 0


def test_export_out_refuses_a_users_file_before_exporting(tiny_run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "model.pt2"
    mine.write_text("not an export")
    args = ("export", tiny_run, "--format", "pt2", "--out", mine, "--check-images", 4)
    assert one_error(invoke(*args)) == (
        f"error: {mine} exists and cnnkit did not write it; choose another name, or pass "
        "--overwrite to replace it"
    )
    assert mine.read_text() == "not an export"
    assert invoke(*args, "--overwrite").exit_code == 0
    assert mine.read_bytes()[:2] == b"PK"  # a pt2 archive


def test_inspect_out_refuses_a_users_folder_and_replaces_its_own(
    tiny_run: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    image = next((tiny_shapes / "circle").glob("*.png"))
    out = tmp_path / "inspect"
    assert invoke("inspect", tiny_run, image, "--out", out).exit_code == 0
    every_layer = {p.name for p in out.iterdir()}
    assert invoke("inspect", tiny_run, image, "--out", out, "--layers", "conv1").exit_code == 0
    fewer = {p.name for p in out.iterdir()}
    assert "maps_conv1.png" in fewer and fewer < every_layer  # the other maps are gone

    (out / "notes.txt").write_text("mine")
    assert one_error(invoke("inspect", tiny_run, image, "--out", out)) == (
        f"error: {out} holds files cnnkit did not write (notes.txt); choose another folder, "
        "or pass --overwrite to write into it (only the files cnnkit writes are replaced)"
    )
    assert invoke("inspect", tiny_run, image, "--out", out, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == every_layer | {"notes.txt"}


def test_demo_out_refuses_a_folder_of_the_users_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_mod, "DEMO_COUNT", 2)
    monkeypatch.setattr(demo_mod, "DEMO_SIZE", 16)
    monkeypatch.setattr(
        demo_mod, "DEMO_CONFIG", RunConfig(model="fast", train=TrainConfig(epochs=1))
    )
    out = tmp_path / "demo"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert one_error(invoke("demo", "--out", out, "--quiet")) == (
        f"error: --out {out} holds files cnnkit did not write: thesis.tex (no .cnnkit-manifest: "
        "cnnkit wrote nothing there); move them away or choose another --out"
    )
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
