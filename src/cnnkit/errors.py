"""cnnkit's own exceptions.

Every error a user can cause is one of these, with a message precise enough to act on. The
CLI prints ``str(error)`` on one line and exits non-zero; library users catch ``CnnkitError``.

    CnnkitError
    ├── ConfigError       a config value, layer setting, preset name or flag is wrong
    ├── DataError         a data folder is missing, empty, has too few classes or bad files
    │   └── ImageError    one image cannot be decoded (corrupt, hostile, wrong format)
    │       └── ImageTooLarge  refused for the memory or work decoding it would take
    ├── RunDirError       a path is not a usable run directory (missing or damaged files)
    ├── CheckpointError   a checkpoint is truncated, corrupt or unsafe to load
    │   └── WeightsError  pretrained weights cannot be found, fetched, trusted or fitted
    ├── OutputError       an output path holds files cnnkit did not write, or cannot be written
    ├── ExportError       an exported model disagrees with the original or cannot be written
    └── MissingDependencyError  an optional package (an extra) is not installed
"""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError",
    "CnnkitError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ImageError",
    "ImageTooLarge",
    "MissingDependencyError",
    "OutputError",
    "RunDirError",
    "WeightsError",
    "display_path",
    "first_line",
]


class CnnkitError(Exception):
    """Base of every error cnnkit raises on purpose."""


class ConfigError(CnnkitError, ValueError):
    """A configuration value, layer setting or option is invalid."""


class DataError(CnnkitError):
    """A data set cannot be used as given."""


class ImageError(DataError):
    """One image cannot be read; the message names the file (when known) and the reason."""


class ImageTooLarge(ImageError):
    """An image refused before decoding for its pixels, file size or decode work (a
    decompression bomb, a JPEG with thousands of scans); the server answers 413."""


class RunDirError(CnnkitError):
    """A run directory is missing or lacks the files cnnkit writes into it."""


class CheckpointError(CnnkitError):
    """A checkpoint or weights file is damaged or unsafe."""


class OutputError(CnnkitError):
    """An output path is taken by files cnnkit did not write, or cannot be written."""


class WeightsError(CheckpointError):
    """Pretrained weights (``--weights``) are missing, unreachable, unsafe or do not fit."""


class ExportError(CnnkitError):
    """An export failed or its result does not match the PyTorch model."""


class MissingDependencyError(CnnkitError, ImportError):
    """An optional module is missing; ``command`` is the ``pip install`` line that adds it."""

    def __init__(self, message: str, module: str, command: str) -> None:
        super().__init__(message)
        self.module, self.command = module, command


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), at most ``limit``
    characters: the reason to put in a one-line error about a library's failure."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def display_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A file name safe to print anywhere: bytes that are not UTF-8 as ``\\xe9``, control
    characters (a newline could forge a log line) as ``\\n`` or ``\\x1b``.

    Linux file names are bytes; Python holds undecodable ones as lone surrogates, which crash
    ``print`` and ``str.encode`` with ``UnicodeEncodeError``.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
