"""cnnkit in Jupyter, under a real kernel: ``examples/cnn_step_by_step.ipynb`` runs from top to
bottom without an error, ``cnnkit.train`` draws its HTML progress bar (and links the live
page), and cnnkit's objects display as HTML.

The kernel is this test run's own Python (a kernelspec written to a temporary
``JUPYTER_PATH``), so a fresh clone's ``.venv`` is all it needs; nothing touches the network
or the user's Jupyter folders.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cnn_step_by_step.ipynb"
KERNEL = "cnnkit-tests"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that starts ``sys.executable -m ipykernel_launcher``, and private Jupyter
    and IPython folders; the kernel inherits this environment (``CNNKIT_CACHE_DIR`` too)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "cnnkit tests", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # a notebook's own (inline) backend
    monkeypatch.chdir(tmp_path)
    return KERNEL


def execute(notebook, kernel: str, timeout: int = 240):
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel, timeout=timeout, allow_errors=False,
        resources={"metadata": {"path": str(Path.cwd())}},
    )  # fmt: skip
    return client.execute()


def outputs(cell) -> list[dict]:
    return [dict(o) for o in cell.get("outputs", [])]


def html_of(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs(cell))


def test_the_step_by_step_notebook_runs_without_an_error(kernel: str) -> None:
    notebook = nbformat.read(EXAMPLE, as_version=4)
    start = time.monotonic()
    done = execute(notebook, kernel)  # raises CellExecutionError on any error
    seconds = time.monotonic() - start
    errors = [o for c in done.cells for o in outputs(c) if o.get("output_type") == "error"]
    assert errors == []
    cells = {c.source.splitlines()[0]: c for c in done.cells if c.cell_type == "code"}
    assert "155" in html_of(cells["conv = cnnkit.explain_conv()"])
    assert "cnnkit-progress" in html_of(cells['data = cnnkit.generate_shapes(work / "shapes", '
                                             'count=80, size=32, seed=0)'])  # fmt: skip
    assert "<table" in html_of(cells['model = cnnkit.load(work / "run")'])
    pixel = html_of(cells['pixel = cnnkit.explain_pixel(model, drawn, "conv1", 0, (12, 14))'])
    assert "the model&#x27;s own forward pass" in pixel
    print(f"the notebook ran in {seconds:.1f} s")  # shown with -s; not a timed assertion


def test_train_draws_an_html_progress_bar_and_links_the_live_page(kernel, tiny_shapes) -> None:
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(
            "import cnnkit, torch\n"
            f"result = cnnkit.train({str(tiny_shapes)!r}, out='run', image_size=16, epochs=2, "
            "batch_size=4)"
        ),
        nbformat.v4.new_code_cell(
            f"cnnkit.train({str(tiny_shapes)!r}, out='live', image_size=16, epochs=1, "
            "batch_size=4, live=True)"
        ),
        nbformat.v4.new_code_cell("cnnkit.load('run')"),
        nbformat.v4.new_code_cell("cnnkit.load('run').predict(torch.zeros(16, 16, 3).numpy())[0]"),
    ])  # fmt: skip
    done = execute(notebook, kernel)
    bar = [o for o in outputs(done.cells[0]) if "cnnkit-progress" in html_of({"outputs": [o]})]
    assert len(bar) == 1, outputs(done.cells[0])  # one bar, updated in place
    text = bar[0]["data"]["text/html"]
    assert "<progress value='" in text and "epoch 2/2" in text  # its last state stays
    live = html_of(done.cells[1])
    assert "Watch training live" in live and "http://127.0.0.1:" in live
    (shown,) = [o for o in outputs(done.cells[2]) if o["output_type"] == "execute_result"]
    assert "cnnkit classifier" in shown["data"]["text/html"]  # the classifier's _repr_html_
    assert shown["data"]["text/plain"].startswith("Classifier(fast, 3 classes")
    (prediction,) = [o for o in outputs(done.cells[3]) if o["output_type"] == "execute_result"]
    assert "data:image/png;base64," in prediction["data"]["text/html"]
