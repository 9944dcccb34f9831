"""The ``cellseg`` command: one Typer app, command groups mirroring the pipeline's stages.

Each ``cellseg/cli/<group>.py`` module exposes ``register(app)``; this file only wires them and
turns user errors into one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from cellseg.errors import CellsegError

_state = {"debug": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by schedulers, ``timeout``, ``docker stop``) as an interrupt, so it takes Ctrl-C's
    path: the last checkpoint kept, the MLflow run ended as KILLED, resumable."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Raise ``Terminated`` on SIGTERM while a command runs (the previous handler restored after)."""
    def terminate(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _CellsegGroup(TyperGroup):
    """Prints a ``CellsegError`` as one line (no traceback unless ``--debug``); SIGINT and SIGTERM
    end a command with one line and exit codes 130 and 143."""

    def invoke(self, ctx: click.Context):
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except CellsegError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except Terminated:
            typer.echo("terminated (SIGTERM)", err=True)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_CellsegGroup,
    name="cellseg",
    help="Train, compare, tune, register and reproduce cell-segmentation models on hyper-labeled image stacks.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _register_all() -> None:
    from cellseg.cli import codes, data, experiments, model, models, predict, report, study, train

    for module in (data, codes, model, train, experiments, study, models, predict, report):
        module.register(app)


_register_all()


def main() -> None:
    from cellseg.runtime import tune_malloc

    tune_malloc()
    app(prog_name="cellseg")


if __name__ == "__main__":
    sys.exit(main())
