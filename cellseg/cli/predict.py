"""CLI: ``cellseg predict`` (label masks + previews for stacks of any size) and ``cellseg evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellseg.cli.models import TrackingUri

ModelArg = Annotated[
    str,
    typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, an MLflow model folder, "
                        "a run folder or checkpoint_last.pt."),
]
Out = Annotated[Path, typer.Option("--out", help="Output folder.")]
Codes = Annotated[str | None, typer.Option(help="Loading codes instead of the model's, e.g. 100,12,103.",
                                           rich_help_panel="Input")]
Strategy = Annotated[str | None, typer.Option(help="Named strategy instead of the model's codes.",
                                              rich_help_panel="Input")]
Tile = Annotated[int | None, typer.Option(help="Sliding-window side in pixels (default: the model's training size; "
                                               "models trained with resize: stack see the whole input).",
                                          min=32, rich_help_panel="Tiling")]
Diameter = Annotated[float | None, typer.Option(
    help="Typical cell diameter in the input, in pixels: the input is rescaled so cells appear at the training "
         "data's median diameter (models trained with resize: none).", rich_help_panel="Input")]
Overlap = Annotated[float, typer.Option(help="Fraction of a tile shared with its neighbours (blended).",
                                        min=0.0, max=0.9, rich_help_panel="Tiling")]
BatchSize = Annotated[int, typer.Option(help="Tiles per forward pass.", min=1, rich_help_panel="Tiling")]
Seed = Annotated[int, typer.Option(help="Seed for random loading codes (one draw per image).",
                                   rich_help_panel="Input")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Hardware")]
Instances = Annotated[bool, typer.Option(
    "--instances", help="Also label each cell (OUT/labels/NAME.ome.tif, 0 = background; a store's stacks also "
                        "as OME-Zarr in OUT/labels.zarr) and measure it (OUT/cells/NAME.csv). Needs a model with a "
                        "Cell class.", rich_help_panel="Cells")]
PixelSize = Annotated[float | None, typer.Option(
    help="Pixel size in µm, for cell areas in µm² and the OME metadata (cellseg reads none from the files).",
    min=1e-6,
    rich_help_panel="Cells")]


def load_model(model: str, device: str, tracking_uri: str | None):
    """The model, with one line on stderr when it predates the recorded input geometry or recipe."""
    from cellseg.engine.session import resolve_device
    from cellseg.inference.predict import legacy_note
    from cellseg.tracking.models import load_trained_model

    trained = load_trained_model(model, device=resolve_device(device), tracking_uri=tracking_uri)
    note = legacy_note(trained)
    if note:
        typer.echo(note, err=True)
    return trained


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        from cellseg.errors import ConfigError

        raise ConfigError(f"--device {device}: expected auto, cpu or cuda")


def predict(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Stack TIFFs (multi-page, (C,H,W) or (H,W,C)), folders of them, "
                                                      "or ingested Zarr stores.")],
    out: Out,
    codes: Codes = None,
    strategy: Strategy = None,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    diameter: Diameter = None,
    instances: Instances = False,
    pixel_size: PixelSize = None,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
) -> None:
    """Segment stacks of any size at the pixel scale and normalisation the model was trained with.

    Writes OUT/masks/NAME.png (class index per pixel, same height and width as the input) and
    OUT/overlays/NAME.png (the input with prediction outlines); with --instances also OUT/labels/NAME.ome.tif
    (one id per cell; stacks of a store also in OUT/labels.zarr, OME-Zarr) and OUT/cells/NAME.csv (area, centroid, bounding box, eccentricity, mean/max
    intensity per channel).
    """
    from cellseg.inference.predict import inference_factor, input_plan, iter_stacks, model_layout, predict_stacks

    check_device(device)
    trained = load_model(model, device, tracking_uri)
    plan = input_plan(trained, codes, strategy)
    factor = inference_factor(trained, tile, diameter)
    stacks = iter_stacks(images, model_layout(trained), plan)
    count = 0
    for p in predict_stacks(trained, stacks, out, plan, tile, overlap, batch_size, seed, factor, instances,
                            diameter, pixel_size):
        count += 1
        cells = "" if p.cells is None else f", {p.cells} cells"
        typer.echo(f"{p.name}: {p.height}x{p.width}, {100 * p.foreground_fraction:.1f}% cell{cells}, "
                   f"{p.seconds:.2f} s -> {p.mask_path}")
    typer.echo(f"{count} image(s) segmented with {trained.uri}: masks in {out / 'masks'}, "
               f"previews in {out / 'overlays'}"
               + (f", labels in {out / 'labels'}, cell tables in {out / 'cells'}" if instances else ""))


def evaluate(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Ingested Zarr store with masks.")],
    out: Out,
    codes: Codes = None,
    strategy: Strategy = None,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    overlays: Annotated[bool, typer.Option(help="Also write OUT/overlays/ID.png with truth and prediction.")] = False,
    diameter: Diameter = None,
    instances_from: Annotated[Path | None, typer.Option(
        help="Folder of true label images (ID.tif, .tiff or .png; 0 = background, one id per cell) for the "
             "instance metrics (default: connected components of the store's masks).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment when the model's own run is unknown.")] = "cellseg",
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log the evaluation to MLflow.")] = False,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
) -> None:
    """Score a model on a store: per-stack and summary metrics (CSV + JSON in OUT), logged to MLflow.

    Models with a Cell class are also scored per cell: cellpose's average precision (ap_50/75/90) and
    StarDist's pooled precision, recall, F1 and panoptic quality at IoU 0.5, with split and merged cells.
    """
    from cellseg.inference.evaluate import evaluate as run_evaluation
    from cellseg.inference.evaluate import log_evaluation
    from cellseg.inference.predict import inference_factor, input_plan

    check_device(device)
    if not no_log:  # a store the evaluation cannot be logged to fails now, not after the work
        from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(tracking_uri))
    trained = load_model(model, device, tracking_uri)
    plan = input_plan(trained, codes, strategy)
    factor = inference_factor(trained, tile, diameter)
    result = run_evaluation(trained, data, out, plan, tile, overlap, batch_size, seed, overlays, factor,
                            instances_from, diameter)
    for row in result.summary.to_dict(orient="records"):
        typer.echo(f"{row['scope']}: {row['stacks']} stacks, accuracy {row['accuracy']:.4f}, "
                   f"background {row['background_accuracy']:.4f}, cell {row['cell_accuracy']:.4f}, "
                   f"dice {row['dice']:.4f}, iou {row['iou']:.4f}")
        if isinstance(row["instance_truth"], str):  # empty for a model without a Cell class
            typer.echo(f"  cells (truth: {row['instance_truth']}): {row['true_cells']} true, "
                       f"{row['predicted_cells']} predicted; AP@0.5/0.75/0.9 {row['ap_50']:.3f}/{row['ap_75']:.3f}/"
                       f"{row['ap_90']:.3f}; pooled precision {row['precision_50']:.3f}, recall "
                       f"{row['recall_50']:.3f}, F1 {row['f1_50']:.3f}, PQ {row['panoptic_quality_50']:.3f}; "
                       f"{row['split_cells']} split, {row['merged_cells']} merged")
    typer.echo(f"tables in {out}")
    if not no_log:
        settings = {"codes": ",".join(str(c) for c in plan.codes), "tile": tile or trained.size,
                    "overlap": overlap, "seed": seed, "diameter": diameter,
                    "instances_from": str(instances_from) if instances_from else None}
        run_id = log_evaluation(result, trained, settings, tracking_uri, experiment)
        typer.echo(f"logged to MLflow run {run_id}")


def register(app: typer.Typer) -> None:
    """Attach ``predict`` and ``evaluate`` to the root app."""
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)
