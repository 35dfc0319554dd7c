"""What every benchmark script shares: where data lives, the machine, timing and JSON output.

The benchmarks run as ``.venv/bin/python bench/<name>.py``, so this folder is on ``sys.path``
and ``import benchlib`` works. Data sets are generated or unpacked under ``CNNKIT_BENCH_DIR``
(default ``/tmp/cnnkit-bench``), never inside the repository.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("CNNKIT_BENCH_DIR", "/tmp/cnnkit-bench"))
DATASETS = Path(os.environ.get("CNNKIT_DATASETS", REPO.parent / "shared" / "datasets"))
TARBALLS = {"mnist": "mnist-png.tar.gz", "cifar10": "cifar10-jpg.tar.gz"}

# ------------------------------------------------------------------------------ output


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the one JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the result; the load average at the end says how busy the machine was."""
    result.setdefault("machine", {})["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


def machine() -> dict[str, Any]:
    """The machine a figure was taken on, and how busy it was when the script started."""
    import torch

    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -------------------------------------------------------------------------------- data


def shapes_folder(count: int, size: int = 128, seed: int = 0, style: str = "cnnkit") -> Path:
    """The generated circles/squares/triangles, ``count`` per class; made once, then reused.

    Written to a temporary name and renamed, so a half-written folder is never reused; the
    name carries the drawing's version (and a style other than cnnkit's), so a changed
    drawing is generated afresh.
    """
    from cnnkit.data.shapes import SHAPES_VERSION, generate_shapes

    styled = "" if style == "cnnkit" else f"-{style}"
    folder = BENCH_DIR / f"shapes-v{SHAPES_VERSION}{styled}-{count}x{size}-s{seed}"
    if not folder.is_dir():
        log(f"generating {3 * count} {style} shapes ({size}x{size}) in {folder}")
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_shapes(tmp, count=count, size=size, seed=seed, style=style)
        tmp.rename(folder)
    return folder


def unpacked(name: str, per_class: int | None = None) -> Path:
    """``mnist`` or ``cifar10`` unpacked (``train/<class>/*``, ``test/<class>/*``).

    ``per_class`` keeps only the first that many files of each class in each split (a quick
    subset, read from the archive without unpacking the rest).
    """
    archive = DATASETS / TARBALLS[name]
    if not archive.is_file():
        raise SystemExit(f"error: {archive} not found (set CNNKIT_DATASETS to its folder)")
    folder = BENCH_DIR / (name if per_class is None else f"{name}-first{per_class}")
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"unpacking {archive.name} into {folder}")
    if per_class is None:
        subprocess.run(["tar", "xzf", str(archive), "-C", str(tmp)], check=True)
    else:
        taken: dict[str, int] = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                folder_of = str(Path(member.name).parent)  # "train/3"
                if member.isfile() and taken.get(folder_of, 0) < per_class:
                    taken[folder_of] = taken.get(folder_of, 0) + 1
                    tar.extract(member, tmp, filter="data")
    tmp.rename(folder)
    return folder


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------- training


def cnnkit_train(
    model: str,
    data: Path,
    out: Path,
    *,
    epochs: int,
    precision: str = "auto",
    augment: bool = True,
    cache_dir: Path | None = None,
) -> Any:
    """One call of cnnkit's real training loop (``cnnkit.training.loop.train``).

    Its ``images_per_second`` counts the training steps only (batch gather, normalise,
    augment, forward, backward, optimiser step), not data preparation, validation or saving.
    """
    from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
    from cnnkit.training.loop import train

    config = RunConfig(
        model=model,
        data=DataConfig(path=str(data), cache_dir=str(cache_dir) if cache_dir else None),
        augment=AugmentConfig(enabled=augment, vflip=True),  # shapes: upside down is fine
        train=TrainConfig(epochs=epochs, precision=precision),
    )
    return train(config, out, overwrite=True, progress=False)


# --------------------------------------------------------------------- child processes


def run_child(
    cmd: Sequence[str],
    env: dict[str, str],
    stdout: Path,
    stderr: Path | None = None,
    usage: dict[str, float] | None = None,
) -> tuple[int, float, float]:
    """Run ``cmd`` to completion: (exit code, wall seconds, peak RSS in MB of that child).

    Wall time runs from just before the fork to the child's exit, so it includes interpreter
    start-up and imports. Peak RSS is ``ru_maxrss`` from ``os.wait4`` on this one child,
    unlike ``RUSAGE_CHILDREN``, which is a maximum over every child so far. Output goes to
    files (``stderr`` None: into ``stdout``), so a full pipe can never stall the child.
    ``usage``, when given, receives the child's ``cpu_seconds`` (user + system).
    """
    with open(stdout, "w") as out, open(stderr or os.devnull, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=err if stderr else subprocess.STDOUT
        )
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if usage is not None:
        usage["cpu_seconds"] = rusage.ru_utime + rusage.ru_stime
    return proc.returncode, wall, rusage.ru_maxrss / 1024  # Linux: KiB


@dataclass
class Contender:
    """One command of an alternating comparison, and how to read the result of a run."""

    command: list[str]
    out: Path  # run directory (cnnkit) or JSON output (peer): removed before every run
    read: Callable[[Path], dict[str, object]]  # out -> the figures of the run
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cold_cache: Path | None = None  # emptied before every run: every image decoded again
    warm_up: bool = True  # also run in the unkept first round


def alternate(contenders: dict[str, Contender], repeats: int) -> dict[str, list[dict]]:
    """Run every contender once per round, ``repeats`` rounds after one unkept round (it
    fills the warm caches, the OS file cache and Python's bytecode caches; contenders
    without ``warm_up`` sit it out), the order turning by one each round so that changing
    load falls on all of them alike."""
    runs: dict[str, list[dict]] = {label: [] for label in contenders}
    labels = list(contenders)
    for round_ in range(repeats + 1):
        turn = round_ % len(labels)
        for label in labels[turn:] + labels[:turn]:
            c = contenders[label]
            if round_ == 0 and not c.warm_up:
                continue
            if c.cold_cache is not None:
                fresh_dir(c.cold_cache)
            if c.out.is_dir():
                shutil.rmtree(c.out)
            c.out.unlink(missing_ok=True)
            output = c.out.with_name(c.out.name + ".log")
            output.parent.mkdir(parents=True, exist_ok=True)
            load = round(os.getloadavg()[0], 2)
            json_out = c.out if c.out.suffix == ".json" else output
            stderr = output if json_out != output else None
            usage: dict[str, float] = {}
            rc, wall, rss = run_child(c.command, c.env, json_out, stderr, usage)
            if rc != 0:
                sys.stderr.write(output.read_text()[-3000:])
                raise SystemExit(f"error: {label} exited with {rc} ({output})")
            row = {
                "wall_seconds": round(wall, 2),
                "cpu_seconds": round(usage["cpu_seconds"], 2),
                "peak_rss_mb": round(rss, 1),
                "load": load,
            }
            row.update(c.read(c.out))
            log(f"{label} ({'unkept' if round_ == 0 else round_}): {row}")
            if round_:
                runs[label].append(row)
    return runs


def cnnkit_command() -> list[str]:
    """The ``cnnkit`` console script next to this interpreter (``.venv/bin/cnnkit``)."""
    script = Path(sys.executable).parent / "cnnkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cnnkit"]
