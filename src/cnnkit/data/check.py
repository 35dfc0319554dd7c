"""``cnnkit data check``: what is in a folder data set, and what is wrong with it.

Its duplicate finding is shared with training: ``group_identical`` groups the files it hashes,
and ``identical_rows`` finds images decoded to the same pixels, which a drawn split keeps on
one side and a given split names.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data.folder import ImageList, scan_folder
from cnnkit.data.images import open_image, read_image_file
from cnnkit.errors import ImageError, display_path

__all__ = ["DataReport", "check_folder", "group_identical", "identical_rows"]

IMBALANCE_RATIO = 1.5  # largest class / smallest class above this is worth a warning
HASH_BYTES = 32 << 20  # decoded pixels hashed per numpy pass (bounded memory, mapped arrays)


@dataclass
class DataReport:
    """Counts, sizes, modes, unreadable files and duplicates of a data set (file names as
    ``display_path`` prints them: safe to print, whatever bytes they hold)."""

    root: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> usable images
    sizes: dict[str, list[int]]  # min/median/max of width and height
    modes: dict[str, int]
    bad: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical files
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "classes": self.classes,
            "counts": self.counts,
            "sizes": self.sizes,
            "modes": self.modes,
            "bad": [{"path": p, "reason": r} for p, r in self.bad],
            "duplicates": self.duplicates,
            "warnings": self.warnings,
        }


def _inspect(path: str) -> tuple[str, tuple[int, int] | None, str | None, str]:
    """(sha256, size, mode or None, reason or '') of one file; decodes the pixels to verify.

    Only regular files of a bounded size are read (``read_image_file``): a FIFO or a link
    to ``/dev/zero`` named like an image is reported, not waited on or read forever.
    """
    name = display_path(path)
    try:
        data = read_image_file(path)
    except ImageError as exc:
        return "", None, None, str(exc)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with open_image(data, name) as image:
            size, mode = image.size, image.mode
            image.load()
    except ImageError as exc:
        return digest, None, None, str(exc)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return digest, None, None, f"{name}: unreadable ({exc})"
    return digest, size, mode, ""


def check_folder(path: str | Path) -> DataReport:
    """Read every image once and report on the data set; never modifies it."""
    layout = scan_folder(path)
    report = DataReport(display_path(layout.root), list(layout.classes), {}, {}, {})
    digests: list[str] = []  # sha256 of each readable file's bytes, beside its path
    paths: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    modes: Counter[str] = Counter()
    for split, files in layout.splits.items():
        report.counts[split] = {c: 0 for c in layout.classes}
        with ThreadPoolExecutor() as pool:
            results = list(pool.map(_inspect, files.paths, chunksize=32))
        for file, label, (digest, size, mode, reason) in zip(
            files.paths, files.labels, results, strict=True
        ):
            if digest:
                digests.append(digest)
                paths.append(display_path(file))
            if size is None:
                report.bad.append((display_path(file), reason))
                continue
            report.counts[split][layout.classes[label]] += 1
            widths.append(size[0])
            heights.append(size[1])
            modes[mode or "?"] += 1
    if widths:
        report.sizes = {
            "width": [int(np.min(widths)), int(np.median(widths)), int(np.max(widths))],
            "height": [int(np.min(heights)), int(np.median(heights)), int(np.max(heights))],
        }
    report.modes = dict(modes.most_common())
    report.duplicates = [sorted(paths[i] for i in group) for group in group_identical(digests)]
    _warn(report, layout.splits)
    return report


# ----------------------------------------------------------------------------- duplicates


def group_identical(keys: Sequence[Hashable]) -> list[list[int]]:
    """Positions of equal keys, one list per key that occurs twice or more, in first-seen
    order: the one grouping behind every duplicate cnnkit reports or keeps together."""
    where: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        where[key].append(i)
    return [group for group in where.values() if len(group) > 1]


def _row_hashes(images: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each uint8 row ``(N, ...)``: equal rows, equal hashes.

    Vectorised (each 8-byte word multiplied by its own odd constant, mixed, summed), so the
    decoded cache of 70,000 images hashes in about a tenth of a second where a hashlib call
    per image takes about one; ``identical_rows`` tells apart unequal rows that collide.
    """
    n = len(images)
    row_bytes = int(np.prod(images.shape[1:], dtype=np.int64))
    words = -(-row_bytes // 8)
    mix = np.random.default_rng(0).integers(1, 2**63, size=words, dtype=np.uint64) | np.uint64(1)
    out = np.empty(n, dtype=np.uint64)
    step = max(1, HASH_BYTES // max(row_bytes, 1))
    for start in range(0, n, step):
        block = np.ascontiguousarray(images[start : start + step]).reshape(-1, row_bytes)
        if row_bytes % 8:
            padded = np.zeros((len(block), words * 8), dtype=np.uint8)
            padded[:, :row_bytes] = block
            block = padded
        x = block.view(np.uint64) * mix  # (B, words), wrapping
        x ^= x >> np.uint64(31)
        out[start : start + len(x)] = x.sum(axis=1, dtype=np.uint64)
    return out


def identical_rows(parts: Sequence[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Groups of images with exactly the same decoded pixels, across one or more arrays.

    ``parts`` are uint8 arrays ``(N_k, S, S, C)`` of the same shape per row (decoded at the
    model's input size, as the cache holds them). Each group lists ``(part, row)`` pairs,
    two or more; byte-identical files always decode alike, so they are among these. Equal
    hashes are confirmed by comparing the pixels, so a hash collision never joins a group.
    """
    sizes = [len(part) for part in parts]
    if sum(sizes) < 2:
        return []
    hashes = np.concatenate([_row_hashes(part) for part in parts if len(part)])
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)  # only these need a closer look
    starts = np.cumsum([0, *sizes])
    part = np.searchsorted(starts, candidates, side="right") - 1
    where = list(zip(part.tolist(), (candidates - starts[part]).tolist(), strict=True))
    groups: list[list[tuple[int, int]]] = []
    for same_hash in group_identical(hashes[candidates].tolist()):
        rest = [where[i] for i in same_hash]
        while len(rest) > 1:
            first = np.asarray(parts[rest[0][0]][rest[0][1]])
            same = [np.array_equal(parts[k][r], first) for k, r in rest]
            if sum(same) > 1:
                groups.append([key for key, s in zip(rest, same, strict=True) if s])
            rest = [key for key, s in zip(rest, same, strict=True) if not s]
    return groups


def _warn(report: DataReport, splits: dict[str, ImageList]) -> None:
    training = report.counts.get("train") or report.counts.get("all") or {}
    nonzero = [n for n in training.values() if n]
    for name, n in training.items():
        if n == 0:
            report.warnings.append(f"class {name!r} has no usable images")
    if nonzero and max(nonzero) > IMBALANCE_RATIO * min(nonzero):
        big = max(training, key=lambda c: training[c])
        small = min((c for c in training if training[c]), key=lambda c: training[c])
        report.warnings.append(
            f"class imbalance: {big!r} has {training[big]} images, {small!r} only "
            f"{training[small]} ({training[big] / training[small]:.1f}x)"
        )
    if report.bad:
        report.warnings.append(f"{len(report.bad)} unreadable file(s) will be skipped")
    if report.duplicates:
        cross = sum(
            1 for group in report.duplicates if len({Path(p).parent.name for p in group}) > 1
        )
        extra = f", {cross} of them across classes" if cross else ""
        report.warnings.append(f"{len(report.duplicates)} group(s) of identical files{extra}")
