"""Contention: the same small training run quiet and beside one CPU-bound process, on 2 CPUs.

Each run is ``.venv/bin/cnnkit train SHAPES --model fast --image-size 32 --epochs 3 ...`` as a
child process pinned to two CPUs (the first two this script may use). The busy process is a
Python loop (``while True: pass``) pinned to the same two CPUs, started half a second before
the run and killed after it. Throughput is the run's ``images_per_second`` from
``summary.json`` (training steps only: no start-up, decoding or validation), so start-up
noise does not enter; the decode cache is filled once before the first timed run.

Variants: ``default`` is cnnkit's own thread choice (``cnnkit.threads.fit_threads``);
``threads2`` passes ``--threads 2``, what cnnkit did before it looked at other work. Each
repeat runs every variant quiet, then busy; the figures are medians over the repeats, and
the goal is busy throughput at least 45% of quiet (a fair share of two cores is 50%).

    .venv/bin/python bench/contention.py [--repeats 5] [--variants default,threads2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import BENCH_DIR, cnnkit_command, emit, log, machine, median, shapes_folder

# ------------------------------------------------------------------------------- Setup

VARIANTS = {"default": [], "threads2": ["--threads", "2"], "threads1": ["--threads", "1"]}
GOAL = 0.45  # busy throughput over quiet throughput
BUSY = "while True: pass"


def two_cpus() -> set[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("error: this benchmark needs two CPUs")
    return set(cpus[:2])


def pinned(cpus: set[int]):
    return lambda: os.sched_setaffinity(0, cpus)


# ---------------------------------------------------------------------------- Training


def train_once(data: Path, out: Path, extra: list[str], epochs: int, cpus: set[int]) -> dict:
    """One ``cnnkit train`` child on ``cpus``: its throughput, wall time and thread count."""
    cmd = [*cnnkit_command(), "train", str(data), "--out", str(out), "--overwrite", "--quiet"]
    cmd += ["--model", "fast", "--image-size", "32", "--epochs", str(epochs), "--patience", "0"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, *extra], preexec_fn=pinned(cpus), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
        raise SystemExit(f"error: cnnkit train exited with {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "images_per_second": summary["images_per_second"],
        "threads": summary.get("threads"),
        "wall_seconds": round(wall, 2),
    }


def beside_busy(run, cpus: set[int]) -> dict:
    """``run()`` while one CPU-bound process runs on the same CPUs."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=pinned(cpus))
    try:
        time.sleep(0.5)  # let it settle on a CPU
        return run()
    finally:
        busy.kill()
        busy.wait()


# -------------------------------------------------------------------------- Evaluation


def summarise(rows: list[dict]) -> dict:
    return {
        "images_per_second": median([r["images_per_second"] for r in rows]),
        "threads": sorted({r["threads"] for r in rows}),
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--count", type=int, default=400, help="shapes per class")
    parser.add_argument("--variants", default="default,threads2", help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 epoch, 40 shapes")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.count = 1, 1, 40
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r} ({', '.join(VARIANTS)})")
    cpus = two_cpus()
    info = machine()
    data = shapes_folder(args.count, size=32)
    os.environ["CNNKIT_CACHE_DIR"] = str(BENCH_DIR / "cache-contention")
    out = BENCH_DIR / "runs-contention" / "run"
    out.parent.mkdir(parents=True, exist_ok=True)
    log("filling the decode cache")
    train_once(data, out, ["--threads", "1"], 1, cpus)

    rows: dict[str, dict[str, list[dict]]] = {v: {"quiet": [], "busy": []} for v in variants}
    for repeat in range(args.repeats):
        for v in variants:
            quiet = train_once(data, out, VARIANTS[v], args.epochs, cpus)
            busy = beside_busy(
                lambda v=v: train_once(data, out, VARIANTS[v], args.epochs, cpus), cpus
            )
            rows[v]["quiet"].append(quiet)
            rows[v]["busy"].append(busy)
            log(
                f"repeat {repeat + 1}/{args.repeats} {v}: quiet {quiet['images_per_second']:,.0f} "
                f"img/s ({quiet['threads']} threads), busy {busy['images_per_second']:,.0f} img/s "
                f"({busy['threads']} threads), load {os.getloadavg()[0]:.1f}"
            )
    results = {}
    for v in variants:
        quiet, busy = summarise(rows[v]["quiet"]), summarise(rows[v]["busy"])
        ratio = busy["images_per_second"] / quiet["images_per_second"]
        results[v] = {"quiet": quiet, "busy": busy, "busy_over_quiet": round(ratio, 3)}
    default = results.get("default")
    emit(
        {
            "benchmark": "contention",
            "quick": args.quick,
            "machine": info,
            "cpus": sorted(cpus),
            "command": "cnnkit train SHAPES --model fast --image-size 32 "
            f"--epochs {args.epochs} --patience 0 [variant flags]",
            "data": str(data),
            "busy_process": f"{sys.executable} -c '{BUSY}' on the same CPUs",
            "results": results,
            "goal": f"default busy/quiet >= {GOAL}",
            "met": None if default is None or args.quick else default["busy_over_quiet"] >= GOAL,
        }
    )


if __name__ == "__main__":
    main()
