"""The ``cnnkit`` command: parses arguments and calls library functions, nothing more.

Every ``CnnkitError`` becomes one line on stderr (``error: ...``) and exit status 1. Each
module here registers its commands on the one typer ``app``.
"""

from __future__ import annotations

from cnnkit.cli import data, inspect, model, ship, train  # noqa: F401 - importing registers the commands
from cnnkit.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cnnkit")
