"""Threads that fit the machine: affinity, cgroup quotas, OMP_NUM_THREADS, --threads, and the
CPUs other work leaves free, read from fake /proc and /sys trees."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.errors import ConfigError
from cnnkit.threads import (
    CpuSample,
    allowed_cpus,
    cgroup_cpu_quota,
    cpu_limit,
    fit_threads,
    others_busy,
    sample_cpus,
)


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# ------------------------------------------------------------------------- cgroup quotas


def test_cgroup_v2_quota_is_the_tightest_on_the_way_up(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/app/worker\n",
            "sys/fs/cgroup/cpu.max": "max 100000\n",
            "sys/fs/cgroup/app/cpu.max": "150000 100000\n",  # the parent: 1.5 CPUs
            "sys/fs/cgroup/app/worker/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 1.5
    (root / "sys/fs/cgroup/app/worker/cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(root) == 0.5


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "proc/self/cgroup": "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 3.0
    (root / "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(root) is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None  # no /proc, no /sys: no quota


def test_inside_a_container_the_mount_is_the_process_s_own_cgroup(tmp_path: Path) -> None:
    """In a cgroup namespace /proc/self/cgroup may name a path that does not exist below the
    mount: the quota on the mount itself is the container's."""
    root = _tree(
        tmp_path,
        {"proc/self/cgroup": "0::/../../host/path\n", "sys/fs/cgroup/cpu.max": "200000 100000"},
    )
    assert cgroup_cpu_quota(root) == 2.0


# ------------------------------------------------------------------------------- the limit


def test_the_limit_is_the_fewest_of_affinity_quota_and_omp(tmp_path: Path) -> None:
    quota = _tree(
        tmp_path / "q",
        {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "250000 100000\n"},
    )
    eight = set(range(8))
    assert cpu_limit(tmp_path / "none", {}, eight) == (8, ["8 CPUs allowed by affinity"])
    assert cpu_limit(quota, {}, eight) == (3, ["cgroup quota of 2.5 CPUs"])  # rounded up
    assert cpu_limit(quota, {"OMP_NUM_THREADS": "2"}, eight) == (2, ["OMP_NUM_THREADS=2"])
    assert cpu_limit(quota, {"OMP_NUM_THREADS": "4,2"}, {0, 1})[0] == 2  # affinity
    assert cpu_limit(quota, {"OMP_NUM_THREADS": "lots"}, eight)[0] == 3  # not a count: ignored


def test_threads_asked_for_win_and_are_applied(tmp_path: Path) -> None:
    plan = fit_threads(3, env={"OMP_NUM_THREADS": "1"}, affinity={0})
    assert plan.threads == 3 and torch.get_num_threads() == 3
    plan = fit_threads(None, env={"OMP_NUM_THREADS": "1"}, affinity={0, 1, 2, 3})
    assert (plan.threads, plan.reason) == (1, "OMP_NUM_THREADS=1")
    assert torch.get_num_threads() == 1
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="threads: expected a positive integer"):
            fit_threads(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- other work's load


def _stat(busy: list[int], idle: list[int]) -> str:
    """/proc/stat with ``busy`` user ticks and ``idle`` idle ticks per CPU."""
    total = f"cpu {sum(busy)} 0 0 {sum(idle)} 0 0 0 0 0 0\n"
    pairs = enumerate(zip(busy, idle, strict=True))
    lines = [f"cpu{i} {b} 0 0 {d} 0 0 0 0 0 0\n" for i, (b, d) in pairs]
    return total + "".join(lines) + "intr 5 0\nctxt 9\n"


def test_others_busy_subtracts_this_process_s_own_time() -> None:
    before = CpuSample(0.0, busy=1000, total=2000, own=5.0, cpus=2)
    after = CpuSample(1.0, busy=1150, total=2200, own=5.5, cpus=2)  # 100 ticks per CPU
    # 150 busy ticks, 50 of them (0.5 s at 100 Hz) this process's: others used half a CPU
    assert others_busy(before, after, 100.0) == pytest.approx(1.0)
    assert others_busy(before, dataclasses.replace(after, own=9.0), 100.0) == 0.0  # clamped
    assert others_busy(before, before, 100.0) == 0.0


def test_sample_reads_only_the_cpus_the_process_may_use(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proc/stat": _stat([10, 20, 30], [1, 2, 3])})
    sample = sample_cpus(root, {0, 2})
    assert sample is not None and (sample.busy, sample.total, sample.cpus) == (40, 44, 2)
    assert sample_cpus(tmp_path / "none", {0}) is None


@pytest.mark.parametrize(("busy_ticks", "expected"), [((0, 0), 2), ((100, 0), 1), ((95, 90), 1)])
def test_busy_cpus_get_no_thread(
    tmp_path: Path, busy_ticks: tuple[int, int], expected: int
) -> None:
    """Over a window of 100 ticks a CPU: other work on one of two CPUs (or on both) leaves one
    thread; quiet CPUs keep both. (This process used almost no CPU in between.)"""
    root = _tree(tmp_path, {"proc/stat": _stat([0, 0], [0, 0])})
    before = sample_cpus(root, {0, 1})
    assert before is not None
    before = dataclasses.replace(before, when=time.monotonic() - 1)  # no waiting
    idle = [100 - b for b in busy_ticks]
    (root / "proc/stat").write_text(_stat(list(busy_ticks), idle))
    plan = fit_threads(None, since=before, root=root, env={}, affinity={0, 1}, apply=False)
    assert plan.threads == expected
    if expected == 1:
        assert "other work is using" in plan.reason
    fixed = fit_threads(None, adapt=False, since=before, root=root, env={}, affinity={0, 1})
    assert fixed.threads == 2  # deterministic runs do not look at the load


# --------------------------------------------------------------------------- in training


def test_training_keeps_to_the_limit_and_records_its_threads(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    result = cnnkit.train(tiny_shapes, tmp_path / "a", image_size=16, epochs=1, batch_size=8)
    assert result.threads == 1 == torch.get_num_threads()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["threads"] == 1
    out = tmp_path / "b"
    args = ["train", str(tiny_shapes), "--out", str(out), "--epochs", "1", "--threads", "2"]
    run = CliRunner().invoke(app, [*args, "--image-size", "16", "--batch-size", "8", "--quiet"])
    assert run.exit_code == 0, run.output
    assert json.loads((out / "summary.json").read_text())["threads"] == 2  # the flag wins
    assert "threads: 2" in (out / "config.yaml").read_text()


def test_the_affinity_is_read_when_nothing_else_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {3}, raising=False)
    assert cpu_limit(Path("/nonexistent"))[0] == 1
    assert fit_threads(None).threads == 1


def test_one_count_of_allowed_cpus_for_threads_workers_and_torchrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decode cache's workers and torchrun's per-process threads count what
    ``allowed_cpus`` says; without an affinity call (macOS) that is every CPU."""
    import cnnkit.data.cache as cache_mod
    import cnnkit.training.distributed as distributed

    assert cache_mod.allowed_cpus is distributed.allowed_cpus is allowed_cpus
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert allowed_cpus() == {0, 1, 2, 3, 4}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_limit(Path("/nonexistent"))[0] == 5


# -------------------------------------------------------------------------- in inference


def test_inference_lowers_threads_to_the_limit_and_never_raises_them(
    tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's default counts the machine's cores; a loaded model (run directory, ONNX,
    pt2) keeps to what affinity, a quota or OMP_NUM_THREADS allow."""
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    cnnkit.train(tiny_shapes, run, image_size=16, epochs=1, batch_size=8, progress=False)
    from cnnkit.export import export_onnx, export_pt2, load_predictor

    onnx = export_onnx(run, tmp_path / "m.onnx", check_images=4).path
    pt2 = export_pt2(run, tmp_path / "m.pt2", check_images=4).path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    cnnkit.load(run)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    session = load_predictor(onnx).session
    assert session.get_session_options().intra_op_num_threads == 1
    torch.set_num_threads(2)
    load_predictor(pt2)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    cnnkit.load(run)
    assert torch.get_num_threads() == 1  # a lower count set by the user stays
