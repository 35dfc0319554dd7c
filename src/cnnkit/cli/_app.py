"""The typer application and what every command shares: output consoles, error handling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from cnnkit.console import console, setup_logging
from cnnkit.errors import CnnkitError

app = typer.Typer(
    name="cnnkit",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Train, understand and ship CNN image classifiers.",
)
data_app = typer.Typer(no_args_is_help=True, help="Make and check image data sets.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect network architectures.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
out = Console(highlight=False, soft_wrap=True)  # results go to stdout, messages to stderr

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn cnnkit's own errors into ``error: ...`` and exit 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(verbose=not kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except CnnkitError as exc:
            console.print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["app", "console", "data_app", "model_app", "one_line_errors", "out"]
