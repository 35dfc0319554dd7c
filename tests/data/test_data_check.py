"""``check_folder``: counts, sizes, modes, bad files, duplicates and imbalance of a data set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from cnnkit.data.check import check_folder
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import DataError


def test_a_clean_set_has_no_warnings(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=4, size=16, seed=0)
    report = check_folder(root)
    assert report.root == str(root)
    assert report.classes == ["circle", "square", "triangle"]
    assert report.counts == {"all": {"circle": 4, "square": 4, "triangle": 4}}
    assert report.sizes == {"width": [16, 16, 16], "height": [16, 16, 16]}
    assert report.modes == {"RGB": 12}
    assert report.bad == [] and report.duplicates == [] and report.warnings == []


def test_sizes_and_modes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, (size, mode) in enumerate([((10, 20), "RGB"), ((30, 40), "L"), ((50, 60), "RGB")]):
        Image.new(mode, size, i * 50).save(tmp_path / "a" / f"{i}.png")
    Image.new("RGBA", (20, 30), (1, 2, 3, 4)).save(tmp_path / "b" / "x.png")
    Image.new("RGBA", (20, 30), (4, 3, 2, 1)).save(tmp_path / "b" / "y.png")
    Image.new("RGB", (40, 50), (7, 7, 7)).save(tmp_path / "b" / "z.png")
    report = check_folder(tmp_path)
    assert report.sizes == {"width": [10, 25, 50], "height": [20, 35, 60]}
    assert report.modes == {"RGB": 3, "RGBA": 2, "L": 1}


def test_bad_files_are_listed_with_reasons(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=3, size=16, seed=0)
    good = (root / "circle" / "circle_00000.png").read_bytes()
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "square" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "square" / "text.png").write_text("hello")
    (root / "triangle" / "folder.png").mkdir()
    report = check_folder(root)
    reasons = dict(report.bad)
    assert reasons == {
        str(
            root / "circle" / "empty.png"
        ): f"{root / 'circle' / 'empty.png'}: empty file (0 bytes)",
        str(root / "square" / "cut.png"): (
            f"{root / 'square' / 'cut.png'}: unreadable (image file is truncated)"
        ),
        str(root / "square" / "text.png"): (
            f"{root / 'square' / 'text.png'}: not an image in a supported format "
            "(JPEG, PNG, BMP, GIF, WEBP)"
        ),
        str(root / "triangle" / "folder.png"): (f"{root / 'triangle' / 'folder.png'}: not a file"),
    }
    assert report.counts["all"] == {"circle": 3, "square": 3, "triangle": 3}
    assert "4 unreadable file(s) will be skipped" in report.warnings


def test_duplicates_within_and_across_classes(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=3, size=16, seed=0)
    shutil.copy(root / "circle" / "circle_00000.png", root / "circle" / "again.png")
    shutil.copy(root / "square" / "square_00001.png", root / "triangle" / "sneaky.png")
    report = check_folder(root)
    assert sorted(report.duplicates) == [
        sorted([str(root / "circle" / "again.png"), str(root / "circle" / "circle_00000.png")]),
        sorted([str(root / "square" / "square_00001.png"), str(root / "triangle" / "sneaky.png")]),
    ]
    assert "2 group(s) of identical files, 1 of them across classes" in report.warnings


def test_imbalance_warning(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=4, size=16, seed=0)
    for i in range(2):
        (root / "square" / f"square_{i:05d}.png").unlink()
    report = check_folder(root)
    assert report.warnings == ["class imbalance: 'circle' has 4 images, 'square' only 2 (2.0x)"]
    generate_shapes(tmp_path / "even", count=3, size=16, seed=1)
    (tmp_path / "even" / "circle" / "circle_00000.png").unlink()  # 2 vs 3: within 1.5x
    assert check_folder(tmp_path / "even").warnings == []


def test_a_class_whose_files_are_all_bad(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=2, size=16, seed=0)
    for path in (root / "triangle").iterdir():
        path.write_bytes(b"junk")
    report = check_folder(root)
    assert report.counts["all"]["triangle"] == 0
    assert "class 'triangle' has no usable images" in report.warnings


def test_split_layout_is_counted_per_split(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=3, size=16, seed=0)
    generate_shapes(tmp_path / "val", count=1, size=16, seed=1)
    report = check_folder(tmp_path)
    assert report.counts == {
        "train": {"circle": 3, "square": 3, "triangle": 3},
        "val": {"circle": 1, "square": 1, "triangle": 1},
    }
    data = report.to_dict()
    assert data["counts"] == report.counts and data["bad"] == []


def test_to_dict_is_plain_data(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=2, size=16, seed=0)
    (root / "circle" / "bad.png").write_bytes(b"")
    data = check_folder(root).to_dict()
    assert set(data) == {
        "root",
        "classes",
        "counts",
        "sizes",
        "modes",
        "bad",
        "duplicates",
        "warnings",
    }
    assert data["bad"] == [
        {
            "path": str(root / "circle" / "bad.png"),
            "reason": f"{root}/circle/bad.png: empty file (0 bytes)",
        }
    ]


def test_check_never_modifies_the_folder(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, count=2, size=16, seed=0)
    (root / "circle" / "bad.png").write_bytes(b"")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    check_folder(root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_unusable_folders_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        check_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="found only 'only'"):
        check_folder(tmp_path)
