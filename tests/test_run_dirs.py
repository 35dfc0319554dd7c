"""Run directories: one training at a time (a lock that dies with its owner), ``--overwrite``
removes exactly what cnnkit wrote and nothing else, and a resume notices changed images."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cnnkit.training.loop as loop
from cnnkit.cli import app
from cnnkit.errors import ConfigError, RunDirError
from cnnkit.evaluation import evaluate
from cnnkit.export import export_pt2
from cnnkit.files import LOCK, MANIFEST, OwnerLock, recorded
from cnnkit.reporting import write_report
from cnnkit.training.loop import train
from cnnkit.training.outputs import fingerprint
from conftest import tiny_config


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_below(folder)}


# ------------------------------------------------------------------------------ the lock


def test_a_run_directory_in_use_is_refused_naming_its_owner(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    out = tmp_path / "run"
    train(tiny_config(tiny_shapes, epochs=1), out, progress=False)
    assert not (out / LOCK).exists()  # a finished run leaves no lock behind
    before = snapshot(out)
    running = OwnerLock(out / LOCK)  # what a training in progress holds
    assert running.acquire()
    try:
        for how in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirError) as info:
                train(tiny_config(tiny_shapes, epochs=2), out, progress=False, **how)
            assert str(info.value) == (
                f"{out} is in use by another training run (pid {os.getpid()} on "
                f"{socket.gethostname()}); wait for it to finish or choose another out"
            )
    finally:
        running.release()
    assert snapshot(out) == before


def test_two_trainings_into_one_folder_and_a_kill(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    """A second training is refused while the first runs; ``kill -9`` of the first leaves a
    stale lock file that does not stop the resume."""
    run = tmp_path / "run"
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    options = ["--image-size", "16", "--batch-size", "4", "--device", "cpu", "--quiet"]
    command = [sys.executable, "-m", "cnnkit", "train", str(tiny_shapes), "--out", str(run)]
    first = subprocess.Popen(
        [*command, "--epochs", "1000", "--patience", "0", *options],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob("checkpoints/ckpt-*")) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        second = CliRunner().invoke(
            app, ["train", str(tiny_shapes), "--out", str(run), "--overwrite", *options]
        )
        assert second.exit_code == 1
        assert second.stderr.strip().splitlines() == [
            f"error: {run} is in use by another training run (pid {first.pid} on "
            f"{socket.gethostname()}); wait for it to finish or choose another --out"
        ]
    finally:
        first.kill()
        first.wait()
    assert (run / LOCK).exists()  # the killed run's lock file, no longer locked
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "1", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert not (run / LOCK).exists()


# ------------------------------------------------------------------------------ overwrite


def test_overwrite_removes_exactly_what_the_earlier_run_wrote(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    out = tmp_path / "run"
    train(tiny_config(tiny_shapes, epochs=2, checkpoint_every=2), out, progress=False)
    evaluate(out, tiny_shapes)  # confusion_matrix.png, evaluation.json
    write_report(out)  # report.html
    export_pt2(out, check_images=4)  # model.pt2
    newest = sorted((out / "checkpoints").glob("ckpt-*"))[-1]
    newest.rename(newest.with_name(f"damaged-{newest.name}"))  # as a resume moves one aside
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    with pytest.raises(RunDirError) as info:
        train(tiny_config(tiny_shapes, epochs=1), out, overwrite=True, progress=False)
    assert str(info.value) == (
        f"out {out} holds files cnnkit did not write: checkpoints/notes.txt, plots/; "
        "move them away or choose another out"
    )
    (out / "checkpoints" / "notes.txt").unlink()
    (out / "plots").rmdir()
    # What a kill during a write leaves: an atomic write's temporary file, a checkpoint's.
    (out / ".model.safetensors.k1ll3d.tmp").write_bytes(b"half")
    (out / "checkpoints" / ".tmp-k1ll3d").mkdir()
    (out / "checkpoints" / ".tmp-k1ll3d" / "model.safetensors").write_bytes(b"half")
    (out / ".report.html.k1ll3d.tmp").write_bytes(b"half")

    train(tiny_config(tiny_shapes, epochs=1), out, overwrite=True, progress=False)
    ckpt = "checkpoints/ckpt-000001"  # numbered from 1 again: nothing of the old run is left
    assert files_below(out) == [
        MANIFEST,
        f"{ckpt}/manifest.json",
        f"{ckpt}/model.safetensors",
        f"{ckpt}/state.pt",
        "config.yaml",
        "curves.png",
        "metrics.csv",
        "model.json",
        "model.safetensors",
        "split.csv",
        "summary.json",
    ]


def test_overwrite_never_deletes_a_folder_that_only_looks_like_a_run(
    tiny_shapes: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "checkpoints" / "ckpt-000007").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-000007" / "state.pt").write_text("my own checkpoint")
    (out / "config.yaml").write_text("mine: true\n")
    before = snapshot(out)
    with pytest.raises(RunDirError) as info:
        train(tiny_config(tiny_shapes, epochs=1), out, overwrite=True, progress=False)
    assert str(info.value) == (
        f"out {out} holds files cnnkit did not write: checkpoints/, config.yaml (no "
        ".cnnkit-manifest: cnnkit wrote nothing there); move them away or choose another out"
    )
    assert snapshot(out) == before


def test_a_run_from_before_manifests_and_file_stamps_still_resumes(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    out = tmp_path / "run"

    def without_stamps(*args: object) -> dict:
        old = fingerprint(*args)  # type: ignore[arg-type]
        del old["stamps"]
        return old

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "fingerprint", without_stamps)
        train(tiny_config(tiny_shapes, epochs=1), out, progress=False)
    (out / MANIFEST).unlink()
    result = train(tiny_config(tiny_shapes, epochs=2), out, resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert {"config.yaml", "model.safetensors"} <= recorded(out)  # a manifest from now on


# -------------------------------------------------------------------------- changed images


def test_resume_refuses_images_whose_files_changed_and_force_overrides(
    tiny_shapes: Path, tmp_path: Path, single_thread: None
) -> None:
    data = Path(shutil.copytree(tiny_shapes, tmp_path / "data"))
    out = tmp_path / "run"
    train(tiny_config(data, epochs=1), out, progress=False)
    circles = sorted((data / "circle").glob("*.png"))[:4]
    for circle, square in zip(circles, sorted((data / "square").glob("*.png")), strict=False):
        shutil.copyfile(square, circle)  # same names and labels, other pictures
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--quiet"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    found = re.fullmatch(
        r"error: cannot resume: 4 image file\(s\) changed since the run started \(size or "
        r"modification time\): (.+), (.+), (.+) and 1 more \(pass --force to resume anyway\)",
        line,
    )
    assert found, line
    assert set(found.groups()) < {str(p) for p in circles}
    with pytest.raises(ConfigError, match=r"^cannot resume: 4 image file\(s\) changed"):
        train(tiny_config(data, epochs=2), out, resume=True, progress=False)
    resumed = train(tiny_config(data, epochs=2), out, resume=True, force=True, progress=False)
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_evaluate_replaces_its_files_in_a_run_directory_whole(
    tiny_shapes: Path, tmp_path: Path, single_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write cut short (a kill, a full disk) leaves the previous file, never half of one."""
    import cnnkit.evaluation as evaluation

    out = tmp_path / "run"
    train(tiny_config(tiny_shapes, epochs=1), out, progress=False)
    evaluate(out, tiny_shapes)
    before = snapshot(out)

    def cut_short(matrix: object, classes: object, path: Path) -> None:
        path.write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "plot_confusion", cut_short)
    with pytest.raises(KeyboardInterrupt):
        evaluate(out, tiny_shapes)
    assert snapshot(out) == before
