"""Optional modules, imported when a feature first needs them, with an install hint if absent.

ONNX export and prediction need ``onnx``, ``onnxruntime`` and ``onnxscript`` (the ``export``
extra); the server needs ``fastapi``, ``uvicorn`` and ``python-multipart`` (the ``serve``
extra). ``make install`` installs both. Anyone who installed cnnkit without them gets one
line that names the missing module and the exact command that installs the whole extra,
instead of a ``ModuleNotFoundError`` traceback from deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cnnkit.errors import MissingDependencyError

__all__ = ["EXTRAS", "install_command", "require", "require_extra"]

# extra -> (module imported, distribution installed); kept equal to pyproject.toml's extras
# by tests/test_extras.py.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "export": (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")),
    "serve": (
        ("fastapi", "fastapi"),
        ("uvicorn", "uvicorn"),
        ("python_multipart", "python-multipart"),
    ),
}


def install_command(extra: str) -> str:
    """The pip line that installs ``extra``'s packages at the versions cnnkit is tested with."""
    packages = " ".join(dist for _, dist in EXTRAS[extra])
    return f"pip install -c constraints.txt {packages}"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or ``MissingDependencyError`` saying that ``feature`` needs it and
    how to install ``extra`` (``require("onnxruntime", "export", "predicting with .onnx")``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # ModuleNotFoundError, or a broken install of it
        absent = isinstance(exc, ModuleNotFoundError) and exc.name == module
        state = "is not installed" if absent else f"cannot be imported ({exc})"
        command = install_command(extra)
        raise MissingDependencyError(
            f"{feature} needs the Python package {module!r}, which {state}; "
            f"install cnnkit's {extra!r} extra: {command}",
            module,
            command,
        ) from None


def require_extra(extra: str, feature: str) -> None:
    """Import every module of ``extra`` (``require`` for each): one error before any work."""
    for module, _ in EXTRAS[extra]:
        require(module, extra, feature)
