"""What ``cnnkit train --live`` costs: training throughput with and without the live page.

Both modes run ``cnnkit.training.loop.train`` on the same generated shapes with the same
settings (benchlib's: default precision, batch 64, vertical flips). ``live`` also serves the
page (``serve.live.watch_training``, its ``epoch_end`` as the loop's ``on_epoch`` hook) and a
page is watching: a separate process follows ``/live/events`` as a browser would, so the
server renders every epoch's feature maps and JSON while the next epoch trains. Two measurements:

- windows: whole runs with and without the page, alternating (off, live, live, off, ...)
  after one untimed warm-up window each; per mode the median over ``--repeats`` windows of
  the loop's ``images_per_second`` (training steps only) and of images per second of the
  whole ``train`` call (validation, the hook and saving included). On a shared machine the
  load of other processes changes between windows far more than the page costs.
- paired epochs: one run of ``--paired-epochs`` epochs with the page watching, whose hook
  hands over every other epoch only, so the page's work (maps, JSON, sending) happens during
  the even epochs and not during the odd ones. Each even epoch is compared with the odd one
  that follows it, seconds apart, which cancels most of the drift in the machine's load;
  the estimate of the cost is the median extra time of an epoch with the page's work beside
  it plus the hook's own time (on the training thread, between epochs), over the median
  epoch without either.

Usage::

    .venv/bin/python bench/live.py [--quick] [--repeats 7] [--epochs 3] [--paired-epochs 31]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, emit, fresh_dir, log, machine, median, shapes_folder

# A page in its own process: counts the epoch events it gets, prints the count at the end.
WATCHER = """
import sys, httpx
count = 0
with httpx.Client(timeout=None) as client, client.stream("GET", sys.argv[1]) as response:
    for line in response.iter_lines():
        count += line == "event: epoch"
print(count)
"""


def server_cpu_seconds() -> float:
    """CPU time (user + system) used so far by the live server's threads: uvicorn's event
    loop and the worker threads it renders the maps on (Linux: /proc/self/task)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name == "cnnkit-server" or thread.name.startswith("asyncio_"):
            try:
                fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            except OSError:
                continue
            utime, stime = fields.rsplit(")", 1)[1].split()[11:13]
            total += (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    return total


def run_config(preset: str, folder: Path, epochs: int, cache: Path) -> Any:
    from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig

    return RunConfig(
        model=preset,
        data=DataConfig(path=str(folder), cache_dir=str(cache)),
        augment=AugmentConfig(vflip=True),
        train=TrainConfig(epochs=epochs),
    )


def watch(board: Any) -> subprocess.Popen:
    """A page in its own process, connected before training starts (as a user's would be)."""
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, board.url + "/events"], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not board.streams and time.monotonic() < deadline:
        time.sleep(0.05)
    return watcher


def timed_hook(board: Any, seconds: list[float], every: int = 1) -> Any:
    """``board.epoch_end`` for every ``every``-th epoch (from the first), timed."""

    def hook(row: dict, model: Any, data: Any) -> None:
        if (row["epoch"] - 1) % every == 0:
            start = time.perf_counter()
            board.epoch_end(row, model, data)
            seconds.append(time.perf_counter() - start)

    return hook


def window(preset: str, folder: Path, out: Path, epochs: int, cache: Path, live: bool) -> dict:
    """One training run; with ``live``, the page is served and watched by another process."""
    from cnnkit.serve.live import watch_training
    from cnnkit.training.loop import train

    config = run_config(preset, folder, epochs, cache)
    hook_seconds: list[float] = []
    watcher = None
    with watch_training(epochs) if live else contextlib.nullcontext() as board:
        hook = None
        if board is not None:
            watcher = watch(board)
            hook = timed_hook(board, hook_seconds)

        start = time.perf_counter()
        result = train(config, out, overwrite=True, progress=False, on_epoch=hook)
        wall = time.perf_counter() - start
        server_cpu = server_cpu_seconds() if board is not None else 0.0
    batch = min(config.train.batch_size, len(result.data.train))
    seen = len(result.data.train) // batch * batch * result.epochs_run  # whole batches only
    record = {
        "steps_images_per_second": result.images_per_second,
        "call_images_per_second": seen / wall,
        "wall_seconds": wall,
    }
    if watcher is not None:
        out_text, _ = watcher.communicate(timeout=60)
        record["page_epoch_events"] = int(out_text.strip() or 0)
        record["hook_ms"] = 1000 * median(hook_seconds)
        record["server_cpu_ms_per_epoch"] = 1000 * server_cpu / result.epochs_run
    return record


def paired_epochs(preset: str, folder: Path, out: Path, epochs: int, cache: Path) -> dict:
    """One run whose page gets every other epoch: even epochs run beside the page's work."""
    from cnnkit.serve.live import watch_training
    from cnnkit.training.loop import train

    hook_seconds: list[float] = []
    with watch_training(epochs) as board:
        watcher = watch(board)
        hook = timed_hook(board, hook_seconds, every=2)
        config = run_config(preset, folder, epochs, cache)
        result = train(config, out, overwrite=True, progress=False, on_epoch=hook)
        server_cpu = server_cpu_seconds()
    out_text, _ = watcher.communicate(timeout=60)
    seconds = {row["epoch"]: row["seconds"] for row in result.history}
    pairs = [(seconds[e], seconds[e + 1]) for e in range(2, epochs, 2) if e + 1 in seconds]
    beside = median([a for a, _ in pairs])  # epochs with the page's work beside them
    alone = median([b for _, b in pairs])
    extra = median([a - b for a, b in pairs])  # paired: the load drifts less within a pair
    hook = median(hook_seconds)
    return {
        "epochs": epochs,
        "pairs": len(pairs),
        "epoch_seconds_beside_the_page_median": round(beside, 4),
        "epoch_seconds_alone_median": round(alone, 4),
        "extra_seconds_per_epoch_median": round(extra, 4),
        "hook_ms_median": round(1000 * hook, 3),
        "server_cpu_ms_per_page_epoch": round(1000 * server_cpu / len(hook_seconds), 3),
        "estimated_slower_percent": round(100 * (extra + hook) / alone, 2),
        "page_epoch_events": int(out_text.strip() or 0),
        "pairs_seconds": [[round(a, 4), round(b, 4)] for a, b in pairs],
    }


def main() -> None:
    # ------------------------------------------------------------------------------- Setup
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed windows per mode")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per window")
    parser.add_argument("--count", type=int, default=400, help="shapes per class")
    parser.add_argument("--paired-epochs", type=int, default=31, help="epochs of the paired run")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--quick", action="store_true", help="1 window of 1 epoch, 20 per class")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.count, args.paired_epochs = 1, 1, 20, 5
    info = machine()
    folder = shapes_folder(args.count)
    cache = fresh_dir(BENCH_DIR / "cache-live")
    runs = BENCH_DIR / "runs-live"

    # ---------------------------------------------------------------------------- Training
    log("warm-up: one untimed window per mode (decode cache, kernels, allocator, server)")
    for live in (False, True):
        window(args.preset, folder, runs / "warm", 1, cache, live)
    windows: dict[str, list[dict]] = {"off": [], "live": []}
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for live in order:
            mode = "live" if live else "off"
            record = window(args.preset, folder, runs / mode, args.epochs, cache, live)
            windows[mode].append(record)
            log(f"window {repeat + 1}/{args.repeats} {mode}: "
                f"{record['steps_images_per_second']:.0f} img/s (steps), "
                f"{record['call_images_per_second']:.0f} img/s (whole call)")  # fmt: skip

    log(f"paired epochs: one run of {args.paired_epochs}, the page gets every other epoch")
    paired = paired_epochs(args.preset, folder, runs / "paired", args.paired_epochs, cache)
    log(f"paired: {paired['estimated_slower_percent']}% slower (estimate)")

    # -------------------------------------------------------------------------- Evaluation
    def figure(mode: str, key: str) -> float:
        return median([w[key] for w in windows[mode]])

    summary = {}
    for key in ("steps_images_per_second", "call_images_per_second"):
        off, live = figure("off", key), figure("live", key)
        summary[key] = {
            "off": round(off, 1),
            "live": round(live, 1),
            "live_over_off": round(live / off, 4),
            "slower_percent": round(100 * (1 - live / off), 2),
            "off_windows": [round(w[key], 1) for w in windows["off"]],
            "live_windows": [round(w[key], 1) for w in windows["live"]],
        }
    events = [w["page_epoch_events"] for w in windows["live"]]
    emit(
        {
            "benchmark": "live",
            "quick": args.quick,
            "machine": info,
            "preset": args.preset,
            "data": {"folder": str(folder), "images": 3 * args.count},
            "repeats": args.repeats,
            "epochs_per_window": args.epochs,
            "timed": "median over windows of cnnkit.training.loop.train: steps = its "
            "images_per_second (training steps only); call = training images seen / wall "
            "time of the whole call (validation, the live hook and saving included); live = "
            "watch_training's page served and followed by a separate process",
            "throughput": summary,
            "hook_ms_median": round(median([w["hook_ms"] for w in windows["live"]]), 3),
            "server_cpu_ms_per_epoch_median": round(
                median([w["server_cpu_ms_per_epoch"] for w in windows["live"]]), 3
            ),
            "off_seconds_per_epoch_median": round(
                median([w["wall_seconds"] for w in windows["off"]]) / args.epochs, 3
            ),
            "page_got_every_epoch": all(n == args.epochs for n in events),
            "paired_epochs": paired,
            "target": "at most 3% lower throughput with --live",
        }
    )


if __name__ == "__main__":
    main()
