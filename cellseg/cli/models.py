"""CLI: the ``models`` group (registered versions and aliases) and ``cellseg ui`` (the MLflow UI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from cellseg.errors import TrackingError

models_app = typer.Typer(help="Registered models: list versions, promote one to an alias", no_args_is_help=True)

TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri",
                 help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
]


@models_app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Registered models and versions: aliases, codes/strategy, encoder, size, final validation metrics."""
    from cellseg.tracking.models import list_models

    rows = list_models(tracking_uri)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no registered models (train one with `cellseg train`)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "version", "aliases", "strategy / codes", "encoder", "size", "accuracy", "dice", "created")
    for row in rows:
        codes = row["strategy"] or ",".join(str(c) for c in row["codes"] or []) or "?"
        metric = row["metrics"]
        table.add_row(row["name"], str(row["version"]), ", ".join(row["aliases"]), codes, row["encoder"] or "?",
                      str(row["size"] or "?"), _fmt(metric.get("accuracy")), _fmt(metric.get("dice")),
                      row["created"][:16].replace("T", " "))
    # a pipe or file gets full rows, not rows wrapped at 80 columns
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@models_app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. cellseg-fluorescence.")],
    version: Annotated[int, typer.Argument(help="Version number to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to set: champion (the model to use), challenger, …")] = "champion",
    tracking_uri: TrackingUri = None,
) -> None:
    """Point an alias at a model version (load it later as models:/NAME@ALIAS)."""
    from cellseg.tracking.models import promote

    done = promote(name, version, alias, tracking_uri)
    typer.echo(f"{done['uri']} -> version {done['version']}")


# --- cellseg ui -----------------------------------------------------------------------------------


def find_mlflow(search_path: str | None = None) -> str:
    """The ``mlflow`` executable: on PATH, else beside this Python (an un-activated virtualenv)."""
    path = os.environ.get("PATH", "") if search_path is None else search_path
    found = shutil.which("mlflow", path=os.pathsep.join([path, str(Path(sys.executable).parent)]))
    if found is None:
        raise TrackingError("mlflow: command not found on PATH (install it with `pip install mlflow`)")
    return found


def ui_argv(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, mlflow: str = "mlflow") -> list[str]:
    """The command that serves the MLflow UI on ``tracking_uri``'s backend store (runs and registry)."""
    return [mlflow, "ui", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port)]


def ui(
    port: Annotated[int, typer.Option(help="Port to serve the UI on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: reachable by others).")] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
) -> None:
    """Open the MLflow UI on the same store cellseg logs to (runs, metrics, plots, registered models)."""
    from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        typer.echo(f"{uri} is a tracking server: its UI is already there, open it in a browser")
        return
    mlflow = find_mlflow()
    check_tracking_uri(uri)  # `mlflow ui` would retry a store it cannot open for ~100 s
    argv = ui_argv(uri, host, port, mlflow)
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl+C to stop)")
    code = subprocess.call(argv)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Attach the ``models`` sub-app and the ``ui`` command to the root app."""
    app.add_typer(models_app, name="models")
    app.command("ui")(ui)
