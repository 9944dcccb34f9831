"""CLI: ``cellseg train`` — train one model, log it to MLflow and register it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cellseg.cli.options import TrackingOptions, TrainingOptions, with_options
from cellseg.config import strategy_label
from cellseg.errors import BadInputError, ConfigError
from cellseg.run_folder import CONFIG_NAME

RUN = "Run"


def default_run_dir(strategy: str | None) -> Path:
    return Path("runs") / f"{strategy_label(strategy)}-{time.strftime('%Y%m%d-%H%M%S')}"


@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def train(
    options: TrainingOptions,
    tracking: TrackingOptions,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", rich_help_panel=RUN, show_default=False,
                                                 help="Run folder (default runs/STRATEGY-DATE-TIME).")] = None,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=RUN,
                                         help="Continue the run in --run-dir from its last checkpoint.")] = False,
    init_from: Annotated[str | None, typer.Option("--init-from", rich_help_panel=RUN, show_default=False,
                                                  help="Start from an earlier model: run folder, checkpoint, "
                                                       "models:/NAME@ALIAS, runs:/ID/model.")] = None,
    register_as: Annotated[str | None, typer.Option("--register-as", rich_help_panel=RUN, show_default=False,
                                                    help="Registered model name (default cellseg-STRATEGY).")] = None,
    no_register: Annotated[bool, typer.Option("--no-register", rich_help_panel=RUN,
                                              help="Log the model to the run but do not register it.")] = False,
    wait: Annotated[bool, typer.Option("--wait", rich_help_panel=RUN,
                                       help="If another process trains in --run-dir, wait for it to end "
                                            "instead of stopping.")] = False,
) -> None:
    """Train a U-Net on a store: frozen then unfrozen one-cycle phases, a checkpoint every epoch,
    metrics and the model logged to MLflow and registered.

    Examples: `cellseg train --data trainer.zarr --profile quick` ·
    `cellseg train --run-dir runs/x --resume --epochs 150` (continue, or extend a finished run) ·
    `torchrun --nproc-per-node 4 $(which cellseg) train …` (data-parallel; --batch-size is per process)
    """
    from cellseg.engine.distributed import launched
    from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri

    if register_as is not None and no_register:
        raise ConfigError(f"--register-as {register_as} and --no-register: give one of them")
    base = None
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir (the run folder to continue)")
        base = run_dir / CONFIG_NAME
        if not base.is_file():
            raise BadInputError(f"{run_dir}: not a run folder (no {CONFIG_NAME}); nothing to resume")
    config = tracking.apply(options.load(base))
    if register_as is not None:
        config = config.with_overrides({"tracking.register_as": register_as})
    uri = resolve_tracking_uri(config.tracking.uri)
    main = launched().main  # rank 0 alone logs, prints and writes the run folder
    if main:
        check_tracking_uri(uri)  # before importing the engine (timm, the model): a bad store fails in seconds

    from cellseg.engine.distributed import broadcast, process_group
    from cellseg.engine.loop import fit
    from cellseg.engine.progress import ProgressCallback
    from cellseg.engine.session import resolve_device
    from cellseg.tracking.models import model_resolver
    from cellseg.tracking.runs import MlflowCallback

    mlflow_cb = MlflowCallback(uri, config.tracking.experiment, register_as=config.tracking.register_as,
                               register=not no_register)
    with process_group(resolve_device(config.train.device)):
        if run_dir is None:  # rank 0's time stamp names the folder of every process
            run_dir = broadcast(default_run_dir(config.data.strategy if config.data.codes is None else None))
        if main:
            typer.echo(f"run folder {run_dir} · MLflow {uri}", err=True)
        result = fit(config, run_dir, resume=resume, init_from=init_from, callbacks=[mlflow_cb, ProgressCallback()],
                     wait=wait, resolve=model_resolver(uri))
    if not main:
        return
    final = result.final
    if final:
        typer.echo(f"final: accuracy {final['accuracy']:.4f} · cell accuracy {final['cell_accuracy']:.4f} · "
                   f"dice {final['dice']:.4f} · val_loss {final['val_loss']:.4f}")
    typer.echo(f"run: {mlflow_cb.run_id} ({run_dir})")
    if mlflow_cb.registered:
        name, version = mlflow_cb.registered
        typer.echo(f"registered: models:/{name}/{version} (aliases: see `cellseg models list`)")
    elif mlflow_cb.model_uri:
        typer.echo(f"model: {mlflow_cb.model_uri}")
    typer.echo(f"look at it: cellseg ui --tracking-uri {uri}")


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command("train")(train)
