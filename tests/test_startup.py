"""The ``cnnkit`` process imports only what a command needs and ends without the teardown.

Guarded by what is in ``sys.modules`` and by exit statuses, never by time: a module that
should not load on a path fails these tests on any machine, however fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cnnkit.cli._process import exit_process

# Never needed to start the CLI or to train: plots, export, serving, compilers, other libraries.
OFF_THE_TRAIN_PATH = (
    "kornia",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "fastapi",
    "uvicorn",
    "starlette",
    "scipy",
    "sympy",
    "torch._dynamo",
    "torch._inductor",
    "cnnkit.export",
    "cnnkit.serve",
)
# Not even needed to parse a command line: the CLI loads them inside the command that uses them.
OFF_THE_CLI_IMPORT = (*OFF_THE_TRAIN_PATH, "torch", "numpy", "PIL", "pydantic", "rich.table")


def _python(code: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _loaded(names: tuple[str, ...]) -> str:
    """Python that prints, as its last line of stderr at exit, which of ``names`` it loaded."""
    return (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {list(names)!r} "
        "if m in sys.modules]), file=sys.stderr))\n"
    )


def test_importing_the_cli_loads_no_heavy_module() -> None:
    done = _python(_loaded(OFF_THE_CLI_IMPORT) + "import cnnkit.cli")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.splitlines()[-1]) == []


def test_training_from_the_command_line_loads_only_what_it_needs(
    tiny_shapes: Path, tmp_path: Path
) -> None:
    # main(), as the console script runs it: the process ends through exit_process
    run = tmp_path / "run"
    argv = ["cnnkit", "train", str(tiny_shapes), "--out", str(run), "--epochs", "1"]
    done = _python(
        _loaded(OFF_THE_TRAIN_PATH)
        + f"sys.argv = {argv!r}\nfrom cnnkit.cli import main\nmain()\nprint('not reached')"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.splitlines()[-1]) == []  # atexit handlers still ran
    out = done.stdout.splitlines()  # and what was printed reached the pipe
    assert out[0].startswith("best validation accuracy") and out[-1] == f"report: {run}/report.html"
    assert "not reached" not in done.stdout
    assert (run / "report.html").is_file() and (run / "summary.json").is_file()


def test_an_error_after_torch_is_loaded_keeps_its_status_and_line(tmp_path: Path) -> None:
    argv = ["cnnkit", "train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    done = _python(f"import sys\nsys.argv = {argv!r}\nfrom cnnkit.cli import main\nmain()")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr


def test_heavy_imports_freeze_once_and_leave_the_collector_on() -> None:
    code = (
        "import gc, sys\n"
        "from cnnkit.cli._process import heavy_imports\n"
        "with heavy_imports():\n"
        "    assert not gc.isenabled()\n"
        "    import torch\n"
        "frozen = gc.get_freeze_count()\n"
        "with heavy_imports():  # torch is already there: nothing more is frozen\n"
        "    assert gc.isenabled()\n"
        "    x = [object() for _ in range(1000)]\n"
        "print(frozen > 0, gc.get_freeze_count() == frozen, gc.isenabled())"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]


def test_exit_process_falls_back_to_the_ordinary_exit() -> None:
    # In this process torch is loaded: only the fall-backs can be tried without ending it.
    assert "torch" in sys.modules
    with pytest.raises(SystemExit) as caught:
        exit_process("not a number")  # printed and status 1 by the ordinary exit
    assert caught.value.code == "not a number"
    release = threading.Event()
    worker = threading.Thread(target=release.wait)  # a thread the ordinary exit waits for
    worker.start()
    try:
        with pytest.raises(SystemExit) as caught:
            exit_process(3)
        assert caught.value.code == 3
    finally:
        release.set()
        worker.join()
