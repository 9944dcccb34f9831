"""CLI: the ``data`` group — synthesise datasets, ingest them to Zarr, cut subimages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Datasets: synthesise, ingest to Zarr, cut subimages", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (SPEC 2.1 layout: FullImage/, Mask_Norm/, codes.txt).")],
    layout: Annotated[str, typer.Option(help="Layout name (trainer, test, external) or a layout YAML file.")] = "trainer",
    cells: Annotated[int, typer.Option(help="Number of stacks with cells.")] = 275,
    negatives: Annotated[int, typer.Option(help="Number of cell-free control stacks.")] = 175,
    size: Annotated[int, typer.Option(help="Nominal subimage side in pixels (crops vary around it).")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Write a synthetic hyper-labeled dataset from simple imaging physics (SPEC 2.3)."""
    from cellseg.data.synth import synthesize

    summary = synthesize(out, layout=layout, cells=cells, negatives=negatives, size=size, seed=seed)
    typer.echo(summary.line())


@data_app.command("ingest")
def ingest_cmd(
    root: Annotated[Path, typer.Argument(help="Input folder with FullImage/ (TIFF stacks, sub-folders allowed), Mask_Norm/ (PNG masks), codes.txt.")],
    out: Annotated[Path, typer.Option("--out", help="Zarr store to write (replaced atomically).")],
    layout: Annotated[
        str | None, typer.Option(help="Layout name or layout YAML; without it channels are named by index.")
    ] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Ingest the good stacks and list the bad ones.")] = False,
) -> None:
    """Ingest a SPEC 2.1 folder into a Zarr store (idempotent; never leaves a half-written store)."""
    from cellseg.data.ingest import ingest

    report = ingest(root, out, layout=layout, skip_bad=skip_bad)
    for line in report.lines():
        typer.echo(line)


@data_app.command("info")
def info_cmd(
    store: Annotated[Path, typer.Argument(help="An ingested Zarr store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a store: stacks, negatives, layout and channels, content hash."""
    import json

    from cellseg.data.store import open_store

    summary = open_store(store).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if key in ("height", "width"):
            value = f"{value[0]}..{value[1]}"
        elif isinstance(value, list):
            value = ", ".join(value)
        typer.echo(f"{key:13s} {value}")


def register(app: typer.Typer) -> None:
    """Attach the ``data`` sub-app to the root app."""
    app.add_typer(data_app, name="data")
