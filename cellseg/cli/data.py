"""CLI: the ``data`` group — synthesise datasets, ingest them to Zarr, verify stores, cut subimages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Datasets: synthesise, ingest to Zarr, verify, cut subimages", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder, laid out as README 'Your data' describes: "
                                             "FullImage/, Mask_Norm/, codes.txt.")],
    layout: Annotated[
        str, typer.Option(help="Layout name (trainer, test, external) or a layout YAML file.")
    ] = "trainer",
    cells: Annotated[int, typer.Option(help="Number of stacks with cells.")] = 275,
    negatives: Annotated[int, typer.Option(help="Number of cell-free control stacks.")] = 175,
    size: Annotated[int, typer.Option(help="Nominal subimage side in pixels (crops vary around it).")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Write a synthetic hyper-labeled dataset from simple imaging physics."""
    from cellseg.data.synth import synthesize

    summary = synthesize(out, layout=layout, cells=cells, negatives=negatives, size=size, seed=seed)
    typer.echo(summary.line())


@data_app.command("ingest")
def ingest_cmd(
    root: Annotated[Path, typer.Argument(help="Input folder with FullImage/ (TIFF stacks, sub-folders allowed), Mask_Norm/ (PNG or TIFF masks), codes.txt.")],
    out: Annotated[Path, typer.Option("--out", help="Zarr store to write (replaced atomically).")],
    layout: Annotated[
        str | None, typer.Option(help="Layout name or layout YAML; without it channels are named by index.")
    ] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Ingest the good stacks and list the bad ones.")] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="When another cellseg process is writing the store, wait for it instead of stopping."),
    ] = False,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="The store's classes: background,cell (codes.txt's, the default) or "
                                       "background,cell,boundary (adds the band between touching cells, from "
                                       "Instances/ label images, else the masks' connected components)."),
    ] = None,
) -> None:
    """Ingest a dataset folder (FullImage/, Mask_Norm/, codes.txt) into a Zarr store (idempotent; never half-written).

    Masks: PNG or TIFF, 8 or 16 bits; gray or palette values are class indices (0/255 and 0/65535
    mean 0/1 for two classes), RGB(A) must be gray or one colour on black. An optional Instances/
    folder of label images (NAME.tif, one id per cell) is kept in the store for instance metrics.
    """
    from cellseg.data.ingest import ingest

    report = ingest(root, out, layout=layout, skip_bad=skip_bad, wait=wait, classes=classes)
    for line in report.lines():
        typer.echo(line)


@data_app.command("verify")
def verify_cmd(
    store: Annotated[Path, typer.Argument(help="An ingested Zarr store.")],
    deep: Annotated[
        bool, typer.Option("--deep", help="Also recompute every stack's content hash (reads all the data).")
    ] = False,
) -> None:
    """Check a store: every stack's arrays and chunk file sizes, with --deep its content hash.

    Prints one line per damaged stack and exits 1; `cellseg data ingest` again repairs the store.
    """
    from cellseg.data.store import open_store
    from cellseg.errors import BadInputError

    opened = open_store(store)
    damaged = opened.verify(deep=deep)
    for sid, reason in damaged:
        typer.echo(f"damaged stack {sid}: {reason}")
    if damaged:
        raise BadInputError(f"{store}: {len(damaged)} of {len(opened)} stacks damaged (listed above); "
                            "run `cellseg data ingest` again to repair it")
    typer.echo(f"ok: {len(opened)} stacks ({'content hashes' if deep else 'arrays and chunk sizes'} checked)")


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


@data_app.command("subimages")
def subimages_cmd(
    src: Annotated[Path, typer.Argument(help="Folder of large stacks (NAME.ome.tif/.tif), each with NAME--labels.txt beside it.")],
    out: Annotated[Path, typer.Argument(help="Output folder: Segmented_Image/, Segmented_JPEGs/, Segmented_Masks/, rois.csv.")],
    preview_channels: Annotated[
        str, typer.Option("--preview-channels", help="Three source channels for the RGB preview, e.g. 0,3,6.")
    ],
    ground_truth_suffix: Annotated[
        str | None,
        typer.Option("--ground-truth-suffix", help="Also crop the ground-truth mask beside each stack, named NAME + this suffix (e.g. _seg.png)."),
    ] = None,
    black_masks: Annotated[
        bool, typer.Option("--black-masks", help="Write an all-black mask per subimage (cell-free controls).")
    ] = False,
    move_to_front: Annotated[
        bool, typer.Option("--move-to-front", help="Put the preview channels first in the written stacks.")
    ] = False,
) -> None:
    """Crop every ROI box of every stack into subimages, previews and masks."""
    from cellseg.data.subimages import generate_subimages, parse_channels
    from cellseg.errors import BadInputError

    report = generate_subimages(
        src,
        out,
        parse_channels(preview_channels),
        gt_suffix=ground_truth_suffix,
        black_masks=black_masks,
        move_to_front=move_to_front,
    )
    for exc in report.bad:
        typer.echo(f"skipped {exc}", err=True)
    typer.echo(report.line())
    if report.bad:
        raise BadInputError(f"{len(report.bad)} of {report.sources} source file(s) skipped (listed above)")


@data_app.command("qc")
def qc_cmd(
    store: Annotated[Path, typer.Argument(help="An ingested Zarr store (real or synthetic).")],
    compare: Annotated[
        list[Path] | None, typer.Option("--compare", help="Another store to put side by side (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for qc.csv and qc.png.")] = Path("qc"),
    max_stacks: Annotated[int, typer.Option("--max-stacks", min=1, help="Stacks with cells measured per store (evenly spaced).")] = 50,
    log: Annotated[bool, typer.Option("--log", help="Also log the table and figure to MLflow as a run.")] = False,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for --log.")] = "cellseg",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for --log (default $MLFLOW_TRACKING_URI, "
                                                          "else sqlite:///mlflow.db).")] = None,
) -> None:
    """How each channel looks to a threshold: contrast of cell interiors and edges against background,
    Otsu's Dice, SNR, clipping — per store, side by side with --compare (e.g. your microscope vs synthetic).

    Interior = mask eroded 4 px, edge = its 2 px inner band, background = outside the mask dilated
    6 px; contrasts are relative to the background mean; medians over the stacks with cells.
    """
    from cellseg.data.qc import log_report, markdown, side_by_side, store_statistics, write_report
    from cellseg.data.store import open_store

    paths = [store, *(compare or [])]
    opened = [open_store(p) for p in paths]
    names = [p.name for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]
    table = side_by_side([store_statistics(s, label, max_stacks) for s, label in zip(opened, labels)])
    typer.echo(markdown(table))
    files = write_report(opened, labels, table, out)
    typer.echo(f"wrote {', '.join(str(f) for f in files)}")
    if log:
        typer.echo(f"logged to MLflow run {log_report(table, files, labels, experiment, tracking_uri)}")

def register(app: typer.Typer) -> None:
    """Attach the ``data`` sub-app to the root app."""
    app.add_typer(data_app, name="data")
