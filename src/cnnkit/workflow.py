"""Train, then report: the one workflow behind ``cnnkit train``, ``cnnkit.train`` and
``cnnkit demo``.

Training writes the run directory; then, in the process that reports (the only one, or
torchrun's rank 0), the report is written from what the run still holds in memory: the
decoded data, the best epoch's validation logits and, when the last epoch was the best, the
trained network itself. Nothing is decoded, loaded or run twice. ``--live`` watches the
epochs from a page on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.inference import Classifier, load
from cnnkit.reporting import try_write_report
from cnnkit.training.distributed import is_main_process
from cnnkit.training.loop import TrainResult, train
from cnnkit.training.plan import RunPlan

__all__ = ["Trained", "train_and_report"]

log = logging.getLogger("cnnkit")


@dataclass
class Trained:
    """A finished run: its result, its classifier (the saved weights) and its report."""

    result: TrainResult
    reports: bool  # this process reports (False: another torchrun rank than 0)
    classifier: Classifier | None = None  # None where nothing reports
    report: Path | None = None  # None when it could not be written (a warning said why)


def train_and_report(
    plan: RunPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    live: bool = False,
) -> Trained:
    """Train ``plan`` into ``out`` (``training.loop.train``), then write ``report.html``.

    A report that fails is a warning, never a lost model: the model is saved by then."""
    out = Path(out)
    with _watched(live, plan, out) as board:
        result = train(
            plan,
            out,
            overwrite=overwrite,
            progress=progress,
            resume=resume,
            force=force,
            on_epoch=board.epoch_end if board is not None else None,
        )
    if not is_main_process():
        return Trained(result, reports=False)
    try:
        if result.model is not None and result.meta is not None:
            classifier = Classifier(result.model, result.meta)  # the network that trained
        else:
            classifier = load(out)  # the best epoch was not the last: its saved weights
    except CnnkitError as exc:  # (a run directory damaged since it was written)
        log.warning("report not written: %s", exc)
        return Trained(result, reports=True)
    report = try_write_report(out, result.data, result.val_logits, classifier)
    return Trained(result, True, classifier, report)


def _watched(live: bool, plan: RunPlan, out: Path) -> Any:
    """``live``: the live page's board while training runs (rank 0 only), else nothing."""
    if not live or not is_main_process():
        return contextlib.nullcontext()
    from cnnkit.serve.live import announce_url, watch_training

    title = f"{out} ({plan.config.model})"
    return watch_training(plan.config.train.epochs, title=title, announce=announce_url)
