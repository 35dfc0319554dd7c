"""Data-parallel training through torchrun: sharding, the 2-process gloo run, error paths.

The multi-process tests start the real launcher (``python -m torch.distributed.run`` and the
``cnnkit train --nproc`` shortcut) as subprocesses on a tiny generated data set. A launch is
mostly interpreter and torch start-up, so there are four, all started together by the
``jobs`` fixture and awaited by the tests that read them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import faults
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import CnnkitError, ConfigError
from cnnkit.evaluation import evaluate
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.training import distributed as ddp
from numerics import NEAR_TIE

RUN_FILES = (
    "config.yaml",
    "metrics.csv",
    "model.safetensors",
    "model.json",
    "summary.json",
    "curves.png",
)
# No batchnorm and no dropout, so a 2-process step computes the 1-process step exactly.
PLAIN_MODEL = """\
input_size: 16
layers:
  - conv: {filters: 8, kernel: 3}
  - relu
  - maxpool: {kernel: 2}
  - conv: {filters: 16, kernel: 3}
  - relu
  - gap
  - dense
"""
LAUNCH_TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite

# ------------------------------------------------------------------------------ helpers


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORLD_")}
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",  # two workers share two cores
        MPLBACKEND="Agg",
        CNNKIT_CACHE_DIR=str(tmp / "cache"),
        CNNKIT_DIST_TIMEOUT="60",
        **extra,
    )
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [*TORCHRUN, f"--nproc-per-node={nproc}", "-m", "cnnkit", "train", *args]


class Jobs:
    """Commands started at once, each in its own folder; ``result`` waits for one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._running: dict[str, subprocess.Popen] = {}
        self._done: dict[str, subprocess.CompletedProcess] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def run_dir(self, name: str) -> Path:
        return self.root / name / "runs" / "run"

    def start(self, name: str, cmd: list[str], **env: str) -> None:
        folder = self.folder(name)
        folder.mkdir(parents=True)
        # Output goes to files, so no pipe can fill up while nobody reads it.
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            self._running[name] = subprocess.Popen(
                cmd, env=_env(folder, **env), stdout=out, stderr=err
            )

    def result(self, name: str) -> subprocess.CompletedProcess:
        """The finished job; a job still running after ``LAUNCH_TIMEOUT_S`` fails the test."""
        if name not in self._done:
            proc = self._running.pop(name)
            try:
                proc.wait(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"{name}: still running after {LAUNCH_TIMEOUT_S} s (a hang)")
            out, err = ((self.folder(name) / f).read_text() for f in ("stdout", "stderr"))
            self._done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self._done[name]

    def stop_all(self) -> None:
        for proc in self._running.values():
            proc.kill()
            proc.wait()


def _metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _check_whole_validation_set(run: Path, data: Path) -> None:
    """The logged validation figures are those of the saved model on the WHOLE split."""
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in _metrics(run) if r["epoch"] == summary["best_epoch"])
    full = evaluate(run, data, split="val", precision="fp32", plot=False)
    assert full.count == 18  # 20% of 30 per class
    correct = best["val_acc"] * full.count
    assert correct == pytest.approx(round(correct), abs=1e-3)  # a count of images, not a mean
    # Training validated each rank's share of the images in other batches than this
    # evaluation: only an image whose top two classes are within rounding (tests/numerics.py)
    # may be scored differently.
    top2 = np.sort(full.probabilities, axis=1)[:, -2:]
    near_ties = int((top2[:, 1] - top2[:, 0] < NEAR_TIE).sum())
    assert abs(round(correct) - int((full.probabilities.argmax(1) == full.labels).sum())) <= (
        near_ties
    )
    assert best["val_loss"] == pytest.approx(full.loss, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 per class at 16x16: 72 training images (4 steps of 16, 8 left over), 18 validation."""
    return generate_shapes(tmp_path_factory.mktemp("ddp-shapes"), count=30, size=16, seed=0)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("ddp-model") / "plain.yaml"
    model.write_text(PLAIN_MODEL)
    return model


@pytest.fixture(scope="module")
def plain_args(shapes: Path, plain_model: Path) -> list[str]:
    # --target-accuracy 0 ends the run after epoch 1 of 3 on the reduced validation figures:
    # every rank must take that decision together, or one would wait forever for the others.
    return [
        str(shapes),
        *("--model", str(plain_model), "--image-size", "16", "--epochs", "3"),
        *("--batch-size", "16", "--lr", "0.01", "--target-accuracy", "0"),
        *("--precision", "fp32", "--deterministic", "--no-augment", "--quiet"),
    ]


def _tiny_split(folder: Path) -> Path:
    """2 training images (one per class) and 2 validation images."""
    generated = generate_shapes(folder / "generated", count=2, size=16, seed=0)
    for split, index in (("train", 0), ("val", 1)):
        for kind in ("circle", "square"):
            (folder / split / kind).mkdir(parents=True)
            src = generated / kind / f"{kind}_{index:05d}.png"
            (folder / split / kind / src.name).write_bytes(src.read_bytes())
    return folder


@pytest.fixture(scope="module")
def jobs(
    shapes: Path, plain_args: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Jobs]:
    """Every multi-process job of this file, started together (they are independent)."""
    root = tmp_path_factory.mktemp("ddp-jobs")
    jobs = Jobs(root)
    small = ["--image-size", "16", "--precision", "fp32"]
    # The 2-process run that a 1-process run must reproduce.
    jobs.start("plain", _torchrun(2, *plain_args, "--out", str(jobs.run_dir("plain"))))
    # The shortcut, on the default model (batchnorm) with augmentation; a global batch of
    # 15 cannot be split over 2 processes, so it is rounded down to 14.
    shortcut = [sys.executable, "-m", "cnnkit", "train", str(shapes), "--nproc", "2", *small]
    shortcut += ["--out", str(jobs.run_dir("shortcut")), "--epochs", "2", "--batch-size", "15"]
    jobs.start("shortcut", [*shortcut, "--deterministic", "--vflip"])
    # More processes than training images.
    tiny = _tiny_split(root / "tiny")
    jobs.start("world", _torchrun(3, str(tiny), "--out", str(jobs.run_dir("world")), *small))
    # Rank 1 fails at the end of epoch 1, while rank 0 waits for it in an all-reduce.
    fault = [str(shapes), "--out", str(jobs.run_dir("fault")), *small, "--epochs", "2"]
    failing = [*TORCHRUN, "--nproc-per-node=2", str(faults.FAULTS), "rank-fails:1", "train"]
    jobs.start("fault", [*failing, *fault, "--batch-size", "16"])
    yield jobs
    jobs.stop_all()


@pytest.fixture(scope="module")
def two_process_run(jobs: Jobs) -> tuple[Path, subprocess.CompletedProcess]:
    proc = jobs.result("plain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs.run_dir("plain"), proc


@pytest.fixture(scope="module")
def one_process_run(plain_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command in this process, without torchrun (global torch state restored)."""
    import cnnkit.cli

    tmp = tmp_path_factory.mktemp("ddp1")
    threads = torch.get_num_threads()
    old_cache = os.environ.get("CNNKIT_CACHE_DIR")
    os.environ["CNNKIT_CACHE_DIR"] = str(tmp / "cache")
    try:
        result = CliRunner().invoke(cnnkit.cli.app, ["train", *plain_args, "--out", str(tmp / "r")])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("CNNKIT_CACHE_DIR", None)
        else:
            os.environ["CNNKIT_CACHE_DIR"] = old_cache
    assert result.exit_code == 0, result.output
    return tmp / "r"


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("per_rank", [1, 3, 8])
@pytest.mark.parametrize("tail", ["none", "one", "all but one"])
def test_shards_cover_each_global_batch_once(world: int, per_rank: int, tail: str) -> None:
    global_batch = world * per_rank
    n = 5 * global_batch + {"none": 0, "one": 1, "all but one": global_batch - 1}[tail]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    shards = [ddp.shard_batches(order, global_batch, r, world) for r in range(world)]
    steps = n // global_batch
    for shard in shards:  # the same number of steps everywhere: no rank waits at a collective
        assert shard.shape == (steps, global_batch // world)
    # Step by step, the ranks' slices put together are exactly that global batch of the order.
    together = torch.cat(shards, dim=1)  # (steps, global_batch)
    assert torch.equal(together, order[: steps * global_batch].view(steps, global_batch))
    seen = torch.cat([s.flatten() for s in shards])
    assert len(set(seen.tolist())) == len(seen) == steps * global_batch  # disjoint, no repeats
    # The uneven tail (n % global_batch images) is left out on every rank alike.
    assert set(order[steps * global_batch :].tolist()).isdisjoint(seen.tolist())


def test_shards_are_deterministic_for_a_seed() -> None:
    def shards(seed: int) -> list[torch.Tensor]:
        order = torch.randperm(50, generator=torch.Generator().manual_seed(seed))
        return [ddp.shard_batches(order, 8, r, 2) for r in range(2)]

    first, again, other = shards(3), shards(3), shards(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    ("n", "global_batch", "rank", "world", "message"),
    [
        (2, 16, 0, 3, "2 training images cannot be shared by 3 processes"),
        (10, 1, 0, 2, "the global batch (1) must be at least the number of processes (2)"),
        (10, 6, 0, 4, "the global batch (6) must divide evenly over 4 processes"),
        (10, 12, 0, 2, "10 training images cannot fill one global batch of 12 over 2 processes"),
        (10, 4, 2, 2, "rank 2 is not one of the 2 processes of this job"),
    ],
)
def test_shard_batches_errors(
    n: int, global_batch: int, rank: int, world: int, message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        ddp.shard_batches(torch.arange(n), global_batch, rank, world)
    assert message in str(exc.value)


# ------------------------------------------------------------------------ single process


def test_without_torchrun_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = ddp.setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    values = torch.tensor([1.0, 2.0])
    assert ddp.all_sum(info, values) is values
    ddp.barrier(info)  # returns at once: no process group exists
    assert not torch.distributed.is_initialized()


def test_setup_errors_say_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="RANK is not set but WORLD_SIZE is"):
        ddp.setup("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one past the last GPU
    with pytest.raises(ConfigError, match=r"local rank \d+\) has no GPU of its own"):
        ddp.setup("cuda")
    assert not torch.distributed.is_initialized()


def test_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNNKIT_DIST_TIMEOUT", raising=False)
    assert ddp.timeout().total_seconds() == ddp.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("CNNKIT_DIST_TIMEOUT", "42.5")
    assert ddp.timeout().total_seconds() == 42.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("CNNKIT_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="CNNKIT_DIST_TIMEOUT: expected a positive number"):
            ddp.timeout()


def test_a_lost_peer_is_one_clear_error() -> None:
    info = ddp.DistInfo(rank=1, local_rank=1, world_size=2)
    with pytest.raises(CnnkitError) as exc, ddp._waiting_for_others(info, "summing figures"):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234.")
    assert str(exc.value).startswith(
        "process 1 of 2 stopped while summing figures: another process of this job failed "
        "(its error comes first) or did not answer within CNNKIT_DIST_TIMEOUT"
    )
    assert "Connection closed by peer" in str(exc.value)


def test_launch_torchrun_command(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ddp.launch_torchrun(2, ["train", "DATA", "--out", "RUN"]) == 3
    cmd, env = calls[0]
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "cnnkit",
        "train",
        "DATA",
        "--out",
        "RUN",
    ]
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    with pytest.raises(ConfigError, match=r"^nproc: expected a positive integer, got 0$"):
        ddp.launch_torchrun(0, [])


# ------------------------------------------------------------------ the 2-process run


def test_two_process_run_writes_one_run_directory(
    two_process_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run, proc = two_process_run
    assert [p.name for p in run.parent.iterdir()] == ["run"]
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Stopped together after epoch 1 of 3 (target accuracy), with exit code 0 everywhere.
    assert (summary["epochs_run"], summary["stopped_because"]) == (1, "target_accuracy")
    assert len(_metrics(run)) == 1
    # Only rank 0 prints the result.
    assert proc.stdout.count("best validation accuracy") == 1, proc.stdout


def test_two_process_metrics_cover_the_whole_validation_set(
    two_process_run: tuple[Path, subprocess.CompletedProcess], shapes: Path
) -> None:
    _check_whole_validation_set(two_process_run[0], shapes)


def test_two_processes_match_one_process_of_the_same_global_batch(
    two_process_run: tuple[Path, subprocess.CompletedProcess],
    one_process_run: Path,
    plain_model: Path,
) -> None:
    """Same seed and global batch: the same model after one epoch, up to rounding.

    Both runs see the same shuffled order and the same global batches; DDP averages the two
    half-batch gradients, which is the gradient of the mean loss over the whole batch. What
    may still differ is the order of floating-point sums (2 processes x 1 thread vs 1 process
    x 2 threads, the all-reduce), hence a tolerance. This model has neither batchnorm (whose
    statistics are per local batch unless synchronised, so a 2-process step is not the same
    computation) nor dropout, and augmentation is off (each rank draws from its own RNG
    stream): with any of those, exact equality is impossible and only accuracy would agree.
    """
    two, one = two_process_run[0], one_process_run
    assert (two / "config.yaml").read_text() == (one / "config.yaml").read_text()
    m2, m1 = _metrics(two)[0], _metrics(one)[0]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
    assert abs(m2["val_acc"] - m1["val_acc"]) <= 1 / 18 + 1e-9  # one image may flip on a tie
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-3)
    w2, w1 = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert w2.keys() == w1.keys()
    worst = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst  # measured: about 1e-8
    # The tolerance is far below how far one epoch moves the weights from where they started
    # (seed 0, as in both runs), so ranks that trained on their halves without averaging
    # gradients would fail this test.
    torch.manual_seed(0)
    spec = load_model_spec(str(plain_model))
    start = build_network(spec.layers, 3, 3, 16).state_dict()
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    assert moved > 1000 * 1e-5, moved  # without DDP's averaging: 0.04 off (measured)


# ------------------------------------------------------- the shortcut, batchnorm, rounding


def test_nproc_shortcut_with_batchnorm_and_augmentation(jobs: Jobs, shapes: Path) -> None:
    """``cnnkit train --nproc 2`` on the default model (batchnorm) with augmentation."""
    proc, run = jobs.result("shortcut"), jobs.run_dir("shortcut")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2, fp32, batch 14, 5 steps per epoch" in proc.stderr  # 15 rounded down
    assert [p.name for p in run.parent.iterdir()] == ["run"]
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_run"]) == (2, 2)
    assert proc.stdout.count("best validation accuracy") == 1
    # Batchnorm buffers differ between ranks after each step unless rank 0's are broadcast
    # before validation: then this check fails on the validation loss.
    _check_whole_validation_set(run, shapes)


# ------------------------------------------------------------------------ error paths


def test_more_processes_than_training_images_fails_on_every_rank(jobs: Jobs) -> None:
    proc = jobs.result("world")
    assert proc.returncode != 0
    message = "error: 2 training images cannot be shared by 3 processes"
    # Each rank raises the same ConfigError; torchrun may stop the slower ones first.
    assert 1 <= proc.stderr.count(message) <= 3, proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr  # one line per rank, no worker traceback


def test_a_failing_rank_ends_the_whole_job(jobs: Jobs) -> None:
    """Rank 1 fails while rank 0 waits for it in an all-reduce: the job ends with the cause.

    Rank 0 is not left waiting for the collective's timeout: rank 1's exit closes its gloo
    connections, so rank 0's all-reduce fails at once, and torchrun stops what is left.
    """
    proc = jobs.result("fault")
    assert proc.returncode != 0
    assert "RuntimeError: simulated failure on rank 1" in proc.stderr
    # Rank 0 says in one line why it stopped (unless torchrun stopped it first), no traceback.
    assert "[rank0]: Traceback" not in proc.stderr
    assert "best validation accuracy" not in proc.stdout  # rank 0 never finished


# ---------------------------------------------------------------------------------- GPU


def _nccl_check(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout


NCCL_SMOKE = """
import os, socket, torch, torch.distributed as dist
from cnnkit.models.registry import build_network, load_model_spec
with socket.socket() as s:  # a free port for the one-process group
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("nccl", rank=0, world_size=1)
torch.manual_seed(0)
net = build_network(load_model_spec("fast").layers, 3, 3, 32).cuda()
ref = build_network(load_model_spec("fast").layers, 3, 3, 32).cuda()
ref.load_state_dict(net.state_dict())
ddp = torch.nn.parallel.DistributedDataParallel(
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[0])
x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
torch.nn.functional.cross_entropy(ddp(x), y).backward()
torch.nn.functional.cross_entropy(ref(x), y).backward()
for a, b in zip(net.parameters(), ref.parameters()):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_nccl_smoke_on_one_gpu() -> None:
    """NCCL, DDP and SyncBatchNorm work on this GPU with cnnkit's default network."""
    _nccl_check(NCCL_SMOKE)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl(shapes: Path, tmp_path: Path) -> None:
    gpu = Jobs(tmp_path)
    args = [str(shapes), "--out", str(gpu.run_dir("nccl")), "--image-size", "16"]
    args += ["--epochs", "2", "--batch-size", "16", "--device", "cuda", "--sync-bn"]
    gpu.start("nccl", _torchrun(2, *args, "--precision", "fp32"))
    proc, run = gpu.result("nccl"), gpu.run_dir("nccl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["device"]) == (2, "cuda:0")
    _check_whole_validation_set(run, shapes)
