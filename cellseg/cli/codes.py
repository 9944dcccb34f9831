"""CLI: the ``codes`` group — list loading codes and strategies, render what a model is shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

codes_app = typer.Typer(help="Loading codes and strategies: list them, render one stack.", no_args_is_help=True)


def _code_rows(layout_name: str | None) -> list[dict]:
    """One row per user-definable code; with a layout, the channel names it resolves to (or why not)."""
    from cellseg.data.codes import load_codebook, resolve_codes
    from cellseg.data.layouts import load_layout
    from cellseg.errors import ConfigError

    layout = load_layout(layout_name) if layout_name else None
    rows = []
    for code, definition in sorted(load_codebook().items()):
        row = {
            "code": code,
            "op": definition.op,
            "channels": definition.channels,
            "merge_dropout": definition.merge_dropout,
            "channel_dropout": definition.channel_dropout,
            "layouts": definition.layouts,
            "description": definition.description,
        }
        if layout is not None:
            try:
                sources = resolve_codes([code], layout).recipes[0].sources
                row["resolved"] = [layout.channel_names[c] for c in sources]
            except ConfigError as exc:
                row["resolved"] = None
                row["unavailable"] = str(exc)
        rows.append(row)
    return rows


def _strategy_rows(layout_name: str | None) -> list[dict]:
    """Named strategies; with a layout, only those that resolve for it."""
    from cellseg.data.codes import load_strategy_defs, resolve_codes
    from cellseg.data.layouts import load_layout
    from cellseg.errors import ConfigError

    layout = load_layout(layout_name) if layout_name else None
    rows = []
    for name, strategy in load_strategy_defs().items():
        if layout is not None:
            try:
                resolve_codes(name, layout)
            except ConfigError:
                continue
        rows.append({"name": name, "codes": strategy.codes, "layouts": strategy.layouts,
                     "description": strategy.description})
    return rows


def _probability_text(value: bool | float) -> str:
    if value is True:
        return "run setting"
    return "" if value is False or value == 0 else f"{value:g}"


@codes_app.command("list")
def list_cmd(
    layout: Annotated[
        str | None,
        typer.Option(help="Only the codes and strategies usable with this layout (name or YAML); channels by name."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print codes and strategies as JSON.")] = False,
) -> None:
    """List loading codes (0–50: a channel, 51–199: below, +200: channel dropout) and strategies."""
    from rich.console import Console
    from rich.table import Table

    codes, strategies = _code_rows(layout), _strategy_rows(layout)
    if as_json:
        typer.echo(json.dumps({"codes": codes, "strategies": strategies}, indent=2))
        return
    console = Console()
    table = Table(title="Loading codes (0–50 load that channel; code + 200 = with channel dropout)")
    for column in ("code", "op", "channels", "merge dropout", "layouts", "description"):
        table.add_column(column)
    for row in codes:
        if layout and row["resolved"] is None:
            continue  # not usable with this layout (the JSON output says why)
        channels = ", ".join(str(c) for c in (row["resolved"] if layout else row["channels"]))
        table.add_row(str(row["code"]), row["op"], channels or "", _probability_text(row["merge_dropout"]),
                      ", ".join(row["layouts"] or ["any"]), row["description"])
    console.print(table)
    table = Table(title="Strategies")
    for column in ("strategy", "codes", "layouts", "description"):
        table.add_column(column)
    for row in strategies:
        table.add_row(row["name"], ", ".join(str(c) for c in row["codes"]), ", ".join(row["layouts"] or ["any"]),
                      row["description"])
    console.print(table)


@codes_app.command("render")
def render_cmd(
    store: Annotated[Path, typer.Argument(help="An ingested Zarr store.")],
    stack_id: Annotated[str, typer.Argument(help="Stack id (its path under FullImage/ without .ome.tif).")],
    out: Annotated[Path, typer.Option("--out", help="Output .npy file (float32, C×H×W).")],
    codes: Annotated[str | None, typer.Option(help="Loading codes, e.g. 100,12,103.")] = None,
    strategy: Annotated[str | None, typer.Option(help="A named strategy instead of --codes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random codes (as in training).")] = 0,
    epoch: Annotated[int, typer.Option(help="Epoch whose random draw to show.")] = 0,
    channel_dropout: Annotated[float, typer.Option(help="P(black) for codes >= 200.")] = 0.5,
    merge_dropout: Annotated[float, typer.Option(help="P(leave out) per merged channel.")] = 0.5,
    normalize: Annotated[str, typer.Option(help="Intensity normalisation: percentile (the default config's) or "
                                                "max (the paper's).")] = "percentile",
) -> None:
    """Write exactly what the dataset builds for one stack (native pixels, before augmentation)."""
    import numpy as np

    from cellseg.data.codes import parse_codes
    from cellseg.data.dataset import open_dataset
    from cellseg.data.intensity import Normalisation
    from cellseg.errors import ConfigError
    from cellseg.fileio import atomic_path

    if (codes is None) == (strategy is None):
        raise ConfigError("give exactly one of --codes and --strategy")
    if normalize not in ("percentile", "max"):
        raise ConfigError(f"--normalize {normalize}: expected percentile or max")
    chosen = parse_codes(codes) if codes is not None else strategy
    dataset = open_dataset(store, chosen, seed=seed, channel_dropout=channel_dropout, merge_dropout=merge_dropout,
                           normalisation=Normalisation(normalize))
    position = dataset.store.index(stack_id)
    dataset.set_epoch(epoch)
    x, _ = dataset[position]
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, x.numpy().astype(np.float32))
    typer.echo(f"{out}: {stack_id} as codes {dataset.plan.codes} -> float32 {tuple(x.shape)}")


def register(app: typer.Typer) -> None:
    """Attach the ``codes`` sub-app to the root app."""
    app.add_typer(codes_app, name="codes")
