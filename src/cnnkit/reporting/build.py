"""``cnnkit report``: one self-contained ``report.html`` that says whether training worked.

Everything is inside the file: images are base64 ``data:`` URIs, the CSS is inline, there are
no scripts and no external URLs, so it opens from disk, mailed or archived, with no server.

Sections that need the training images (augmented samples, confusion matrix, per-class scores,
mistakes, feature maps of a validation image) are computed from the run's data folder
(``config.yaml`` ``data.path``); when it is gone the report still renders what the run
directory holds and says which sections are unavailable and why. Another data folder
(``--data``) is scored as other data, all of it, and labelled so.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path

import torch

from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.dataset import PreparedData, prepare_data
from cnnkit.data.folder import folder_problem, same_folder
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import evaluate, evaluate_images
from cnnkit.files import check_output, write_file
from cnnkit.inference import Classifier, load
from cnnkit.inspection.html import esc, page
from cnnkit.reporting.sections import BUILDERS, DATA_SECTIONS, SECTIONS, Run, unavailable

__all__ = ["DATA_SECTIONS", "SECTIONS", "build_report", "try_write_report", "write_report"]

log = logging.getLogger("cnnkit")


def write_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    prepared: PreparedData | None = None,
    val_logits: torch.Tensor | None = None,
    classifier: Classifier | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``report.html`` (into ``run_dir`` unless ``out`` is given) and return its path.

    ``data`` overrides the data folder recorded in the run's ``config.yaml``; ``prepared``
    is the data training just used, still in memory (nothing is scanned or decoded again),
    and ``val_logits`` its validation logits of the saved weights (nothing is run again),
    ``classifier`` the run's saved weights, still in memory (nothing is loaded again).
    An ``out`` file that cnnkit did not write is refused unless ``overwrite``; the run's own
    ``report.html`` is always replaced. Either is replaced whole, by a rename.
    """
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    if out is not None:  # refused before the work, not after
        check_output(path, overwrite=overwrite)
    html = build_report(
        run_dir, data, prepared=prepared, val_logits=val_logits, classifier=classifier
    )
    return write_file(
        path, lambda p: p.write_text(html, encoding="utf-8"), overwrite=overwrite or out is None
    )


def try_write_report(
    run_dir: str | Path,
    prepared: PreparedData | None = None,
    val_logits: torch.Tensor | None = None,
    classifier: Classifier | None = None,
) -> Path | None:
    """``write_report`` after training: a failure is a warning, never a lost model."""
    try:
        return write_report(
            run_dir, prepared=prepared, val_logits=val_logits, classifier=classifier
        )
    except Exception as exc:  # the trained model is already saved; keep it whatever happens
        log.warning("report not written: %s", exc)
        return None


def build_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    prepared: PreparedData | None = None,
    val_logits: torch.Tensor | None = None,
    classifier: Classifier | None = None,
) -> str:
    """The report's HTML for ``run_dir`` (raises ``RunDirError`` without a saved model)."""
    run = _gather(Path(run_dir), data, prepared, val_logits, classifier)
    body = [
        f"<h1>Training report: {esc(run.run_dir.name)}</h1>",
        "<nav>" + " ".join(f"<a href='#{k}'>{esc(t)}</a>" for k, t in SECTIONS) + "</nav>",
    ]
    for key, title in SECTIONS:
        try:
            content = BUILDERS[key](run)
        except CnnkitError as exc:
            content = unavailable(str(exc))
        body.append(f"<section id='{key}'><h2>{esc(title)}</h2>\n{content}</section>")
    return page(f"cnnkit report: {run.run_dir.name}", "\n".join(body))


# ----------------------------------------------------------------------------- gathering


def _gather(
    run_dir: Path,
    data: str | Path | None,
    prepared: PreparedData | None,
    val_logits: torch.Tensor | None,
    classifier: Classifier | None = None,
) -> Run:
    classifier = classifier or load(run_dir)  # the one copy of the network the report uses
    run = Run(run_dir, classifier.model.eval(), classifier.meta)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:
            run.config = RunConfig.from_dict(load_yaml(config_path))
        except CnnkitError as exc:
            run.missing["config"] = f"config.yaml cannot be read: {exc}"
    else:
        run.missing["config"] = f"{config_path} is missing"
    if (run_dir / "summary.json").is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            run.summary = json.loads((run_dir / "summary.json").read_text())
    run.metrics = _read_metrics(run_dir / "metrics.csv")

    recorded = run.config.data.path if run.config is not None else ""
    problem = folder_problem(recorded) if run.config is not None else run.missing["config"]
    other = data is not None and not (recorded and same_folder(data, recorded))
    if other:  # other data: scored as other data (all of it), never called validation
        try:
            run.evaluation = evaluate(
                run_dir, data, split="auto", plot=False, classifier=classifier
            )
        except CnnkitError as exc:
            run.missing["evaluation"] = f"the data folder {data} cannot be used: {exc}"
    if problem is not None:
        run.missing["data"] = problem
    elif run.config is None:
        run.missing["data"] = run.missing["config"]
    elif prepared is not None:
        run.data = prepared
        if not other:
            run.evaluation = evaluate_images(
                classifier, prepared.val, logits=val_logits, data=prepared.root
            )
    else:
        try:
            run.data = prepare_data(run.config.data, classifier.meta.preprocessing.size)
            if not other:
                run.evaluation = evaluate(
                    run_dir, recorded, split="val", plot=False, classifier=classifier
                )
        except CnnkitError as exc:
            run.missing["data"] = f"the data folder {recorded} cannot be used: {exc}"
    return run


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items() if k and v not in (None, "")})
            except ValueError:
                continue
    return [r for r in rows if {"epoch", "train_loss", "val_loss"} <= r.keys()]
