"""Utilisation: achieved training GFLOP/s of every preset over the machine's matmul peak.

Peak: the median GFLOP/s of ``--matmul-size`` square matmuls (``2 n^3`` FLOPs each) in fp32
and in bf16, measured here, now. Achieved: ``3 x forward FLOPs per image x images/s``, with
the forward FLOPs of ``cnnkit model summary`` (multiply-add = 2 FLOPs; backward taken as twice
the forward) and images/s from cnnkit's training loop (``cnnkit.training.loop.train``, training
steps only) with ``TrainConfig(precision=fp32|bf16)``, median of ``--repeats`` windows.
Usage::

    .venv/bin/python bench/utilisation.py [--quick] [--repeats 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import BENCH_DIR, cnnkit_train, emit, fresh_dir, log, machine, median, shapes_folder

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ------------------------------------------------------------------------------ Peak


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> tuple[float, list[float]]:
    """Median GFLOP/s of ``n x n @ n x n`` in ``dtype`` after three untimed warm-up calls."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return median(rates), rates


def main() -> None:
    # ----------------------------------------------------------------------------- Setup
    from cnnkit.models import list_presets, load_model_spec
    from cnnkit.models.summary import summarize
    from cnnkit.threads import fit_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="training windows per figure")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training window")
    parser.add_argument("--count", type=int, default=400, help="shapes per class")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=20)
    parser.add_argument("--presets", default=",".join(list_presets()), help="comma-separated")
    parser.add_argument(
        "--no-augment", action="store_true", help="time the model without the augmentation"
    )
    parser.add_argument("--quick", action="store_true", help="small matmuls, 1 short window")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.count = 1, 1, 20
        args.matmul_size, args.matmul_repeats = 1024, 5
    presets = [p for p in args.presets.split(",") if p]
    fit_threads()  # as training does, so the peak uses the same threads
    info = machine()

    peaks = {}
    for name, dtype in PRECISIONS.items():
        gflops, rates = matmul_gflops(args.matmul_size, dtype, args.matmul_repeats)
        peaks[name] = {"gflops": round(gflops, 1), "max_gflops": round(max(rates), 1)}
        log(f"matmul {args.matmul_size}^2 {name}: {gflops:,.0f} GFLOP/s (median)")

    # ------------------------------------------------------------------------------ Data
    folder = shapes_folder(args.count)
    cache = fresh_dir(BENCH_DIR / "cache-utilisation")
    runs = BENCH_DIR / "runs-utilisation"

    # -------------------------------------------------------------------------- Training
    rows: dict[str, dict[str, object]] = {}
    for preset in presets:
        size = load_model_spec(preset).input_size
        flops = summarize(preset, image_size=size, classes=3, channels=3)["total_flops"]
        rows[preset] = {"image_size": size, "forward_mflops_per_image": round(flops / 1e6, 2)}
        for precision in PRECISIONS:
            out = runs / f"{preset}-{precision}"
            settings = {"precision": precision, "augment": not args.no_augment, "cache_dir": cache}
            cnnkit_train(preset, folder, out, epochs=1, **settings)  # untimed warm-up
            windows = []
            for _ in range(args.repeats):
                result = cnnkit_train(preset, folder, out, epochs=args.epochs, **settings)
                windows.append(result.images_per_second)
            ips = median(windows)
            achieved = 3 * flops * ips / 1e9
            rows[preset][precision] = {
                "images_per_second": round(ips, 1),
                "achieved_gflops": round(achieved, 2),
                "fraction_of_peak": round(achieved / peaks[precision]["gflops"], 4),
                "windows": [round(v, 1) for v in windows],
            }
            log(f"{preset} {precision}: {ips:,.0f} img/s, {achieved:,.1f} GFLOP/s")

    # ------------------------------------------------------------------------ Evaluation
    emit(
        {
            "benchmark": "utilisation",
            "quick": args.quick,
            "machine": info,
            "matmul": {"size": args.matmul_size, "repeats": args.matmul_repeats, **peaks},
            "augment": not args.no_augment,
            "repeats": args.repeats,
            "epochs_per_window": args.epochs,
            "timed": "achieved = 3 x summary forward FLOPs x images_per_second of "
            "cnnkit.training.loop.train (training steps only, augmentation included unless "
            "--no-augment), median of the windows; peak = median matmul GFLOP/s",
            "presets": rows,
        }
    )


if __name__ == "__main__":
    main()
