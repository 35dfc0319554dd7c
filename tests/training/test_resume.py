"""Never lose work: kill a run anywhere, resume it, and end with bit-identical weights.

The kill-and-resume test drives the real CLI in subprocesses on a tiny generated data set
(CPU, ``--deterministic``): one kill inside a checkpoint write (``tests/faults.py``), one
SIGKILL at a random moment, then SIGTERM and SIGINT, each
followed by ``--resume``. An uninterrupted run trains beside it; the final weights, the last
checkpoint and the metrics must match exactly. The other tests resume in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import faults
from cnnkit.cli import app
from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.training import checkpoints as ckpt
from cnnkit.training.loop import train

EPOCHS, EVERY = 5, 3  # 72 training images in batches of 8: 9 steps, 3 checkpoints per epoch
TRAIN_OPTIONS = [
    "--image-size", "16", "--epochs", str(EPOCHS), "--batch-size", "8",
    "--checkpoint-every", str(EVERY), "--deterministic", "--precision", "fp32",
    "--device", "cpu", "--quiet",
]  # fmt: skip


# ------------------------------------------------------------------------------ helpers


def make_data(folder: Path) -> Path:
    """30 shapes per class at 16x16: 72 training and 18 validation images."""
    return generate_shapes(folder, count=30, size=16, seed=7)


def newest(run: Path) -> int:
    """Sequence number of the newest checkpoint (0 when there is none)."""
    found = ckpt.list_checkpoints(run)
    return int(found[0].name.split("-")[1]) if found else 0


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two safetensors files (empty when identical)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


def metrics_without_time(run: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    seconds = rows[0].index("seconds")
    return [row[:seconds] + row[seconds + 1 :] for row in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    """Identical best weights, last checkpoint weights and per-epoch metrics."""
    assert same_tensors(run / "model.safetensors", reference / "model.safetensors") == []
    last, ref_last = ckpt.list_checkpoints(run)[0], ckpt.list_checkpoints(reference)[0]
    assert same_tensors(last / "model.safetensors", ref_last / "model.safetensors") == []
    assert metrics_without_time(run) == metrics_without_time(reference)


class Cli:
    """``python -m cnnkit`` in a subprocess pinned to one core (one thread, as on any CPU)."""

    def __init__(self, cache: Path, core: int | None) -> None:
        self.env = {**os.environ, "CNNKIT_CACHE_DIR": str(cache), "MPLBACKEND": "Agg"}
        self.core = core

    def _pin(self) -> None:
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})

    def start(self, *args: str, fault: str | None = None) -> subprocess.Popen[str]:
        cmd = faults.command(fault, *args) if fault else [sys.executable, "-m", "cnnkit", *args]
        return subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=self._pin,
        )


def wait_for_checkpoint(proc: subprocess.Popen[str], run: Path, after: int) -> int:
    """Poll until ``run`` has a checkpoint newer than ``after``; returns its number."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seq = newest(run)
        if seq > after:
            return seq
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before checkpoint {after + 1}: {err}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint after {after} within 120 s")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def cores() -> tuple[int | None, int | None]:
    """Two different cores for the two runs when the platform lets us pin processes."""
    if not hasattr(os, "sched_setaffinity"):
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


# ------------------------------------------------------------------ kill and resume (CLI)


def test_killed_anywhere_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    seed = int(time.time() * 1000) % 100_000
    rng = random.Random(seed)
    note = f"(random seed {seed})"
    data = make_data(tmp_path / "data")
    run, reference = tmp_path / "run", tmp_path / "reference"
    core_a, core_b = cores()
    chain, beside = Cli(tmp_path / "cache-a", core_a), Cli(tmp_path / "cache-b", core_b)
    uninterrupted = beside.start("train", str(data), "--out", str(reference), *TRAIN_OPTIONS)
    resume = ("train", "--resume", str(run), "--quiet")
    proc = uninterrupted
    try:
        # 1. SIGKILL inside the n-th checkpoint write, between the weights and the state file.
        n = rng.randint(2, 3)
        proc = chain.start(
            "train", str(data), "--out", str(run), *TRAIN_OPTIONS, fault=f"checkpoint-write:{n}"
        )
        code, err = finish(proc)
        assert code == -signal.SIGKILL, f"{note} {err}"
        assert newest(run) == n - 1, note
        (half,) = (run / "checkpoints").glob(".tmp-*")  # the cut-short write, never renamed
        assert (half / "model.safetensors").is_file() and not (half / "state.pt").exists()

        # 2. SIGKILL at a random moment after the resumed run wrote a checkpoint (at most
        # two more checkpoints later, so that enough of the run is left for the signals).
        proc = chain.start(*resume)
        seen = wait_for_checkpoint(proc, run, newest(run))
        deadline = time.monotonic() + rng.uniform(0.0, 0.3)
        while time.monotonic() < deadline and newest(run) < seen + 2:
            time.sleep(0.002)
        proc.kill()
        code, err = finish(proc)
        assert code == -signal.SIGKILL, f"{note} finished before the kill: {err}"

        # 3, 4. SIGTERM, then SIGINT: a checkpoint, one clean line, exit code 1.
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc = chain.start(*resume)
            seen = wait_for_checkpoint(proc, run, newest(run))
            proc.send_signal(sig)
            code, err = finish(proc)
            assert code == 1, f"{note} {sig.name} after checkpoint {seen}: exit {code}: {err}"
            assert "Traceback" not in err, err
            assert err.strip().splitlines()[-1] == (
                f"error: interrupted by {sig.name}; checkpoint saved, continue with: "
                f"cnnkit train --resume {run}"
            )
            # Saved at the next step, or already by a save the signal arrived during.
            assert newest(run) >= seen and not list((run / "checkpoints").glob(".tmp-*"))

        # 5. Resume to the end.
        code, err = finish(chain.start(*resume))
        assert code == 0, f"{note} {err}"
        code, err = finish(uninterrupted)
        assert code == 0, err
    finally:
        for p in (uninterrupted, proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert_same_run(run, reference)
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------- in-process resumes


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """In-process training on one thread, and the process-wide switches put back afterwards."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(False)


def tiny_config(data: Path, **train_options: object) -> RunConfig:
    options = {
        "epochs": 3,
        "batch_size": 8,
        "checkpoint_every": EVERY,
        "deterministic": True,
        "precision": "fp32",
        "device": "cpu",
        **train_options,
    }
    return RunConfig(
        model="fast",
        data=DataConfig(path=str(data), image_size=16),
        augment=AugmentConfig(),
        train=TrainConfig(**options),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A finished 3-epoch run with checkpoints (read-only: copy before changing)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_data(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNKIT_CACHE_DIR", str(root / "cache"))
        train(tiny_config(data), root / "run", progress=False)
    return root / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in ("summary.json", "curves.png", "report.html")
    }


def test_resume_of_a_finished_run_changes_nothing(
    finished_run: Path, tmp_path: Path, one_thread: None
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    result = train(None, run, resume=True, progress=False)
    assert result.epochs_run == 3 and len(result.history) == 3
    assert snapshot(run) == before  # same weights, checkpoints, metrics and config


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero-byte": lambda data: b"",
    "corrupted": lambda data: data[:100] + bytes([data[100] ^ 0x01]) + data[101:],
}
REASON = {
    "truncated": r"truncated \(\d+ bytes, expected \d+\)",
    "zero-byte": r"empty \(0 bytes\)",
    "corrupted": r"corrupted \(checksum mismatch\)",
}


@pytest.mark.parametrize(
    ("damage", "file"),
    [("truncated", "model.safetensors"), ("zero-byte", "state.pt"), ("corrupted", "state.pt")],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    finished_run: Path,
    tmp_path: Path,
    one_thread: None,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    file: str,
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    newest_folder = ckpt.list_checkpoints(run)[0]
    path = newest_folder / file
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with caplog.at_level("WARNING", logger="cnnkit"):
        result = train(None, run, resume=True, progress=False)
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith(f"{path}: ")
    assert warning.endswith("; trying the previous checkpoint")
    assert re.search(REASON[damage], warning)
    # The previous checkpoint is mid-way through epoch 3: the resume redoes its last steps
    # and ends exactly where the undamaged run ended.
    assert result.epochs_run == 3
    assert_same_run(run, finished_run)
    assert (run / "checkpoints" / f"damaged-{newest_folder.name}").is_dir()


def test_resume_refuses_changed_data_or_config_and_force_overrides(
    tmp_path: Path, one_thread: None
) -> None:
    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, epochs=1), run, progress=False)
    shutil.copy(data / "circle" / "circle_00000.png", data / "circle" / "circle_new.png")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.001", "--quiet"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot resume: data changed (training/validation images 72/18")
    assert "train.lr changed from 0.003 to 0.001" in line
    assert line.endswith("(pass --force to resume anyway)")
    with pytest.raises(ConfigError, match=r"^cannot resume: data changed .* 72/18 -> 73/18"):
        train(tiny_config(data, epochs=2), run, resume=True, progress=False)
    result = train(tiny_config(data, epochs=2), run, resume=True, force=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_more_epochs_on_resume_continue_the_run(tmp_path: Path, one_thread: None) -> None:
    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, epochs=1), run, progress=False)
    result = train(tiny_config(data, epochs=2), run, resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_resume_with_every_checkpoint_damaged_names_each(
    finished_run: Path, tmp_path: Path, one_thread: None
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    folders = ckpt.list_checkpoints(run)
    for folder in folders:
        (folder / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        train(None, run, resume=True, progress=False)
    message = str(info.value)
    assert message.startswith(f"{run}: no usable checkpoint (")
    assert all(f"{folder / 'state.pt'}: empty (0 bytes)" in message for folder in folders)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(
    finished_run: Path, tmp_path: Path, one_thread: None
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run / "config.yaml")  # all it had written
    result = train(None, run, resume=True, progress=False)
    assert result.epochs_run == 3
    assert_same_run(run, finished_run)


def test_forced_resume_with_a_model_of_another_shape_is_one_clear_error(
    finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    args = ["train", "--resume", str(run), "--channels", "1", "--quiet"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1
    assert re.search(r"data\.channels changed from '(auto|3)' to '1'", refused.stderr)
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 1, result.exception
    (line,) = result.stderr.strip().splitlines()
    newest_folder = ckpt.list_checkpoints(run)[0]
    assert line.startswith(
        f"error: {newest_folder}: the checkpoint's weights do not fit the model of this config "
        "(size mismatch for layers.conv1.weight"
    )


def flat_progress(grouped: dict) -> dict:
    """The progress of ``grouped`` as checkpoints held it before ``Progress`` had groups:
    one dict of fifteen fields."""
    at, best, timing = grouped["position"], grouped["best"], grouped["timing"]
    return {
        "epoch": at["epoch"],
        "step": at["step"],
        "loss_sum": at["loss_sum"],
        "correct": at["correct"],
        "history": grouped["history"],
        "best_acc": best["acc"],
        "best_loss": best["loss"],
        "best_epoch": best["epoch"],
        "stale": best["stale"],
        "images_seen": timing["images_seen"],
        "train_seconds": timing["train_seconds"],
        "elapsed": timing["elapsed"],
        "seconds_to_target": grouped["seconds_to_target"],
        "finished": grouped["stopped"] != "epochs",
        "stopped": grouped["stopped"],
    }


def test_a_checkpoint_with_the_older_flat_progress_resumes_bit_identical(
    finished_run: Path, tmp_path: Path, one_thread: None
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    last, mid_epoch = ckpt.list_checkpoints(run)
    shutil.rmtree(last)  # resume from the middle of epoch 3, with its running sums
    state = torch.load(mid_epoch / "state.pt", weights_only=True)
    state["progress"] = flat_progress(state["progress"])
    assert state["progress"]["step"] == 2 * EVERY and len(state["progress"]) == 15
    torch.save(state, mid_epoch / "state.pt")
    data = (mid_epoch / "state.pt").read_bytes()
    manifest = json.loads((mid_epoch / "manifest.json").read_text())
    manifest["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (mid_epoch / "manifest.json").write_text(json.dumps(manifest))
    result = train(None, run, resume=True, progress=False)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert (result.epochs_run, result.best_epoch) == (3, summary["best_epoch"])
    assert result.best_val_acc == summary["best_val_acc"]
    assert_same_run(run, finished_run)
    newest_state = torch.load(ckpt.list_checkpoints(run)[0] / "state.pt", weights_only=True)
    assert set(newest_state["progress"]) >= {"position", "best", "timing"}  # saved grouped
