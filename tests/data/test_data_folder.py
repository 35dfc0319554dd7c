"""Finding a folder data set's classes and images, and splitting them deterministically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.folder import scan_folder, stratified_split
from cnnkit.errors import DataError


def make_png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def make_set(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            make_png(root / name / f"{i:03d}.png", i)
    return root


def _names(root: Path, paths: tuple[str, ...]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_flat_layout_classes_labels_and_order(tmp_path: Path) -> None:
    root = make_set(tmp_path, {"dog": 2, "cat": 3})
    layout = scan_folder(root)
    assert layout.classes == ("cat", "dog")  # sorted by name
    assert not layout.has_split and list(layout.splits) == ["all"]
    files = layout.splits["all"]
    assert _names(root, files.paths) == [
        "cat/000.png",
        "cat/001.png",
        "cat/002.png",
        "dog/000.png",
        "dog/001.png",
    ]
    assert files.labels == (0, 0, 0, 1, 1)


def test_hidden_files_folders_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    root = make_set(tmp_path, {"a": 1, "b": 1})
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "a" / "._000.png").write_bytes(b"\0\5\26\7AppleDouble")
    make_png(root / ".ipynb_checkpoints" / "x.png")  # would be a third class
    make_png(root / "a" / ".ipynb_checkpoints" / "y.png")
    make_png(root / "__MACOSX" / "a" / "z.png")
    (root / "a" / "notes.txt").write_text("labels were checked")
    (root / "README.md").write_text("a data set")
    make_png(root / "b" / "nested" / "deeper.png")  # sub-folders of a class are included
    layout = scan_folder(root)
    assert layout.classes == ("a", "b")
    assert _names(root, layout.splits["all"].paths) == [
        "a/000.png",
        "b/000.png",
        "b/nested/deeper.png",
    ]


def test_suffixes_are_case_insensitive(tmp_path: Path) -> None:
    make_set(tmp_path, {"a": 1})
    make_png(tmp_path / "b" / "PHOTO.PNG")
    (tmp_path / "b" / "scan.JPEG").write_bytes(b"x")
    assert len(scan_folder(tmp_path).splits["all"]) == 3


def test_a_folder_named_like_an_image_is_listed_to_be_reported(tmp_path: Path) -> None:
    root = make_set(tmp_path, {"a": 1, "b": 1})
    make_png(root / "a" / "odd.png" / "inside.png")
    paths = _names(root, scan_folder(root).splits["all"].paths)
    assert paths == ["a/000.png", "a/odd.png", "b/000.png"]  # not walked into, not hidden


def test_nested_order_and_symlinked_folders_are_not_followed(tmp_path: Path) -> None:
    root = make_set(tmp_path / "d", {"a": 1, "b": 1})
    make_png(root / "a" / "sub" / "z.png")
    make_png(root / "a" / "sub" / "deeper" / "y.png")
    make_png(root / "a" / "zz.png")  # a class's own files come before its sub-folders
    (root / "a" / "loop").symlink_to(root / "a")  # would recurse forever if followed
    (root / "b" / "elsewhere").symlink_to(root / "a" / "sub")
    assert _names(root, scan_folder(root).splits["all"].paths) == [
        "a/000.png",
        "a/zz.png",
        "a/sub/z.png",
        "a/sub/deeper/y.png",
        "b/000.png",
    ]


@pytest.mark.parametrize("held", ["val", "test"])
def test_train_and_val_or_test_layouts(tmp_path: Path, held: str) -> None:
    make_set(tmp_path / "train", {"x": 3, "y": 2})
    make_set(tmp_path / held, {"x": 1, "y": 1})
    layout = scan_folder(tmp_path)
    assert layout.has_split
    assert layout.classes == ("x", "y")
    assert set(layout.splits) == {"train", held}
    assert layout.splits["train"].labels == (0, 0, 0, 1, 1)
    assert layout.splits[held].labels == (0, 1)


def test_train_val_and_test_together(tmp_path: Path) -> None:
    make_set(tmp_path / "train", {"x": 2, "y": 2})
    make_set(tmp_path / "val", {"y": 1})  # a held-out split may lack a class
    make_set(tmp_path / "test", {"x": 1, "y": 1})
    layout = scan_folder(tmp_path)
    assert set(layout.splits) == {"train", "val", "test"}
    assert layout.splits["val"].labels == (1,)  # labelled by the training classes


def test_val_class_not_in_train_is_an_error(tmp_path: Path) -> None:
    make_set(tmp_path / "train", {"x": 2, "y": 2})
    make_set(tmp_path / "val", {"x": 1, "zebra": 1})
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    assert str(info.value) == f"{tmp_path / 'val'}: class 'zebra' is not among the training classes"


def test_a_train_folder_alone_is_just_a_class(tmp_path: Path) -> None:
    make_set(tmp_path, {"train": 2, "other": 2})
    layout = scan_folder(tmp_path)
    assert not layout.has_split and layout.classes == ("other", "train")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^data folder not found: {tmp_path / 'nope'}$"):
        scan_folder(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    path = make_png(tmp_path / "one.png")
    with pytest.raises(DataError, match=f"^not a folder: {path} \\(expected one sub-folder"):
        scan_folder(path)


def test_no_classes_and_one_class(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: need at least two classes (one sub-folder of images each), found none"
    )
    make_set(tmp_path, {"lonely": 2})
    with pytest.raises(DataError, match=r"need at least two classes .*, found only 'lonely'$"):
        scan_folder(tmp_path)


def test_a_class_without_images(tmp_path: Path) -> None:
    make_set(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    assert str(info.value) == f"{tmp_path / 'b'}: class 'b' has no images"


# ---------------------------------------------------------------------------- splitting


LABELS = np.array([0] * 50 + [1] * 30 + [2] * 7 + [3] * 2 + [4] * 1)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = stratified_split(LABELS, 0.2, seed=5)
    again = stratified_split(LABELS, 0.2, seed=5)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(len(LABELS)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted indices


def test_split_is_stratified() -> None:
    _, val = stratified_split(LABELS, 0.2, seed=0)
    per_class = np.bincount(LABELS[val], minlength=5).tolist()
    # round(n * 0.2), but at least one for every class that has two or more images
    assert per_class == [10, 6, 1, 1, 0]


def test_different_seeds_draw_different_splits() -> None:
    vals = {tuple(stratified_split(LABELS, 0.2, seed=s)[1]) for s in range(5)}
    assert len(vals) == 5
    for val in vals:
        assert np.bincount(LABELS[list(val)], minlength=5).tolist() == [10, 6, 1, 1, 0]


def test_split_fractions() -> None:
    labels = np.repeat(np.arange(3), 40)
    for fraction in (0.1, 0.25, 0.5, 0.9):
        _, val = stratified_split(labels, fraction, seed=1)
        assert np.bincount(labels[val]).tolist() == [round(40 * fraction)] * 3
    train, val = stratified_split(labels, 0.0, seed=1)
    assert len(val) == 0 and len(train) == 120
