"""cnnkit's own exceptions.

Every error a user can cause is one of these, with a message precise enough to act on. The
CLI prints it on one line and exits non-zero; library users catch ``CnnkitError``.

    CnnkitError
    ├── ConfigError       a config value, layer setting, preset name or argument is wrong
    ├── DataError         a data folder is missing, empty, has too few classes or bad files
    │   └── ImageError    one image cannot be decoded (corrupt, hostile, wrong format)
    │       └── ImageTooLarge  refused for the memory or work decoding it would take
    ├── RunDirError       a path is not a usable run directory (missing or damaged files)
    ├── CheckpointError   a checkpoint is truncated, corrupt or unsafe to load
    │   └── WeightsError  pretrained weights cannot be found, fetched, trusted or fitted
    ├── OutputError       an output path holds files cnnkit did not write, or cannot be written
    ├── ExportError       an exported model disagrees with the original or cannot be written
    ├── MissingDependencyError  an optional package (an extra) is not installed
    └── TrainingInterrupted  SIGINT or SIGTERM stopped training; a checkpoint was saved

Errors carry facts beside their words (``setting``, ``path``, ``value``, ``limit``; an
``ImageError``'s ``reason``), so that the edges decide by type and field, never by reading
the message: the server answers 413 for an ``ImageTooLarge``, names an upload its own way,
and the CLI spells a setting as the flag its user typed (``words``).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from typing import Any

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
    "TrainingInterrupted",
    "WeightsError",
    "display_path",
    "first_line",
]


class CnnkitError(Exception):
    """Base of every error cnnkit raises on purpose.

    ``str(error)`` is the whole message, in the library's terms. The facts travel beside it
    as fields: ``setting`` (what the caller set, as the library names it: an argument such
    as ``out`` or ``class_name``, a config field such as ``train.weights``), ``path`` (the
    file or folder), ``value`` (what was given), ``limit`` (what it may be), and any other
    keyword in ``details``.

    An error that names a ``setting`` has a template for a message, because a command line
    spells settings as flags: ``{setting}`` stands for its own, ``{overwrite=True}`` (any
    other field name) for one it advises, and the facts fill ``{path}``, ``{value!r}``,
    ``{limit:,}`` and ``{detail}``. ``str()`` names settings as the library does;
    ``words(names)`` as ``names`` says (``cnnkit.cli`` passes its flags). Whatever a user
    gave goes into such a template as a field, never formatted into it (a brace in a file
    name would be read as a field).
    """

    def __init__(
        self,
        message: str,
        *,
        setting: str | None = None,
        path: str | os.PathLike[str] | None = None,
        value: Any = None,
        limit: Any = None,
        **details: Any,
    ) -> None:
        self.setting, self.path, self.value, self.limit = setting, path, value, limit
        self.details = details
        self.template = message if setting is not None else None
        super().__init__(self.words() if setting is not None else message)

    def words(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each setting it names spelled as ``names`` says (a setting not
        in ``names`` keeps the library's name): how a front end words the same facts."""
        if self.template is None or self.setting is None:
            return str(self.args[0]) if self.args else ""
        names = names or {}
        facts = {
            **self.details,
            "setting": names.get(self.setting, self.setting),
            "path": None if self.path is None else display_path(self.path),
            "value": self.value,
            "limit": self.limit,
        }
        return _Filler(facts, names).format(self.template)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields, not by calling __init__ with ``args`` again: subclasses
        # take other arguments (a DataLoader worker or a process pool pickles errors).
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[CnnkitError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class _Filler(string.Formatter):
    """Fills a message template: facts by name, and every other field as a setting, spelled
    by ``names`` or as written (``train.weights`` and ``overwrite=True`` are one name each,
    not an attribute lookup)."""

    def __init__(self, facts: Mapping[str, Any], names: Mapping[str, str]) -> None:
        super().__init__()
        self.facts, self.names = facts, names

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        if field_name in self.facts:
            return self.facts[field_name], field_name
        return self.names.get(field_name, field_name), field_name


class ConfigError(CnnkitError, ValueError):
    """A configuration value, layer setting or option is invalid."""


class DataError(CnnkitError):
    """A data set cannot be used as given."""


class ImageError(DataError):
    """One image cannot be read. The message is ``"{source}: {reason}"``: ``source`` names the
    image (a file's printable path, ``<image bytes>``), ``reason`` says why, so that a server
    can name an upload its own way. ``path`` is the file, when it was one."""

    def __init__(
        self,
        source: str,
        reason: str,
        *,
        path: str | os.PathLike[str] | None = None,
        value: Any = None,
        limit: Any = None,
    ) -> None:
        super().__init__(f"{source}: {reason}", path=path, value=value, limit=limit)
        self.source, self.reason = source, reason


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
    """Pretrained weights (``train.weights``) are missing, unreachable, unsafe or do not fit."""


class ExportError(CnnkitError):
    """An export failed or its result does not match the PyTorch model."""


class MissingDependencyError(CnnkitError, ImportError):
    """An optional module is missing; ``command`` is the ``pip install`` line that adds it."""

    def __init__(self, message: str, module: str, command: str) -> None:
        super().__init__(message)
        self.module, self.command = module, command


class TrainingInterrupted(CnnkitError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed.
    ``signal`` is the signal's name (``SIGINT``), ``path`` the run directory to resume; the
    message says how in Python (the CLI says how on the command line)."""

    def __init__(self, signal: str, path: str | os.PathLike[str]) -> None:
        super().__init__(
            "interrupted by {signal}; checkpoint saved, continue with: "
            "cnnkit.training.train(None, {path!r}, resume=True)",
            setting="resume",
            path=path,
            signal=signal,
        )
        self.signal = signal


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
