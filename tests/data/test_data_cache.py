"""Preparing a folder data set: bad files skipped and reported, the decode cache, channels,
normalisation statistics and memory-mapped arrays for data larger than RAM."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit.data.cache as cache_mod
import cnnkit.data.dataset as dataset_mod
from cnnkit.config import DataConfig
from cnnkit.data.cache import decode_cached
from cnnkit.data.dataset import ImageArray, channel_stats, load_split, prepare_data
from cnnkit.data.folder import scan_folder
from cnnkit.data.images import load_image
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import DataError

SIZE = 16


@pytest.fixture
def warnings_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    """cnnkit's log records (the CLI turns propagation off, so listen on its own logger)."""
    logger = logging.getLogger("cnnkit")
    monkeypatch.setattr(logger, "propagate", False)  # each record once
    logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    """Six 16x16 shapes per class (circle, square, triangle)."""
    return generate_shapes(tmp_path / "data", count=6, size=SIZE, seed=3)


def _lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def _add_bad_files(root: Path) -> dict[str, str]:
    """Every kind of bad file, in the circle class; returns {path: expected reason}."""
    good = (root / "circle" / "circle_00000.png").read_bytes()
    jpeg = root / "circle" / "photo.jpg"
    Image.open(root / "circle" / "circle_00001.png").save(jpeg, quality=90)
    jpeg_bytes = jpeg.read_bytes()
    jpeg.unlink()
    bad = {
        "zero.png": (b"", "empty file (0 bytes)"),
        "cut.png": (good[: len(good) * 2 // 3], "unreadable (image file is truncated"),
        "cut.jpg": (jpeg_bytes[: len(jpeg_bytes) // 2], "unreadable ("),
        "notes.png": (b"shopping list: eggs\n", "not an image in a supported format"),
        "folder.png": (None, "not a file"),
    }
    expected = {}
    for name, (data, reason) in bad.items():
        path = root / "circle" / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        expected[str(path)] = f"{path}: {reason}"
    return expected


# ------------------------------------------------------------------------ bad files


def test_every_bad_file_is_skipped_with_one_warning(
    small_set: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    expected = _add_bad_files(small_set)
    data = prepare_data(DataConfig(path=str(small_set), val_split=0.25), SIZE)
    warnings = _lines(warnings_log)
    assert len(warnings) == len(expected) + 1
    for path, reason in expected.items():
        (line,) = [w for w in warnings if path in w]
        assert line.startswith(f"skipped {reason}"), line
    assert warnings[-1] == f"18 images used, {len(expected)} skipped"
    assert data.skipped == len(expected)
    assert len(data.train) + len(data.val) == 18
    # Rows, labels and paths still line up after the skipped rows were dropped.
    for split in (data.train, data.val):
        for image, label, path in zip(split.images, split.labels, split.paths, strict=True):
            assert data.classes[label] == Path(path).parent.name
            assert np.array_equal(image, load_image(path, SIZE, 3))


def test_worker_processes_decode_exactly_what_one_process_does(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large set is decoded by forked workers, in chunks; the cache must not differ."""
    _add_bad_files(small_set)
    files = scan_folder(small_set).splits["all"]
    alone = decode_cached(files, SIZE, cache_root=tmp_path / "one")
    monkeypatch.setattr(cache_mod, "PARALLEL_FROM", 4)
    monkeypatch.setattr(cache_mod, "CHUNK", 5)  # 23 files: five chunks, bad files in several
    monkeypatch.setattr(cache_mod, "allowed_cpus", lambda: {0, 1})
    log = tmp_path / "pids"
    real = cache_mod.decode_image

    def recorded(*args: object) -> tuple:
        with open(log, "a") as f:  # forked workers inherit this patch; their pids land here
            f.write(f"{os.getpid()}\n")
        return real(*args)

    monkeypatch.setattr(cache_mod, "decode_image", recorded)
    shared = decode_cached(files, SIZE, cache_root=tmp_path / "many")
    pids = set(log.read_text().split())
    assert pids and str(os.getpid()) not in pids  # the workers decoded, not this process
    assert shared.paths == alone.paths and shared.skipped == alone.skipped
    assert np.array_equal(shared.labels, alone.labels)
    assert np.array_equal(np.asarray(shared.images), np.asarray(alone.images))
    assert len(alone.skipped) == 5 and len(alone) == 18


def test_strict_makes_bad_files_an_error(small_set: Path) -> None:
    expected = _add_bad_files(small_set)
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(path=str(small_set), strict=True), SIZE)
    message = str(info.value)
    assert message.startswith(f"{len(expected)} unreadable image(s) with data.strict, first: ")
    first = message.split("first: ", 1)[1]
    assert any(first.startswith(reason) for reason in expected.values()), first


def test_strict_also_fails_on_a_cached_set(small_set: Path) -> None:
    _add_bad_files(small_set)
    prepare_data(DataConfig(path=str(small_set)), SIZE)  # caches, skipping the bad files
    with pytest.raises(DataError, match=r"with data\.strict"):
        prepare_data(DataConfig(path=str(small_set), strict=True), SIZE)


def test_a_class_whose_images_are_all_bad(small_set: Path) -> None:
    for path in (small_set / "square").iterdir():
        path.write_bytes(b"not a picture")
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(path=str(small_set)), SIZE)
    assert str(info.value) == f"{small_set}: class 'square' has no usable images"


def test_a_val_folder_without_images(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=3, size=SIZE, seed=0)
    for kind in ("circle", "square", "triangle"):
        (tmp_path / "val" / kind).mkdir(parents=True)
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(path=str(tmp_path)), SIZE)
    assert str(info.value) == f"{tmp_path / 'val'}: no usable images to validate on"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(
    small_set: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    locked = small_set / "circle" / "circle_00002.png"
    locked.chmod(0)
    try:
        prepare_data(DataConfig(path=str(small_set)), SIZE)
    finally:
        locked.chmod(0o644)
    assert f"skipped {locked}: permission denied" in _lines(warnings_log)
    assert "17 images used, 1 skipped" in _lines(warnings_log)


# -------------------------------------------------------------------------- layouts


def test_train_val_layout_keeps_the_given_split(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=4, size=SIZE, seed=0)
    generate_shapes(tmp_path / "val", count=2, size=SIZE, seed=1)
    data = prepare_data(DataConfig(path=str(tmp_path)), SIZE)
    assert data.classes == ("circle", "square", "triangle")
    assert all("/train/" in p for p in data.train.paths)
    assert all("/val/" in p for p in data.val.paths)
    assert np.bincount(data.val.labels).tolist() == [2, 2, 2]


def test_test_folder_is_used_when_there_is_no_val(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=4, size=SIZE, seed=0)
    generate_shapes(tmp_path / "test", count=1, size=SIZE, seed=1)
    data = prepare_data(DataConfig(path=str(tmp_path)), SIZE)
    assert len(data.val) == 3 and all("/test/" in p for p in data.val.paths)


def test_flat_layout_split_is_stratified_and_reproducible(small_set: Path) -> None:
    a = prepare_data(DataConfig(path=str(small_set), val_split=0.5, seed=1), SIZE)
    b = prepare_data(DataConfig(path=str(small_set), val_split=0.5, seed=1), SIZE)
    c = prepare_data(DataConfig(path=str(small_set), val_split=0.5, seed=2), SIZE)
    assert a.val.paths == b.val.paths and a.val.paths != c.val.paths
    assert np.bincount(a.val.labels).tolist() == [3, 3, 3]
    assert not set(a.train.paths) & set(a.val.paths)


def test_load_split_redraws_the_training_split(small_set: Path) -> None:
    cfg = DataConfig(path=str(small_set), val_split=0.5, seed=4)
    data = prepare_data(cfg, SIZE)
    classes = ("triangle", "square", "circle", "star")  # a model's own class order
    val = load_split(small_set, "val", classes, cfg, SIZE, 3)
    assert val.paths == data.val.paths
    assert [classes[i] for i in val.labels] == [data.classes[i] for i in data.val.labels]
    # auto: the validation part of the run's own folder, all of any other one
    assert load_split(small_set, "auto", classes, cfg, SIZE, 3).paths == data.val.paths
    assert len(load_split(small_set, "all", classes, cfg, SIZE, 3)) == 18
    elsewhere = DataConfig(path=str(small_set / "circle"), val_split=0.5, seed=4)
    assert len(load_split(small_set, "auto", classes, elsewhere, SIZE, 3)) == 18
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(small_set, "dev", classes, cfg, SIZE, 3)
    with pytest.raises(DataError, match="class 'circle' is not one the model knows"):
        load_split(small_set, "all", ("square", "triangle"), cfg, SIZE, 3)


def test_channel_stats_match_numpy(small_set: Path) -> None:
    data = prepare_data(DataConfig(path=str(small_set)), SIZE)
    x = np.asarray(data.train.images, dtype=np.float64) / 255.0
    np.testing.assert_allclose(data.preprocessing.mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(data.preprocessing.std, x.std(axis=(0, 1, 2)), atol=1e-6)
    flat = np.zeros((3, 2, 2, 1), np.uint8)
    assert channel_stats(flat) == ([0.0], [0.001])  # a constant image: std floored
    # uint8 images are counted per value; other dtypes go through floats: the same figures
    # (each rounded to 6 decimals, so they may differ in the last one)
    many = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        channel_stats(many), channel_stats(many.astype(np.float32)), rtol=0, atol=1.01e-6
    )
    with pytest.raises(DataError, match="no images"):
        channel_stats(flat[:0])


# --------------------------------------------------------------------------- caching


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = cache_mod.decode_image

    def counting(source, *args, **kwargs):
        calls.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "decode_image", counting)
    return calls


def test_second_prepare_decodes_nothing(small_set: Path, count_decodes: list[str]) -> None:
    cfg = DataConfig(path=str(small_set))
    first = prepare_data(cfg, SIZE)
    assert len(count_decodes) == 18
    second = prepare_data(cfg, SIZE)
    assert len(count_decodes) == 18  # every image came from the cache
    assert np.array_equal(first.train.images, second.train.images)
    assert first.val.paths == second.val.paths and first.preprocessing == second.preprocessing


def test_changed_file_is_decoded_again(small_set: Path, count_decodes: list[str]) -> None:
    cfg = DataConfig(path=str(small_set), val_split=0.5)
    first = prepare_data(cfg, SIZE)
    target = small_set / "square" / "square_00001.png"
    Image.new("RGB", (SIZE, SIZE), (255, 0, 255)).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    count_decodes.clear()
    second = prepare_data(cfg, SIZE)
    assert str(target) in count_decodes
    split = second.train if str(target) in second.train.paths else second.val
    row = split.paths.index(str(target))
    assert (split.images[row] == [255, 0, 255]).all()
    assert not np.array_equal(
        np.concatenate([first.train.images, first.val.images]),
        np.concatenate([second.train.images, second.val.images]),
    )


def test_touching_a_file_invalidates_the_cache(small_set: Path, count_decodes: list[str]) -> None:
    cfg = DataConfig(path=str(small_set))
    prepare_data(cfg, SIZE)
    target = small_set / "circle" / "circle_00000.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    count_decodes.clear()
    prepare_data(cfg, SIZE)
    assert str(target) in count_decodes


def test_settings_are_part_of_the_cache_key(small_set: Path, count_decodes: list[str]) -> None:
    prepare_data(DataConfig(path=str(small_set)), SIZE)
    for cfg, size in (
        (DataConfig(path=str(small_set), resize="pad"), SIZE),
        (DataConfig(path=str(small_set), channels="1"), SIZE),
        (DataConfig(path=str(small_set)), 8),
    ):
        count_decodes.clear()
        data = prepare_data(cfg, size)
        assert len(count_decodes) == 18
        assert data.train.images.shape[1:3] == (size, size)


def test_an_auto_decode_serves_its_resolved_channel_count(
    small_set: Path, count_decodes: list[str]
) -> None:
    auto = prepare_data(DataConfig(path=str(small_set)), SIZE)
    assert auto.preprocessing.channels == 3 and len(count_decodes) == 18
    count_decodes.clear()
    explicit = prepare_data(DataConfig(path=str(small_set), channels="3"), SIZE)
    assert count_decodes == []  # what a resumed run or an evaluation asks for by number
    assert np.array_equal(explicit.train.images, auto.train.images)
    grey = prepare_data(DataConfig(path=str(small_set), channels="1"), SIZE)
    assert len(count_decodes) == 18 and grey.preprocessing.channels == 1


def _cache_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncate-array", "garbage-meta", "no-meta", "no-array"])
def test_a_damaged_cache_is_rebuilt(
    small_set: Path, tmp_path: Path, count_decodes: list[str], damage: str
) -> None:
    cfg = DataConfig(path=str(small_set), cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, SIZE)
    (folder,) = _cache_folders(tmp_path / "cache")
    if damage == "truncate-array":
        with open(folder / "images.npy", "r+b") as f:
            f.truncate(200)
    elif damage == "garbage-meta":
        (folder / "meta.json").write_text("{not json")
    elif damage == "no-meta":
        (folder / "meta.json").unlink()
    else:
        (folder / "images.npy").unlink()
    count_decodes.clear()
    second = prepare_data(cfg, SIZE)
    assert len(count_decodes) == 18
    assert np.array_equal(first.train.images, second.train.images)
    assert json.loads((folder / "meta.json").read_text())["channels"] == 3
    count_decodes.clear()
    prepare_data(cfg, SIZE)
    assert count_decodes == []  # and the rebuilt cache is used from then on


def test_cache_dir_setting_and_environment(small_set: Path, tmp_path: Path) -> None:
    files = scan_folder(small_set).splits["all"]
    decoded = decode_cached(files, SIZE, cache_root=tmp_path / "mine")
    assert not decoded.from_cache and len(_cache_folders(tmp_path / "mine")) == 1
    assert decode_cached(files, SIZE, cache_root=tmp_path / "mine").from_cache
    assert isinstance(decoded.images, np.memmap)  # on disk, paged in by the OS
    assert Path(os.environ["CNNKIT_CACHE_DIR"]) == cache_mod.default_cache_root()


def test_default_cache_root_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNNKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert cache_mod.default_cache_root() == Path("/x/cache/cnnkit")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_mod.default_cache_root() == Path.home() / ".cache" / "cnnkit"


# -------------------------------------------------------------------------- channels


def _to_grey(root: Path, mode: str = "L") -> None:
    for path in root.rglob("*.png"):
        Image.open(path).convert(mode).save(path)


def test_all_greyscale_gives_one_channel(small_set: Path) -> None:
    _to_grey(small_set)
    (small_set / "circle" / "circle_00000.png").unlink()
    Image.new("LA", (SIZE, SIZE), (90, 255)).save(small_set / "circle" / "la.png")
    Image.new("1", (SIZE, SIZE), 1).save(small_set / "circle" / "bits.png")
    data = prepare_data(DataConfig(path=str(small_set)), SIZE)
    assert data.preprocessing.channels == 1
    assert data.train.images.shape[1:] == (SIZE, SIZE, 1)
    assert len(data.preprocessing.mean) == len(data.preprocessing.std) == 1


def test_auto_greyscale_pixels_equal_a_greyscale_decode(tmp_path: Path) -> None:
    """Auto decodes with three channels and keeps one: exactly the greyscale decode."""
    rng = np.random.default_rng(0)
    root = tmp_path / "grey"
    for cls, (w, h) in (("a", (37, 23)), ("b", (19, 41))):  # resized and cropped to SIZE
        (root / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / cls / "l.png")
        wide = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        Image.fromarray(wide).save(root / cls / "i16.png")  # 16-bit: scaled, not clipped
        la = Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), mode="LA")
        la.save(root / cls / "la.png")  # alpha composited onto white
    decoded = decode_cached(scan_folder(root).splits["all"], SIZE, cache_root=tmp_path / "c")
    assert decoded.channels == 1
    for path, image in zip(decoded.paths, decoded.images, strict=True):
        assert np.array_equal(image, load_image(path, SIZE, channels=1)), path


def test_one_colour_image_gives_three_channels(small_set: Path) -> None:
    _to_grey(small_set)
    Image.new("RGB", (SIZE, SIZE), (200, 0, 0)).save(small_set / "square" / "colour.png")
    data = prepare_data(DataConfig(path=str(small_set)), SIZE)
    assert data.preprocessing.channels == 3 and data.train.images.shape[-1] == 3


def test_channels_can_be_forced(small_set: Path) -> None:
    _to_grey(small_set)
    assert (
        prepare_data(DataConfig(path=str(small_set), channels="3"), SIZE).preprocessing.channels
        == 3
    )
    colour = small_set.parent / "colour"
    generate_shapes(colour, count=2, size=SIZE, seed=0)
    assert (
        prepare_data(DataConfig(path=str(colour), channels="1"), SIZE).preprocessing.channels == 1
    )


def test_val_split_folder_follows_the_training_channels(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=3, size=SIZE, seed=0)
    generate_shapes(tmp_path / "val", count=1, size=SIZE, seed=1)
    _to_grey(tmp_path / "train")
    data = prepare_data(DataConfig(path=str(tmp_path)), SIZE)
    assert data.preprocessing.channels == 1
    assert data.val.images.shape[-1] == 1  # colour val images become grey too


# ------------------------------------------------------------------ larger than RAM


def test_memory_mapped_path_gives_the_same_batches(
    small_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(path=str(small_set), val_split=0.25)
    in_ram = prepare_data(cfg, SIZE)
    assert isinstance(in_ram.train.images, np.ndarray)
    monkeypatch.setattr(dataset_mod, "_ram_bytes", lambda: 1024)  # "RAM" smaller than the data
    mapped = prepare_data(cfg, SIZE)
    assert not isinstance(mapped.train.images, np.ndarray)
    assert mapped.train.images.shape == in_ram.train.images.shape
    assert len(mapped.train.images) == len(in_ram.train)
    assert mapped.preprocessing == in_ram.preprocessing
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        a: ImageArray = getattr(in_ram, split)
        b: ImageArray = getattr(mapped, split)
        assert a.paths == b.paths
        idx = rng.permutation(len(a))[:7]
        xa, ya = a.batch(idx)
        xb, yb = b.batch(idx)
        assert xa.equal(xb) and ya.equal(yb)
        assert np.array_equal(b.images[2:5], a.images[2:5])  # slices, as batched inference uses
        assert np.array_equal(b.images[3], a.images[3])


def test_ram_fraction_decides(small_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_mod, "RAM_FRACTION", 0.0)
    data = prepare_data(DataConfig(path=str(small_set)), SIZE)
    assert not isinstance(data.val.images, np.ndarray)


def test_cache_survives_its_source_files_moving(small_set: Path, tmp_path: Path) -> None:
    """A moved data set is a different set of files: it is decoded anew, not mixed up."""
    first = prepare_data(DataConfig(path=str(small_set)), SIZE)
    moved = tmp_path / "moved"
    shutil.copytree(small_set, moved)
    second = prepare_data(DataConfig(path=str(moved)), SIZE)
    assert all(p.startswith(str(moved)) for p in second.train.paths)
    assert np.array_equal(first.train.images, second.train.images)
