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


def register(app: typer.Typer) -> None:
    """Attach the ``data`` sub-app to the root app."""
    app.add_typer(data_app, name="data")
