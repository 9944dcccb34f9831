"""CLI: experiments on the training engine — ``cellseg lr-find``, ``cellseg sweep-ce`` and
``cellseg augment preview``. Each takes the same config file and training options as
``cellseg train``, logs to MLflow and calls a function of ``cellseg.experiments`` that notebooks
can call too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellseg.cli.options import TrackingOptions, TrainingOptions, _floats, with_options
from cellseg.config import Config
from cellseg.errors import ConfigError

OUTPUT = "Output"
SWEEP = "Sweep"

augment_app = typer.Typer(help="See what the training augmentation does.", no_args_is_help=True)


def _opt(*names: str, help: str, panel: str = SWEEP, **kwargs) -> typer.models.OptionInfo:  # noqa: A002
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def _config(options: TrainingOptions, tracking: TrackingOptions, strategies: list[str] | None = None) -> Config:
    """The resolved config; a comma list of strategies is kept out of it (each command handles it)."""
    if strategies:
        options.strategy = strategies[0]
    config = tracking.apply(options.load())
    from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri

    check_tracking_uri(resolve_tracking_uri(config.tracking.uri))  # fail in seconds, not after the work
    return config


def _names(text: str | None) -> list[str] | None:
    return list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip())) if text else None


@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def lr_find(
    options: TrainingOptions,
    tracking: TrackingOptions,
    out: Annotated[Path, _opt("--out", help="Folder for lr_find.png and lr_find.json.",
                              panel=OUTPUT)] = Path("lr_find"),
    steps: Annotated[int, _opt("--steps", help="Training steps in the sweep (fewer if the loss diverges).")] = 100,
    start_lr: Annotated[float, _opt("--start-lr", help="First learning rate.")] = 1e-7,
    end_lr: Annotated[float, _opt("--end-lr", help="Last learning rate.")] = 10.0,
    rule: Annotated[str, _opt("--rule", help="Suggestion: valley (middle of the longest fall of the smoothed "
                                             "loss), steepest (its fastest fall) or minimum (its minimum / 10).")
                    ] = "valley",
    unfrozen: Annotated[bool, _opt("--unfrozen", help="Sweep the whole model with phase 2's discriminative "
                                                     "rates (default: encoder frozen, as phase 1).")] = False,
    init_from: Annotated[str | None, _opt("--init-from", help="Sweep an earlier model (run folder, "
                                                             "models:/NAME@ALIAS, …); it is only read.",
                                          show_default=False)] = None,
) -> None:
    """Learning-rate finder: a short training with an exponentially growing learning rate, per
    strategy, the smoothed loss curves overlaid on one plot and a suggested `--lr` for each.
    No model is changed.

    Example: `cellseg lr-find --data trainer.zarr --strategy fluorescence,brightfield --out lr/`
    """
    from cellseg.experiments.lr_find import lr_find as run

    strategies = _names(options.strategy)
    if strategies and options.codes:
        raise ConfigError("--strategy and --codes exclude each other")
    config = _config(options, tracking, strategies)
    result = run(config, out, strategies, start_lr, end_lr, steps, unfrozen, rule, init_from)
    for curve in result.curves:
        shown = f"{curve.suggestion:.2e}" if curve.suggestion else "none (sweep too short)"
        others = " · ".join(f"{rule} {_e(lr)}" for rule, lr in curve.suggestions.items() if rule != curve.rule)
        typer.echo(f"{curve.strategy}: suggested lr {shown} ({curve.rule}) · {others} · "
                   f"{len(curve.lrs)} steps, {curve.stopped}")
    typer.echo(f"wrote {result.png} and {result.json} · MLflow run {result.run_id}")


@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def sweep_ce(
    options: TrainingOptions,
    tracking: TrackingOptions,
    weights: Annotated[str, _opt("--weights", help="Cell weights relative to background (ce_weights = [1, w]), "
                                                   "comma-separated.")] = "0.01,0.1,1,10,100",
    out: Annotated[Path, _opt("--out", help="Sweep folder: a run folder per weight, sweep_ce.csv/.png, "
                                            "sweep_ce_predictions.png.", panel=OUTPUT)] = Path("sweep_ce"),
    examples: Annotated[int, _opt("--examples", help="Validation stacks shown in sweep_ce_predictions.png.",
                                  panel=OUTPUT)] = 3,
    resume: Annotated[bool, _opt("--resume", help="Accepted for compatibility: re-running into the same --out "
                                                  "always continues the sweep (finished weights are kept).")
                      ] = False,
) -> None:
    """Cross-entropy weight sweep: one model per cell weight w (ce_weights = [1, w]) on the same split;
    the fraction of wrong background, cell and overall pixels vs w, and every model's predictions of
    the same validation stacks. One MLflow parent run with a child run per weight. Re-running the
    same command continues an interrupted sweep (as compare does; `--resume` changes nothing).

    Example: `cellseg sweep-ce --data trainer.zarr --strategy fluorescence --weights 0.01,0.1,1,10,100 --out ce/`
    """
    from cellseg.experiments.sweep_ce import sweep_ce as run

    if options.ce_weights is not None:
        raise ConfigError("--ce-weights: sweep-ce sets the class weights itself; give the cell weights with --weights")
    if examples < 1:
        raise ConfigError(f"--examples {examples}: show at least one stack")
    parsed = _floats("--weights", weights)
    config = _config(options, tracking)
    result = run(config, out, parsed, examples=examples)
    shown = result.table[["weight", "wrong_background", "wrong_cell", "wrong_overall", "accuracy", "dice"]]
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    typer.echo(f"wrote {result.csv}, {result.png} and {result.predictions} · MLflow parent run {result.run_id}")


@augment_app.command("preview")
@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def augment_preview(
    options: TrainingOptions,
    tracking: TrackingOptions,
    n: Annotated[int, _opt("--n", help="Samples to draw.", panel=OUTPUT)] = 16,
    out: Annotated[Path, _opt("--out", help="PNG file for the grid.", panel=OUTPUT)] = Path("augment_preview.png"),
    columns: Annotated[int | None, _opt("--columns", help="Grid columns (default: a square grid).", panel=OUTPUT,
                                        show_default=False)] = None,
) -> None:
    """Draw the augmented training samples the model would see (the engine's batches and augmentation
    for this config and seed), with the mask outline in green.

    Example: `cellseg augment preview --data trainer.zarr --strategy fluorescence --n 16 --out grid.png`
    """
    from cellseg.experiments.augment_preview import augment_preview as run

    result = run(_config(options, tracking), out, n, columns)
    typer.echo(f"wrote {result.png} ({len(result.images)} samples) · MLflow run {result.run_id}")


def _e(value: float | None) -> str:
    return f"{value:.2e}" if value else "none"


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command("lr-find")(lr_find)
    app.command("sweep-ce")(sweep_ce)
    app.add_typer(augment_app, name="augment")
