"""``cnnkit data check``: what is in a folder data set, and what is wrong with it."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data.folder import ImageList, scan_folder
from cnnkit.data.images import open_image, read_image_file
from cnnkit.errors import ImageError, display_path

__all__ = ["DataReport", "check_folder"]

IMBALANCE_RATIO = 1.5  # largest class / smallest class above this is worth a warning


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
    hashes: dict[str, list[str]] = defaultdict(list)
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
                hashes[digest].append(display_path(file))
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
    report.duplicates = [sorted(group) for group in hashes.values() if len(group) > 1]
    _warn(report, layout.splits)
    return report


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
