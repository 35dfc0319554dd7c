"""The ``cnnkit`` command: parses arguments and calls library functions, nothing more.

Every ``CnnkitError`` becomes one line on stderr (``error: ...``) and exit status 1. Each
module here registers its commands on the one typer ``app``.
"""

from __future__ import annotations

from cnnkit.cli import data, inspect, model, ship, train  # noqa: F401 - importing registers the commands
from cnnkit.cli._app import app
from cnnkit.cli._process import exit_process

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point (ends the process without the interpreter's teardown)."""
    try:
        app(prog_name="cnnkit")
    except SystemExit as exc:
        exit_process(exc.code)
    exit_process(0)
