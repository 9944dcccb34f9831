"""CLI: the last steps of the reproduction pipeline (dvc.yaml) — ``cellseg transfer`` (score a model on
data with another channel layout) and ``cellseg report`` (the results beside the paper's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellseg.cli.models import TrackingUri
from cellseg.cli.predict import BatchSize, Device, ModelArg, Out, Overlap, Seed, Tile


def transfer(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Ingested Zarr store of another layout, with masks.")],
    out: Out,
    not_applicable_ok: Annotated[bool, typer.Option(
        "--not-applicable-ok", help="Record a model that cannot apply in OUT/transfer.json and exit 0.")] = False,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment when the model's own run is unknown.")] = "cellseg",
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log the evaluation to MLflow.")] = False,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
) -> None:
    """Score a model on a store with a different channel layout, each input read from the channel of the
    same meaning there (kind, label, polarisation, focal plane); refuses, naming the input, when one has
    no counterpart. Writes OUT/transfer.json (the code mapping) and evaluate's tables.

    Example: `cellseg transfer runs/cytoplasm --data external.zarr --out eval/external` (trainer codes
    0,0,0 → external 0,0,0; the in-focus brightfield 12 → 5; fluorescence 0,3,6: not applicable)
    """
    from cellseg.data.store import open_store
    from cellseg.cli.predict import check_device, load_model
    from cellseg.inference.evaluate import evaluate, log_evaluation
    from cellseg.inference.predict import inference_factor, input_plan
    from cellseg.inference.transfer import NotApplicable, plan_transfer, retarget, write_record

    check_device(device)
    trained = load_model(model, device, tracking_uri)
    inference_factor(trained, tile)  # a --tile the model's geometry contradicts: one line, before any work
    target = open_store(data).layout
    mapping = plan_transfer(trained.metadata, target)
    write_record(mapping, out, model)
    if not mapping.applicable:
        if not not_applicable_ok:
            raise NotApplicable(f"{model} on {data}: {mapping.reason}")
        typer.echo(f"not applicable: {mapping.reason} (recorded in {out / 'transfer.json'})")
        return
    typer.echo(f"codes {mapping.source_codes} on '{mapping.source_layout}' → {mapping.target_codes} on "
               f"'{mapping.target_layout}'")
    retargeted = retarget(trained, target, mapping)
    plan = input_plan(retargeted)
    result = evaluate(retargeted, data, out, plan, tile, overlap, batch_size, seed)
    for row in result.summary.to_dict(orient="records"):
        typer.echo(f"{row['scope']}: {row['stacks']} stacks, accuracy {row['accuracy']:.4f}, "
                   f"cell {row['cell_accuracy']:.4f}, dice {row['dice']:.4f}")
    if not no_log:
        settings = {"codes": ",".join(map(str, mapping.target_codes)),
                    "model_codes": ",".join(map(str, mapping.source_codes)), "target_layout": mapping.target_layout, "tile": tile or trained.size, "overlap": overlap,
                    "seed": seed}
        run_id = log_evaluation(result, retargeted, settings, tracking_uri, experiment)
        typer.echo(f"logged to MLflow run {run_id}")


def report(
    results: Annotated[Path, typer.Option("--results", help="The pipeline's results folder (dvc.yaml).")]
    = Path("results"),
    data: Annotated[Path, typer.Option("--data", help="Folder with trainer.zarr, test.zarr, external.zarr.")]
    = Path("data"),
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml of the run (profile, schedule).",
                                                show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Markdown file; figures/ and metrics.json go beside it.")]
    = Path("reports/paper.md"),
) -> None:
    """Write the reproduction report: the paper's strategy table and CE-weight trade-off with our numbers
    beside the paper's, tuning, and generalisation to the test and external datasets — each comparison
    sentence computed from the results.

    Example: `cellseg report --results results --data data --params params.yaml --out reports/paper.md`
    """
    from cellseg.reports.paper import write_report

    written = write_report(results, data, params, out)
    typer.echo(f"wrote {out} ({len(written) - 2} figures, {out.parent / 'metrics.json'})")


def register(app: typer.Typer) -> None:
    """Attach ``transfer`` and ``report`` to the root app."""
    app.command("transfer")(transfer)
    app.command("report")(report)
