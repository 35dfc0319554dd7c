"""Inference: single-image latency (p50/p99) and batched throughput of every preset.

For each preset a run directory is trained for one epoch on generated shapes (latency does
not depend on accuracy) and loaded with ``cnnkit.load``. Then, after ``--warmup`` untimed
calls each:

- ``predict_file``: ``Classifier.predict(path)`` of one 128x128 PNG: decode, resize,
  normalise, forward, softmax and the ``Prediction`` (what ``cnnkit predict`` does per file);
- ``preprocess_file`` and ``logits_one``: the two halves of that call, ``Classifier.preprocess``
  of the file and ``Classifier.logits`` of the one preprocessed image;
- ``forward``: the model alone on one preprocessed image, under ``torch.inference_mode`` and
  the classifier's precision (autocast), as ``Classifier.logits`` runs it;
- ``batch``: ``Classifier.logits`` of a uint8 batch of ``--batch`` preprocessed images
  (images/s), and ``Classifier.predict`` of ``--batch`` files (decode included).

Latencies are p50 (the median) and p99 of ``--runs`` timed calls. Usage::

    .venv/bin/python bench/inference.py [--quick] [--runs 500] [--precision auto] [--threads 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import cnnkit
from benchlib import BENCH_DIR, cnnkit_train, emit, fresh_dir, log, machine, shapes_folder
from cnnkit.data.images import to_model_input
from cnnkit.inference import Classifier
from cnnkit.models import list_presets
from cnnkit.runtime import autocast

# ------------------------------------------------------------------------------ Timing


def timed(call: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Seconds of each of ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    seconds = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call()
        seconds[i] = time.perf_counter() - start
    return seconds


def latency_ms(seconds: np.ndarray) -> dict[str, float]:
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def measure(clf: Classifier, one: Path, files: list[Path], args: argparse.Namespace) -> dict:
    """Latencies and batched throughput of one loaded classifier."""
    image = clf.preprocess(one)[None].copy()  # (1, S, S, C) uint8, writable
    x = to_model_input(
        torch.from_numpy(image), clf.meta.preprocessing.mean, clf.meta.preprocessing.std
    )
    batch = np.stack([clf.preprocess(f) for f in files])  # (B, S, S, C) uint8

    def forward() -> torch.Tensor:
        with torch.inference_mode(), autocast(clf.device, clf.precision):
            return clf.model(x)

    n, warm = args.runs, args.warmup
    logits = timed(lambda: clf.logits(batch), args.batch_runs, 2)
    predict_files = timed(lambda: clf.predict(files), args.batch_runs, 2)
    return {
        "image_size": clf.meta.preprocessing.size,
        "precision": clf.precision,
        "predict_file": latency_ms(timed(lambda: clf.predict(one), n, warm)),
        "preprocess_file": latency_ms(timed(lambda: clf.preprocess(one), n, warm)),
        "logits_one": latency_ms(timed(lambda: clf.logits(image), n, warm)),
        "forward": latency_ms(timed(forward, n, warm)),
        "batch": {
            "size": len(batch),
            "logits_images_per_second": round(len(batch) / float(np.median(logits)), 1),
            "predict_files_images_per_second": round(
                len(files) / float(np.median(predict_files)), 1
            ),
        },
    }


def main() -> None:
    # ----------------------------------------------------------------------------- Setup

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="timed single-image calls")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-runs", type=int, default=30, help="timed batched calls")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--presets", default=",".join(list_presets()), help="comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--quick", action="store_true", help="few runs")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.batch_runs, args.warmup = 30, 3, 3
    presets = [p for p in args.presets.split(",") if p]
    info = machine()

    # ------------------------------------------------------------------------------ Data
    folder = shapes_folder(20 if args.quick else 400)  # 128x128 PNGs
    files = sorted(folder.rglob("*.png"))[: args.batch]
    one = files[0]
    cache = fresh_dir(BENCH_DIR / "cache-inference")

    # -------------------------------------------------------------------------- Training
    rows = {}
    for preset in presets:
        run = BENCH_DIR / "runs-inference" / preset
        log(f"{preset}: training a 1-epoch run in {run}")
        cnnkit_train(preset, folder, run, epochs=1, cache_dir=cache)

        # ------------------------------------------------------------------ Evaluation
        if args.threads:  # after training, which sets one thread per core
            torch.set_num_threads(args.threads)
        clf = cnnkit.load(run, precision=args.precision)
        rows[preset] = {"threads": torch.get_num_threads(), **measure(clf, one, files, args)}
        log(
            f"{preset}: predict p50 {rows[preset]['predict_file']['p50_ms']} ms, "
            f"forward p50 {rows[preset]['forward']['p50_ms']} ms"
        )
    emit(
        {
            "benchmark": "inference",
            "quick": args.quick,
            "machine": info,
            "runs": args.runs,
            "batch_runs": args.batch_runs,
            "input": f"{one.name}: a 128x128 RGB PNG",
            "timed": "predict_file: Classifier.predict(path) = preprocess_file "
            "(Classifier.preprocess) + logits_one (Classifier.logits of 1 image); forward: "
            "model(x) alone; batch: Classifier.logits(uint8 batch) and "
            "Classifier.predict(files), median",
            "presets": rows,
        }
    )


if __name__ == "__main__":
    main()
