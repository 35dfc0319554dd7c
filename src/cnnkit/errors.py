"""cnnkit's own exceptions.

Every error a user can cause is one of these, with a message precise enough to act on. The
CLI prints ``str(error)`` on one line and exits non-zero; library users catch ``CnnkitError``.

    CnnkitError
    ├── ConfigError       a config value, layer setting, preset name or flag is wrong
    ├── DataError         a data folder is missing, empty, has too few classes or bad files
    │   └── ImageError    one image cannot be decoded (corrupt, hostile, wrong format)
    ├── RunDirError       a path is not a usable run directory (missing or damaged files)
    ├── CheckpointError   a checkpoint is truncated, corrupt or unsafe to load
    │   └── WeightsError  pretrained weights cannot be found, fetched, trusted or fitted
    └── ExportError       an exported model disagrees with the original or cannot be written
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CnnkitError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ImageError",
    "RunDirError",
    "WeightsError",
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


class RunDirError(CnnkitError):
    """A run directory is missing or lacks the files cnnkit writes into it."""


class CheckpointError(CnnkitError):
    """A checkpoint or weights file is damaged or unsafe."""


class WeightsError(CheckpointError):
    """Pretrained weights (``--weights``) are missing, unreachable, unsafe or do not fit."""


class ExportError(CnnkitError):
    """An export failed or its result does not match the PyTorch model."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), at most ``limit``
    characters: the reason to put in a one-line error about a library's failure."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
