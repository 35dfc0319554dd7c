"""The typer application and what every command shares: output consoles, error handling.

Every error reads as one line on stderr starting with ``error:``: cnnkit's own errors (exit
1, through ``one_line_errors``) and the command line's usage errors (unknown option, missing
argument, a value of the wrong type: exit 2), which typer would otherwise draw as a box.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console

# typer 0.29 ships its own copy of click: its exceptions are these, not the click package's
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

import cnnkit
from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from cnnkit.console import console, setup_logging
from cnnkit.errors import CnnkitError, TrainingInterrupted, display_path

F = TypeVar("F", bound=Callable[..., Any])


def _one_line(exc: ClickException) -> str:
    """A usage error's message on one line, with where to find the right usage."""
    text = " ".join(exc.format_message().split())
    if text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    ctx = exc.ctx if isinstance(exc, UsageError) else None
    return f"{text.rstrip('.')}; see '{ctx.command_path} --help'" if ctx is not None else text


def _config_defaults() -> dict[str, Any]:
    """What ``cnnkit train``'s unset flags fall back to: the config dataclasses' defaults."""
    defaults: dict[str, Any] = {"model": RunConfig().model, "augment": AugmentConfig().enabled}
    for config in (DataConfig(), AugmentConfig(), TrainConfig()):
        for field in dataclasses.fields(config):
            defaults.setdefault(field.name, getattr(config, field.name))
    return defaults


def _show_train_defaults(group: Any) -> None:
    """Let ``cnnkit train --help`` show each flag's default: the flags default to None (so a
    config file and a model's recommended settings can fill them), the config to a value."""
    train = group.commands.get("train")
    if train is None or getattr(train, "_cnnkit_defaults", False):
        return
    train._cnnkit_defaults = True
    train.epilog = (
        "Unset flags take the defaults shown, or the settings the model recommends (its "
        "YAML's 'recommended:' section; the run prints which it applied); a --config file "
        "and the flags win."
    )
    defaults = _config_defaults()
    for param in train.params:
        value = defaults.get(param.name or "")
        if param.param_type_name != "option" or param.default is not None or value is None:
            continue
        if isinstance(value, bool):
            if not param.secondary_opts:  # a one-way switch such as --tta: off unless given
                continue
            value = (param.opts if value else param.secondary_opts)[0].lstrip("-")
        param.help = f"{param.help or ''}  [default: {value}]".strip()


class CnnkitGroup(TyperGroup):
    """The ``cnnkit`` command: usage errors become one ``error:`` line, ``--help`` of
    ``train`` shows the defaults its flags stand for."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _show_train_defaults(self)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except NoArgsIsHelpError as exc:  # a bare `cnnkit` or `cnnkit data`: the help
            out.print(exc.ctx.get_help(), markup=False)
            code = 0
        except ClickException as exc:
            console.print(f"error: {_one_line(exc)}", markup=False, soft_wrap=True)
            code = exc.exit_code
        except typer.Abort:
            console.print("interrupted", markup=False)
            code = 130
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="cnnkit",
    cls=CnnkitGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: types and defaults, no boxes
    help="Train, understand and ship CNN image classifiers.",
)
data_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Make and check image data sets."
)
model_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Inspect network architectures."
)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
out = Console(highlight=False, soft_wrap=True)  # results go to stdout, messages to stderr


def _print_version(value: bool) -> None:
    if value:
        out.print(f"cnnkit {cnnkit.__version__}", markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version."
    ),
) -> None:
    """Train, understand and ship CNN image classifiers."""


# The flags that set what library errors name (``CnnkitError.setting``, and the settings a
# message advises, with the value to pass): an error reads as the user typed the command.
FLAGS = {
    "channels": "--channels",
    "class_name": "--class",
    "classes": "--classes",
    "data.strict": "--strict",
    "feature_map": "--map",
    "force=True": "--force",
    "host": "--host",
    "image": "--image",
    "image_size": "--image-size",
    "kernel": "--kernel",
    "layers": "--layers",
    "model": "--model",
    "nproc": "--nproc",
    "opset": "--opset",
    "out": "--out",
    "overwrite": "--overwrite",
    "overwrite=True": "--overwrite",
    "pad_value": "--pad-value",
    "padding": "--padding",
    "port": "--port",
    "resume=True": "--resume",
    "size": "--size",
    "stride": "--stride",
    "train.batch_size": "--batch-size",
    "train.device=cpu": "--device cpu",
    "train.weights": "--weights",
}


def error_line(exc: CnnkitError) -> str:
    """``error: ...`` for a cnnkit error, its settings named by their flags."""
    if isinstance(exc, TrainingInterrupted):  # the command that continues the run
        return (
            f"error: interrupted by {exc.signal}; checkpoint saved, continue with: "
            f"cnnkit train --resume {display_path(exc.path or '')}"
        )
    return f"error: {exc.words(FLAGS)}"


def one_line_errors(fn: F) -> F:
    """Turn cnnkit's own errors into ``error: ...`` and exit 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(verbose=not kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except CnnkitError as exc:
            console.print(error_line(exc), markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["app", "console", "data_app", "model_app", "one_line_errors", "out"]
