"""Data-parallel training: 1 process against 2 processes (torchrun, gloo) on the same data.

Each window is one whole ``cnnkit train DATA --out RUN --quiet`` command, run as a child
process: without ``--nproc`` (one process using every core) and with ``--nproc 2`` (torchrun
starts two processes, one core each through ``OMP_NUM_THREADS``; DDP averages gradients over
gloo). Same data, model, global batch, epochs and seed. Reported per setting, as the median
of ``--repeats`` windows (the two settings alternate, after one untimed warm-up each that
also fills the shared decode cache):

- ``images_per_second``: from the run's ``summary.json``, training steps only (for 2
  processes: global batch x steps / seconds, i.e. both processes together);
- ``train_wall_seconds``: ``summary.json`` ``wall_seconds`` (the training function, setup to
  save, rank 0);
- ``process_wall_seconds``: fork to exit of the whole command (interpreter start-up,
  imports, the torchrun agent and everything the CLI does after training included).

On a machine with N cores, N processes each get 1/N of the cores, so data parallelism on
one CPU machine only pays when one process cannot keep the cores busy; its purpose is
several GPUs or machines. Usage::

    .venv/bin/python bench/distributed.py [--quick] [--repeats 3] [--epochs 3] [--count 400]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    cnnkit_command,
    emit,
    fresh_dir,
    log,
    machine,
    median,
    run_child,
    shapes_folder,
)

SETTINGS = {"1 process": [], "2 processes": ["--nproc", "2"]}


def _window(cmd: list[str], env: dict[str, str], run: Path, logs: Path) -> dict[str, Any]:
    code, wall, _ = run_child(cmd, env, logs / "stdout.txt", logs / "stderr.txt")
    if code != 0:
        tail = (logs / "stderr.txt").read_text()[-2000:]
        raise SystemExit(f"error: {' '.join(cmd)} exited {code}:\n{tail}")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "images_per_second": summary["images_per_second"],
        "train_wall_seconds": summary["wall_seconds"],
        "process_wall_seconds": wall,
        "best_val_acc": summary["best_val_acc"],
        "world_size": summary["world_size"],
        "precision": summary["precision"],
    }


def main() -> None:
    # ------------------------------------------------------------------------------- Setup
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per setting")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per window")
    parser.add_argument("--count", type=int, default=400, help="shapes per class")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--quick", action="store_true", help="1 window of 1 epoch, 60 per class")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.count = 1, 1, 60
    info = machine()

    # -------------------------------------------------------------------------------- Data
    folder = shapes_folder(args.count, size=64)  # the default model's input size
    env = dict(os.environ, CNNKIT_CACHE_DIR=str(fresh_dir(BENCH_DIR / "cache-distributed")))
    env.pop("OMP_NUM_THREADS", None)  # 1 process: every core; 2: launch_torchrun splits them
    runs = fresh_dir(BENCH_DIR / "runs-distributed")
    base = [*cnnkit_command(), "train", str(folder), "--epochs", str(args.epochs)]
    base += ["--batch-size", str(args.batch_size), "--seed", "0", "--vflip", "--quiet"]

    def window(name: str, label: str) -> dict[str, Any]:
        run = runs / name
        cmd = [*base, "--out", str(run), "--overwrite", *SETTINGS[label]]
        return _window(cmd, env, run, fresh_dir(runs / f"{name}-logs"))

    # ---------------------------------------------------------------------------- Training
    log("warm-up: one untimed window per setting (decode cache, page cache)")
    for i, label in enumerate(SETTINGS):
        window(f"warmup{i}", label)
    windows: dict[str, list[dict[str, Any]]] = {label: [] for label in SETTINGS}
    for repeat in range(1, args.repeats + 1):
        for i, label in enumerate(SETTINGS):
            w = window(f"w{repeat}-{i}", label)
            windows[label].append(w)
            log(
                f"window {repeat}/{args.repeats} {label}: {w['images_per_second']:.0f} img/s, "
                f"process {w['process_wall_seconds']:.1f}s"
            )

    # -------------------------------------------------------------------------- Evaluation
    rows = {}
    for label, ws in windows.items():
        rows[label] = {
            "world_size": ws[0]["world_size"],
            "precision": ws[0]["precision"],
            **{
                key: round(median([w[key] for w in ws]), 3)
                for key in (
                    "images_per_second",
                    "train_wall_seconds",
                    "process_wall_seconds",
                    "best_val_acc",
                )
            },
            "windows_images_per_second": [w["images_per_second"] for w in ws],
        }
    one, two = rows["1 process"], rows["2 processes"]
    emit(
        {
            "benchmark": "distributed",
            "quick": args.quick,
            "machine": info,
            "data": {"folder": str(folder), "images": 3 * args.count, "image_size": 64},
            "settings": {
                "model": "fast",
                "epochs": args.epochs,
                "global_batch": args.batch_size,
                "repeats": args.repeats,
            },
            "timed": "median of the windows; images_per_second and train_wall_seconds from "
            "summary.json (training steps / the train function), process_wall_seconds fork "
            "to exit of the whole command",
            "results": rows,
            "speedup_images_per_second_2_over_1": round(
                two["images_per_second"] / one["images_per_second"], 2
            ),
            "process_wall_ratio_2_over_1": round(
                two["process_wall_seconds"] / one["process_wall_seconds"], 2
            ),
        }
    )


if __name__ == "__main__":
    main()
