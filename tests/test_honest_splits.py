"""Honest splits: duplicates never straddle a drawn split, a given split's shared images are
named (and refused with --strict), every run writes split.csv, evaluation says what it
scored, and run directories work from any folder."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnkit.data.check as check_mod
from cnnkit.cli import app
from cnnkit.config import DataConfig
from cnnkit.data.check import check_folder, identical_rows
from cnnkit.data.dataset import prepare_data
from cnnkit.data.folder import stratified_split
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import DataError
from cnnkit.evaluation import evaluate
from cnnkit.reporting import build_report
from cnnkit.training.loop import train
from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()
TINY_TRAIN = ["--image-size", "16", "--epochs", "2", "--batch-size", "4", "--quiet"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def read_split_csv(run: Path) -> list[dict[str, str]]:
    with open(run / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


def with_duplicates(root: Path, count: int = 20, size: int = 16) -> list[set[str]]:
    """Shapes with copies inside a class, across classes and one re-encoded as BMP (same
    pixels, other bytes); returns every group of identical images, by path."""
    generate_shapes(root, count=count, size=size, seed=3)
    groups = []
    for i in range(8):  # a copy in the same class
        src = root / "circle" / f"circle_{i:05d}.png"
        shutil.copy(src, root / "circle" / f"again_{i}.png")
        groups.append({str(src), str(root / "circle" / f"again_{i}.png")})
    for i in range(6):  # the same image filed under another class too
        src = root / "square" / f"square_{i:05d}.png"
        shutil.copy(src, root / "triangle" / f"square_{i}.png")
        groups.append({str(src), str(root / "triangle" / f"square_{i}.png")})
    src = root / "triangle" / "triangle_00002.png"
    Image.open(src).save(root / "triangle" / "bmp_copy.bmp")
    groups.append({str(src), str(root / "triangle" / "bmp_copy.bmp")})
    return groups


def given_split_with_copies(root: Path) -> None:
    """train/ and val/ (and test/) where val/ and test/ hold copies of training images."""
    generate_shapes(root / "train", count=6, size=16, seed=4)
    generate_shapes(root / "val", count=3, size=16, seed=5)
    generate_shapes(root / "test", count=2, size=16, seed=6)
    shutil.copy(root / "train/circle/circle_00001.png", root / "val/circle/leak.png")
    shutil.copy(root / "train/square/square_00002.png", root / "val/triangle/leak.png")
    shutil.copy(root / "train/triangle/triangle_00003.png", root / "test/triangle/leak.png")


# ----------------------------------------------------------------------------- splitting


def test_groups_stay_on_one_side_of_a_drawn_split() -> None:
    labels = np.repeat(np.arange(3), 40)
    groups = [[0, 1, 2], [5, 45], [80, 81, 82, 83, 84], [10, 11], [50, 90], [41, 42, 43]]
    for seed in range(20):
        train, val = stratified_split(labels, 0.2, seed, groups)
        assert sorted([*train, *val]) == list(range(120))
        for group in groups:
            assert set(group) <= set(train.tolist()) or set(group) <= set(val.tolist())
        assert all(7 <= n <= 9 for n in np.bincount(labels[val], minlength=3))
        # without groups, the draw is the one every earlier run made
        plain = stratified_split(labels, 0.2, seed)
        assert [a.tolist() for a in plain] == [
            a.tolist() for a in stratified_split(labels, 0.2, seed, [])
        ]


def test_a_class_in_one_group_still_trains_and_a_big_group_is_not_forced_into_validation() -> None:
    labels = np.array([0] * 5 + [1] * 10)
    train, val = stratified_split(labels, 0.2, 0, [[0, 1, 2, 3, 4]])
    assert set(range(5)) <= set(train.tolist())  # a lone group cannot leave its class untrained
    train, val = stratified_split(labels, 0.2, 0, [[5, 6, 7, 8, 9, 10, 11, 12]])
    assert set(val.tolist()) - set(range(5)) == {13, 14}  # the two lone ones fill the share


def test_identical_rows_compare_pixels_whatever_the_hash(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    a[4] = a[1]
    b[3] = a[1]
    b[0] = b[2]
    expected = [[(0, 1), (0, 4), (1, 3)], [(1, 0), (1, 2)]]
    assert sorted(identical_rows([a, b])) == expected
    # every image hashing alike (a collision for every pair): still only the identical ones
    monkeypatch.setattr(check_mod, "_row_hashes", lambda x: np.zeros(len(x), dtype=np.uint64))
    assert sorted(identical_rows([a, b])) == expected
    assert identical_rows([a[:1], b[:0]]) == []


def test_training_split_keeps_every_duplicate_on_one_side(tmp_path: Path) -> None:
    groups = with_duplicates(tmp_path / "d")
    found = [set(g) for g in check_folder(tmp_path / "d").duplicates]
    assert all(g in groups for g in found) and len(found) == len(groups) - 1  # BMP: new bytes
    for seed in range(4):
        data = prepare_data(DataConfig(path=str(tmp_path / "d"), val_split=0.3, seed=seed), 16)
        train, val = set(data.train.paths), set(data.val.paths)
        assert not train & val and len(train | val) == 60 + 15
        for group in groups:
            assert group <= train or group <= val, (seed, group)


def test_a_given_split_names_shared_images_and_strict_refuses_them(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    root = tmp_path / "given"
    given_split_with_copies(root)
    monkeypatch.setattr(logging.getLogger("cnnkit"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        data = prepare_data(DataConfig(path=str(root)), 16)
    assert sorted(
        sorted(Path(p).relative_to(root).as_posix() for p in g) for g in data.duplicates
    ) == [
        ["test/triangle/leak.png", "train/triangle/triangle_00003.png"],
        ["train/circle/circle_00001.png", "val/circle/leak.png"],
        ["train/square/square_00002.png", "val/triangle/leak.png"],
    ]
    assert f"{root}: 3 group(s) of identical images lie in more than one split" in caplog.text
    assert "train/circle/circle_00001.png = val/circle/leak.png" in caplog.text
    assert [Path(p).name for p in data.held_back.paths].count("leak.png") == 1
    with pytest.raises(
        DataError, match=r"3 group\(s\) of identical images lie in .* data.strict refuses"
    ):
        prepare_data(DataConfig(path=str(root), strict=True), 16)


# ----------------------------------------------------------------------------- split.csv


def test_every_run_writes_split_csv(tmp_path: Path, tiny_shapes: Path) -> None:
    groups = with_duplicates(tmp_path / "d", count=8)
    result = train(tiny_config(tmp_path / "d"), tmp_path / "run", progress=False)
    rows = read_split_csv(tmp_path / "run")
    assert list(rows[0]) == ["path", "label", "split"]
    by_split: dict[str, set[str]] = {}
    for row in rows:
        assert Path(row["path"]).is_absolute() and Path(row["path"]).is_file()
        assert row["label"] == Path(row["path"]).parent.name
        by_split.setdefault(row["split"], set()).add(row["path"])
    assert set(by_split) == {"train", "val"}
    assert by_split["train"] == set(result.data.train.paths)
    assert by_split["val"] == set(result.data.val.paths)
    assert len(rows) == 24 + 15 and not by_split["train"] & by_split["val"]
    for group in groups:
        assert group <= by_split["train"] or group <= by_split["val"]


def test_split_csv_of_a_given_split_lists_its_test_part(tmp_path: Path) -> None:
    given_split_with_copies(tmp_path / "given")
    train(tiny_config(tmp_path / "given"), tmp_path / "run", progress=False)
    rows = read_split_csv(tmp_path / "run")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {"train": 18, "val": 11, "test": 7}
    assert all(f"/{r['split']}/" in r["path"] for r in rows)


# ----------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """A tiny run trained on a copy of ``tiny_shapes`` (which tests may change)."""
    base = tmp_path_factory.mktemp("tiny-run")
    shutil.copytree(tiny_shapes, base / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        import torch

        import cnnkit.training.loop as loop

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        patch.setattr(loop, "use_all_cores", lambda: 1, raising=False)
        try:
            train(tiny_config(base / "shapes"), base / "run", progress=False)
        finally:
            torch.set_num_threads(before)
    return base / "run"


def test_default_evaluation_scores_the_validation_part_split_csv_lists(
    tiny_run: Path, tmp_path: Path
) -> None:
    data = tiny_run.parent / "shapes"
    val = {r["path"] for r in read_split_csv(tiny_run) if r["split"] == "val"}
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = evaluate(run, data)
    assert set(result.paths) == val and result.count == len(val) == 6
    assert (result.data, result.split, result.own) == (str(data), "val", True)
    # split.csv is the record: an image added later is neither trained nor validated on
    shutil.copy(data / "circle" / "circle_00000.png", tmp_path / "new.png")
    Image.open(tmp_path / "new.png").rotate(90).save(data / "circle" / "added_later.png")
    try:
        assert set(evaluate(run, data, plot=False).paths) == val
        assert evaluate(run, data, split="all", plot=False).count == 25
    finally:
        (data / "circle" / "added_later.png").unlink()
    written = json.loads((run / "evaluations" / "shapes-val" / "evaluation.json").read_text())
    assert (written["data"], written["split"], written["count"]) == (str(data), "val", 6)


def test_evaluate_cli_says_what_it_scored_and_keeps_each_result(
    tiny_run: Path, tmp_path: Path
) -> None:
    data = tiny_run.parent / "shapes"
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = generate_shapes(tmp_path / "other", count=2, size=16, seed=9)
    result = invoke("evaluate", run, data)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"validation part of {data}: 6 images"
    assert f"results: {run / 'evaluations' / 'shapes-val'}/" in result.stdout
    result = invoke("evaluate", run, other)
    assert result.stdout.splitlines()[0] == f"all of {other}: 6 images"
    assert (run / "evaluations" / "other-all" / "confusion_matrix.png").is_file()
    assert (run / "evaluations" / "shapes-val" / "evaluation.json").is_file()
    # another folder of the same name does not replace the first one's results
    twin = generate_shapes(tmp_path / "elsewhere" / "other", count=1, size=16, seed=9)
    invoke("evaluate", run, twin)
    first = json.loads((run / "evaluations" / "other-all" / "evaluation.json").read_text())
    second = json.loads((run / "evaluations" / "other-all-2" / "evaluation.json").read_text())
    assert (first["data"], first["count"]) == (str(other), 6)
    assert (second["data"], second["count"]) == (str(twin), 3)
    result = invoke("evaluate", run, data, "--split", "test")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {data}: has no 'test' split (it holds one folder per class, without "
        "train/ and test/ folders)"
    )


# ----------------------------------------------------------------------------- portability


def test_a_run_directory_works_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    generate_shapes(work / "data" / "shapes", count=8, size=16, seed=2)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    result = invoke("train", "data/shapes", "--out", "runs/x", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    data, run = work / "data" / "shapes", work / "runs" / "x"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(data)
    assert all(Path(r["path"]).is_absolute() for r in read_split_csv(run))

    monkeypatch.chdir(elsewhere)
    result = invoke("train", "--resume", run, "--epochs", "3", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", run, data)
    assert result.stdout.startswith(f"validation part of {data}: 6 images")
    assert "Unavailable" not in build_report(run).split("<section id='config'>")[0]
    result = invoke("export", run, "--out", elsewhere / "x.onnx", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"verified on 6 validation images of the run from {data}," in result.stdout
    image = data / "circle" / "circle_00000.png"
    result = invoke("inspect", run, image, "--out", elsewhere / "inspect")
    assert result.exit_code == 0, result.output

    shutil.move(data, tmp_path / "moved")  # now the data is really gone: each says so
    result = invoke("export", run, "--out", elsewhere / "y.onnx", "--quiet")
    assert result.exit_code == 0, result.output
    assert (
        f"verified on 64 random images, because the data folder {data} no longer exists,"
        in result.stdout
    )
    assert f"the data folder {data} no longer exists" in build_report(run)
    result = invoke("train", "--resume", run, "--epochs", "4", "--quiet")
    assert result.stderr.strip() == f"error: data folder not found: {data}"


def test_a_relative_data_path_of_an_older_run_is_explained(
    fast_trained_run, tmp_path, monkeypatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(fast_trained_run[0], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = "data/shapes"  # as runs recorded it before paths were absolute
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    html = build_report(run)
    assert (
        f"the run records its data folder as the relative path data/shapes, which is not a "
        f"folder from {tmp_path} (give the data folder explicitly)" in html
    )


# ----------------------------------------------------------------------------- the report


def test_report_labels_other_data_as_other_data(fast_trained_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fast_trained_run[0], run)
    other = generate_shapes(tmp_path / "other", count=3, size=32, seed=11)
    html = build_report(run, other)
    confusion = html.split("<section id='confusion'>", 1)[1].split("</section>", 1)[0]
    label = f"9 images of other data (all of {other}), not the run's validation images"
    assert html_escape(label) in confusion
    assert "9 validation images" not in confusion
    mistakes = html.split("<section id='mistakes'>", 1)[1].split("</section>", 1)[0]
    assert "other data" in mistakes
    own = build_report(run)
    confusion = own.split("<section id='confusion'>", 1)[1].split("</section>", 1)[0]
    assert "120 validation images, accuracy" in confusion and "other data" not in own


def test_training_output_and_report_name_shared_images(tmp_path: Path) -> None:
    data = tmp_path / "given"
    given_split_with_copies(data)
    result = invoke("train", data, "--out", tmp_path / "run", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert (
        f"warning: {data}: 3 group(s) of identical images lie in more than one split"
        in result.stderr
    )
    assert "train/square/square_00002.png = val/triangle/leak.png" in result.stderr
    html = (tmp_path / "run" / "report.html").read_text()
    assert f"3 group(s) of identical images of {data} lie in more than one split" in html
    assert "<li>train/triangle/triangle_00003.png = test/triangle/leak.png</li>" in html
    result = invoke("train", data, "--out", tmp_path / "strict", "--strict", *TINY_TRAIN)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"error: {data}: 3 group(s) of identical images lie")
    assert not (tmp_path / "strict").exists()
