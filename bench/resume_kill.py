"""Kill a training run 20 times at random points, resume it each time, compare with no kills.

Runs ``cnnkit train`` (CPU, ``--deterministic``, a checkpoint every step) on a tiny generated
shapes folder twice: once without interruption (the reference), once as a chain of processes
each killed with SIGKILL and continued with ``cnnkit train --resume RUN``. Each kill is one of:

- ``write``: inside a checkpoint write, run through ``tests/faults.py checkpoint-write:N``
  (the process kills itself between the weights file and the state file of its N-th write);
- ``early``: at a random moment before the process wrote a checkpoint (imports, data
  preparation, loading the checkpoint, the first steps), or right after its first one;
- ``training``: at a random moment within about one checkpoint interval after one or more
  new checkpoints (more when many are left, so the kills spread over the whole run).

Kinds that make no progress are chosen when the run is near its end, so every planned kill
lands before training finishes. A run killed before it wrote ``config.yaml`` is started again
with its original command (what a user would do); one with ``config.yaml`` is resumed. At the
end the best weights (``model.safetensors``), the last checkpoint's weights and the metrics
(without timings) must equal the reference's exactly. Usage::

    .venv/bin/python bench/resume_kill.py [--kills 20] [--seed 0] [--one-core] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchlib import BENCH_DIR, REPO, cnnkit_command, emit, fresh_dir, log, machine, shapes_folder


def newest(run: Path) -> int:
    """Sequence number of the newest checkpoint folder (0 when none)."""
    folder = run / "checkpoints"
    seqs = [int(p.name.split("-")[1]) for p in folder.glob("ckpt-*")] if folder.is_dir() else []
    return max(seqs, default=0)


def half_written(run: Path) -> bool:
    return any((run / "checkpoints").glob(".tmp-*")) if (run / "checkpoints").is_dir() else False


def compare(run: Path, reference: Path) -> list[str]:
    """What differs between two finished runs (empty: bit-identical)."""
    import torch
    from safetensors.torch import load_file

    def last_checkpoint(r: Path) -> Path:
        return max((r / "checkpoints").glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))

    diffs = []
    pairs = {
        "best": (run / "model.safetensors", reference / "model.safetensors"),
        "last": tuple(last_checkpoint(r) / "model.safetensors" for r in (run, reference)),
    }
    for label, (a, b) in pairs.items():
        ta, tb = load_file(str(a)), load_file(str(b))
        for name in sorted(set(ta) | set(tb)):
            if name not in ta or name not in tb or not torch.equal(ta[name], tb[name]):
                diffs.append(f"{label}: {name}")

    def metrics(r: Path) -> list[list[str]]:
        rows = [line.split(",") for line in (r / "metrics.csv").read_text().splitlines()]
        cut = rows[0].index("seconds")
        return [row[:cut] + row[cut + 1 :] for row in rows]

    if metrics(run) != metrics(reference):
        diffs.append("metrics.csv")
    return diffs


def main() -> None:
    # ------------------------------------------------------------------------------- Setup
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--count", type=int, default=30, help="shapes per class (16x16)")
    parser.add_argument("--one-core", action="store_true", help="pin every process to one core")
    parser.add_argument("--quick", action="store_true", help="3 kills, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.epochs = 3, 2
    rng = random.Random(args.seed)
    info = machine()
    start = time.perf_counter()
    data = shapes_folder(args.count, size=16)
    root = fresh_dir(BENCH_DIR / "runs-resume-kill")
    run, reference = root / "run", root / "reference"
    options = [
        "--image-size", "16", "--epochs", str(args.epochs), "--batch-size", "8",
        "--checkpoint-every", "1", "--deterministic", "--precision", "fp32", "--device", "cpu",
        "--quiet",
    ]  # fmt: skip
    cnnkit = cnnkit_command()
    first = [*cnnkit, "train", str(data), "--out", str(run), *options]
    resume = [*cnnkit, "train", "--resume", str(run), "--quiet"]
    core = min(os.sched_getaffinity(0))

    def start_process(cmd: list[str], cache: str, fault: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "CNNKIT_CACHE_DIR": str(BENCH_DIR / cache), "MPLBACKEND": "Agg"}
        if fault:  # the same arguments, through tests/faults.py (python, not the cnnkit script)
            cmd = [sys.executable, str(REPO / "tests" / "faults.py"), fault, *cmd[len(cnnkit) :]]
        pin = (lambda: os.sched_setaffinity(0, {core})) if args.one_core else None
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=pin,
        )  # fmt: skip

    # ----------------------------------------------------------------------- Reference run
    fresh_dir(BENCH_DIR / "cache-resume-kill-ref")
    fresh_dir(BENCH_DIR / "cache-resume-kill-chain")
    log("uninterrupted reference run")
    t0 = time.perf_counter()
    proc = start_process(
        [*cnnkit_command(), "train", str(data), "--out", str(reference), *options],
        "cache-resume-kill-ref",
    )
    stamps = []  # when each checkpoint appeared
    while proc.poll() is None:
        seq = newest(reference)
        if seq > len(stamps):
            stamps += [time.perf_counter() - t0] * (seq - len(stamps))
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"error: the reference run failed: {proc.stderr.read()}")
    reference_seconds = time.perf_counter() - t0
    total = newest(reference)
    to_first = stamps[0]
    interval = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    log(f"{total} checkpoints; first after {to_first:.1f}s, then every {interval:.2f}s")

    # -------------------------------------------------------------------- Kill and resume
    kinds: Counter[str] = Counter()
    inside_write = starts = resumes = 0
    positions: list[int] = []  # the newest checkpoint at each kill
    t0 = time.perf_counter()
    for k in range(args.kills):
        left = total - newest(run)  # checkpoints still to write
        near_end = left <= 2 * (args.kills - k)  # then only kinds that cost (almost) no progress
        kind = rng.choice(
            ["write", "early"] if near_end else ["write", "early", "training", "training"]
        )
        fault = (
            f"checkpoint-write:{1 if near_end else rng.randint(1, 2)}" if kind == "write" else None
        )
        if (run / "config.yaml").is_file():
            cmd, resumes = resume, resumes + 1
        else:  # killed before the run wrote its config: start it again, as a user would
            cmd, starts = first + (["--overwrite"] if run.exists() else []), starts + 1
        before = newest(run)
        proc = start_process(cmd, "cache-resume-kill-chain", fault)
        if kind == "early":  # a random moment, but no later than its first checkpoint
            deadline = time.perf_counter() + rng.uniform(0.0, to_first)
            while time.perf_counter() < deadline and newest(run) == before:
                time.sleep(0.002)
        elif kind == "training":  # after a few checkpoints, so the kills spread over the run
            target = before + rng.randint(1, max(1, (left - (args.kills - k)) // (args.kills - k)))
            while newest(run) < target and proc.poll() is None:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, interval))
        if kind != "write":
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == 0:
            log(f"the run finished before kill {k + 1}; stopping the kills there")
            break
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"error: kill {k + 1} ({kind}): exit {proc.returncode}: {err[-400:]}")
        kinds[kind] += 1
        inside_write += half_written(run)
        positions.append(newest(run))
        log(f"kill {k + 1}/{args.kills} ({kind}): checkpoint {before} -> {newest(run)} of {total}")
    restart = not (run / "config.yaml").is_file()
    final = start_process(
        first + (["--overwrite"] if run.exists() else []) if restart else resume,
        "cache-resume-kill-chain",
    )
    _, err = final.communicate()
    starts, resumes = starts + restart, resumes + (not restart)
    if final.returncode != 0:
        raise SystemExit(f"error: the final resume failed ({final.returncode}): {err.strip()}")
    chain_seconds = time.perf_counter() - t0

    # -------------------------------------------------------------------------- Compare
    differences = compare(run, reference)
    emit(
        {
            "benchmark": "resume_kill",
            "kills": sum(kinds.values()),
            "kills_by_kind": dict(kinds),
            "kills_leaving_a_half_written_checkpoint": inside_write,
            "planned_kills": args.kills,
            "resumes": resumes,
            "starts": starts,  # 1 + restarts of runs killed before they wrote config.yaml
            "identical": not differences,
            "differences": differences[:20],
            "checkpoints_per_run": total,
            "newest_checkpoint_at_each_kill": positions,
            "settings": {
                "epochs": args.epochs,
                "images": 3 * args.count,
                "seed": args.seed,
                "one_core": args.one_core,
            },
            "reference_seconds": round(reference_seconds, 2),
            "chain_seconds": round(chain_seconds, 2),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
