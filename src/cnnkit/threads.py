"""How many threads torch should compute with: no more than the CPUs this process may use and
other work leaves free.

The CPUs a process may use are the fewest of: its affinity (``taskset``, a cpuset), a cgroup
v1 or v2 CPU quota (a container's ``--cpus``), and ``OMP_NUM_THREADS``. An explicit count
(``--threads N``) overrides them all.

Why fewer threads when other work is running: torch's CPU kernels run in OpenMP parallel
regions that end in a barrier, so every step waits for its slowest thread. Beside one busy
process on two cores, one of two threads shares its core and is descheduled for whole
scheduler slices (milliseconds) while the other spins at the barrier; a small training then
kept 29% of its quiet throughput, and at low priority an MNIST epoch took 76 s instead of
8 s on one thread (``bench/contention.py``, ``bench/RESULTS.md``). One thread per CPU that is
really free avoids the lock-step. The CPU time other processes use is read from
``/proc/stat`` (this process's own time subtracted) over a short window before training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit.errors import ConfigError

__all__ = [
    "CpuSample",
    "ThreadPlan",
    "allowed_cpus",
    "cap_threads",
    "cgroup_cpu_quota",
    "cpu_limit",
    "fit_threads",
    "others_busy",
    "sample_cpus",
]

log = logging.getLogger("cnnkit")
MIN_WINDOW = 0.1  # seconds of /proc/stat to read: 10 clock ticks a CPU at the usual 100 Hz
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class ThreadPlan:
    """The thread count chosen and, in words, why."""

    threads: int
    reason: str


# ------------------------------------------------------------------ what the process may use


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on: its affinity (``taskset``, a cpuset), or every CPU
    where the system has none (macOS). cnnkit's one place that asks; ``cpu_limit`` adds the
    cgroup quota and ``OMP_NUM_THREADS`` to it."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity; every CPU
        return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota_v2(folder: Path) -> float | None:
    """``cpu.max`` holds ``max 100000`` (no limit) or ``QUOTA PERIOD`` in microseconds."""
    parts = (_read(folder / "cpu.max") or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 without a limit; ``cpu.cfs_period_us`` its period."""
    try:
        quota = int(_read(folder / "cpu.cfs_quota_us") or "-1")
        period = int(_read(folder / "cpu.cfs_period_us") or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _up_from(mount: Path, inner: str) -> list[Path]:
    """The cgroup folder of this process and every folder above it, up to the mount point.

    A parent's limit applies to its children. Inside a container the process's path may not
    exist under the mount (its own cgroup is the root there), so the mount itself counts.
    """
    folder = mount / inner.strip("/")
    folders = []
    while True:
        folders.append(folder)
        if folder == mount or mount not in folder.parents:
            break
        folder = folder.parent
    if mount not in folders:
        folders.append(mount)
    return [f for f in folders if f.is_dir()]


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The tightest cgroup CPU quota on this process, in CPUs (1.5 = one and a half), or None.

    Reads ``/proc/self/cgroup`` and then ``cpu.max`` (cgroup v2) or ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (v1) in the process's cgroup and each one above it. ``root`` stands
    for ``/`` (tests point it at a fake tree).
    """
    text = _read(root / "proc/self/cgroup") or ""
    quotas: list[float] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, inner = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: "0::/path"
            for folder in _up_from(root / "sys/fs/cgroup", inner):
                quotas += [q for q in [_quota_v2(folder)] if q is not None]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for name in V1_CPU_DIRS:
                mount = root / "sys/fs/cgroup" / name
                if mount.is_dir():
                    for folder in _up_from(mount, inner):
                        quotas += [q for q in [_quota_v1(folder)] if q is not None]
                    break
    return min(quotas) if quotas else None


def _omp_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a count (its first entry: ``4,2`` is a nested list), or None."""
    value = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpu_limit(
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    affinity: set[int] | None = None,
) -> tuple[int, list[str]]:
    """(CPUs this process may use, one phrase per limit that applies): the fewest of its
    affinity, a cgroup quota (rounded up: 1.5 CPUs keep two threads busy three quarters of
    the time) and ``OMP_NUM_THREADS``."""
    env = os.environ if env is None else env
    cpus = affinity if affinity is not None else allowed_cpus()
    limits = [(len(cpus), f"{len(cpus)} CPU{'s' if len(cpus) != 1 else ''} allowed by affinity")]
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        limits.append((max(1, math.ceil(quota - 1e-9)), f"cgroup quota of {quota:g} CPUs"))
    omp = _omp_threads(env)
    if omp is not None:
        limits.append((omp, f"OMP_NUM_THREADS={omp}"))
    least = min(n for n, _ in limits)
    return least, [why for n, why in limits if n == least]


# ------------------------------------------------------------------- what other work is using


@dataclass(frozen=True)
class CpuSample:
    """Clock ticks of the allowed CPUs and this process's own CPU time, at one moment."""

    when: float  # time.monotonic()
    busy: int  # ticks the allowed CPUs spent running anything (or stolen by a hypervisor)
    total: int  # all ticks of the allowed CPUs
    own: float  # CPU seconds of this process and its finished children
    cpus: int  # how many of the allowed CPUs /proc/stat listed


def sample_cpus(root: Path = Path("/"), affinity: set[int] | None = None) -> CpuSample | None:
    """Read ``/proc/stat`` for the CPUs this process may run on; None where there is none."""
    text = _read(root / "proc/stat")
    if text is None:
        return None
    cpus = affinity if affinity is not None else allowed_cpus()
    busy = total = seen = 0
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue  # the "cpu" total, other counters, CPUs this process may not use
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        ticks = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
        idle = ticks[3] + ticks[4]
        busy += sum(ticks) - idle
        total += sum(ticks)
        seen += 1
    if not seen:
        return None
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return CpuSample(time.monotonic(), busy, total, own, seen)


def others_busy(before: CpuSample, after: CpuSample, ticks_per_second: float) -> float:
    """CPUs' worth of time that other processes used between two samples (0 to the count)."""
    elapsed = (after.total - before.total) / max(after.cpus, 1)  # ticks per CPU
    if elapsed <= 0:
        return 0.0
    mine = (after.own - before.own) * ticks_per_second
    others = (after.busy - before.busy - mine) / elapsed
    return min(max(others, 0.0), float(after.cpus))


# --------------------------------------------------------------------------------- choice


def fit_threads(
    requested: int | None = None,
    *,
    adapt: bool = True,
    since: CpuSample | None = None,
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    affinity: set[int] | None = None,
    apply: bool = True,
) -> ThreadPlan:
    """Choose torch's intra-op thread count, set it (``apply``) and log it.

    ``requested`` wins. Otherwise the count is ``cpu_limit``, lowered to the CPUs other work
    leaves free when ``adapt``: measured from ``since`` (a ``sample_cpus`` taken earlier, for
    example before loading the data) to now, waiting until at least ``MIN_WINDOW`` seconds
    have passed. Without ``adapt`` (deterministic runs, so that a resumed run computes with
    the same count) the load is not looked at.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"threads: expected a positive integer, got {requested!r}")
        plan = ThreadPlan(requested, "as asked (train.threads)")
    else:
        cpus = affinity if affinity is not None else allowed_cpus()
        limit, why = cpu_limit(root, env, cpus)
        plan = ThreadPlan(limit, ", ".join(why))
        if adapt and limit > 1:
            plan = _leave_room(plan, since, root, cpus)
    if apply and torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    log.info("%d thread%s: %s", plan.threads, "" if plan.threads == 1 else "s", plan.reason)
    return plan


def cap_threads() -> int:
    """Lower torch's intra-op threads to ``cpu_limit`` (affinity, cgroup quota,
    ``OMP_NUM_THREADS``) where they exceed it, never raise them; return the limit.

    For inference (``predict``, ``evaluate``, ``serve``, ``explore``, exports): torch's own
    default counts the machine's cores, not a container's quota. Training chooses with
    ``fit_threads``, which also looks at other work's load."""
    limit, why = cpu_limit()
    if torch.get_num_threads() > limit:
        torch.set_num_threads(limit)
        log.debug("%d thread%s: %s", limit, "" if limit == 1 else "s", ", ".join(why))
    return limit


def _leave_room(
    plan: ThreadPlan, since: CpuSample | None, root: Path, cpus: set[int]
) -> ThreadPlan:
    """``plan`` with no more threads than the CPUs that other processes leave free."""
    before = since or sample_cpus(root, cpus)
    if before is None:
        return plan
    wait = MIN_WINDOW - (time.monotonic() - before.when)
    if wait > 0:
        time.sleep(wait)
    after = sample_cpus(root, cpus)
    if after is None or after.cpus != before.cpus:
        return plan
    try:
        hz = float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        hz = 100.0
    others = others_busy(before, after, hz)
    free = math.floor(after.cpus - others + 0.5)
    if free >= plan.threads:
        return plan
    threads = max(1, free)
    return ThreadPlan(
        threads,
        f"{plan.reason}; other work is using {others:.1f} of the {after.cpus} CPUs it may run on "
        "(a thread on a busy CPU would stall the others at every step)",
    )
