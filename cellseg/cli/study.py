"""CLI: ``cellseg tune`` (Optuna study over learning rate and CE weights) and ``cellseg compare``
(strategies × replicates on one split). Both take the training options of ``cellseg train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellseg.cli.options import TrackingOptions, TrainingOptions, with_options
from cellseg.errors import ConfigError

STUDY = "Study"
LR_DECADE = 10.0  # --lr without --lr-range: the study searches [lr / 10, lr * 10]
COMPARISON = "Comparison"


def _range(option: str, text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} '{text}': expected LOW,HIGH, e.g. 1e-5,1e-1") from None
    return low, high


@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def tune(
    options: TrainingOptions,
    tracking: TrackingOptions,
    trials: Annotated[int, typer.Option("--trials", rich_help_panel=STUDY,
                                        help="Trials for THIS process to run (workers add up).")] = 20,
    study: Annotated[str | None, typer.Option("--study", rich_help_panel=STUDY, show_default=False,
                                              help="Study name; re-use it to continue (default tune-STRATEGY).")]
    = None,
    storage: Annotated[str, typer.Option("--storage", rich_help_panel=STUDY,
                                         help="Journal file path (several processes, shared FS) or RDB URL: "
                                              "sqlite:///x.db (one process), postgresql://… (machines).")]
    = "optuna.journal",
    out: Annotated[Path, typer.Option("--out", rich_help_panel=STUDY,
                                      help="Best trial's full config, for `cellseg train --config`.")]
    = Path("best.yaml"),
    objective: Annotated[str | None, typer.Option("--objective", rich_help_panel=STUDY, show_default=False,
                                                  help="accuracy (default), cell_accuracy, background_accuracy, "
                                                       "dice, iou or val_loss (minimised).")] = None,
    tune_dropout: Annotated[bool | None, typer.Option("--tune-dropout/--no-tune-dropout", rich_help_panel=STUDY,
                                                      show_default=False,
                                                      help="Also tune channel and merge dropout.")] = None,
    lr_range: Annotated[str | None, typer.Option("--lr-range", rich_help_panel=STUDY, show_default=False,
                                                 help="Learning-rate range, log scale (default 1e-5,1e-1; with "
                                                      "--lr, a decade either side of it).")] = None,
    ratio_range: Annotated[str | None, typer.Option("--ratio-range", rich_help_panel=STUDY, show_default=False,
                                                    help="CE weight background:cell range, log scale "
                                                         "(default 0.01,100).")] = None,
    sampler_seed: Annotated[int | None, typer.Option("--sampler-seed", rich_help_panel=STUDY, show_default=False,
                                                     help="TPE seed of a new study (default --seed).")] = None,
    no_pruning: Annotated[bool, typer.Option("--no-pruning", rich_help_panel=STUDY,
                                             help="Train every trial to the end.")] = False,
    runs_dir: Annotated[Path | None, typer.Option("--runs-dir", rich_help_panel=STUDY, show_default=False,
                                                  help="Trial run folders (default runs/tune/STUDY).")] = None,
    heartbeat: Annotated[int, typer.Option("--heartbeat", rich_help_panel=STUDY,
                                           help="Seconds between a trial's heartbeats on RDB storage; a trial "
                                                "silent for 3 is a killed worker's and is retried.")] = 60,
) -> None:
    """Tune the learning rate and cross-entropy class weights with Optuna (TPE, median pruning); each
    trial a child MLflow run of the study's run. Re-running continues the study; start the same
    command on several machines with one `--storage postgresql://…` to share it.

    Examples: `cellseg tune --data trainer.zarr --profile quick --trials 20 --study lr-ce` ·
    `cellseg train --config best.yaml`
    """
    from cellseg.tracking.runs import redact
    from cellseg.experiments.tune import tune as run_tune
    from cellseg.tracking.runs import resolve_tracking_uri

    _refuse_tuned(options, lr_range, tune_dropout)
    config = tracking.apply(options.load())
    study = study or f"tune-{config.data.label}"
    uri = resolve_tracking_uri(config.tracking.uri)
    typer.echo(f"study {study} · storage {redact(storage)} · MLflow {uri}", err=True)
    result = run_tune(config, study, trials, storage=storage, out=out, runs_dir=runs_dir, objective=objective,
                      lr_range=_range("--lr-range", lr_range) or _around(options.lr),
                      ratio_range=_range("--ratio-range", ratio_range),
                      tune_dropout=tune_dropout, sampler_seed=sampler_seed, prune=not no_pruning,
                      heartbeat=heartbeat)
    params = " · ".join(f"{k} {v:.4g}" for k, v in result.best_params.items())
    typer.echo(f"best: trial {result.best_trial} {result.settings.objective} {result.best_value:.4f} · {params} "
               f"({result.trials} trials in the study)")
    typer.echo(f"wrote {result.out} (train it: cellseg train --config {result.out}) · trials {result.table} · "
               f"figure {result.figure}")
    typer.echo(f"MLflow parent run {result.parent_run_id}; look at it: cellseg ui --tracking-uri {uri}")


def _around(lr: float | None) -> tuple[float, float] | None:
    """``--lr`` without ``--lr-range`` centres the search on it: a decade either side (log scale), so the
    options every training command of a pipeline shares also mean something to tune."""
    return None if lr is None else (lr / LR_DECADE, lr * LR_DECADE)


def _refuse_tuned(options: TrainingOptions, lr_range: str | None, tune_dropout: bool | None) -> None:
    """A value the study samples for every trial would be silently ignored: refuse it, naming both."""
    sampled = [("--ce-weights", options.ce_weights, "--ratio-range")]
    if lr_range is not None:
        sampled.append(("--lr", options.lr, "--lr-range"))
    if tune_dropout:
        sampled += [("--channel-dropout", options.channel_dropout, "--tune-dropout"),
                    ("--merge-dropout", options.merge_dropout, "--tune-dropout")]
    for option, value, tuned in sampled:
        if value is not None:
            raise ConfigError(f"{option} {value} and {tuned}: tune samples it for every trial ({option} would be "
                              "ignored)")


@with_options(TrackingOptions, "tracking")
@with_options(TrainingOptions, "options")
def compare(
    options: TrainingOptions,
    tracking: TrackingOptions,
    strategies: Annotated[str, typer.Option("--strategies", rich_help_panel=COMPARISON, show_default=False,
                                            help="Strategy names, comma-separated, e.g. fluorescence,cytoplasm.")],
    out: Annotated[Path, typer.Option("--out", rich_help_panel=COMPARISON, show_default=False,
                                      help="Output folder: compare.csv, compare_runs.csv, compare.png, runs/.")],
    replicates: Annotated[int, typer.Option("--replicates", rich_help_panel=COMPARISON,
                                            help="Runs per strategy, seeds --seed, --seed+1, …")] = 3,
    name: Annotated[str | None, typer.Option("--name", rich_help_panel=COMPARISON, show_default=False,
                                             help="Comparison name in MLflow (default: --out's folder name + a hash "
                                                  "of its path).")]
    = None,
    log_models: Annotated[bool, typer.Option("--log-models", rich_help_panel=COMPARISON,
                                             help="Log every run's model to MLflow (large).")] = False,
) -> None:
    """Train every strategy × replicate on one identical split; mean ± sd tables and the comparison
    figure, one MLflow parent run with a child per run (tags strategy, replicate, comparison).
    Re-running the same command continues an interrupted comparison.

    Example: `cellseg compare --data trainer.zarr --profile quick --strategies fluorescence,cytoplasm,all_black
    --replicates 3 --out results/compare`
    """
    from cellseg.experiments.compare import compare as run_compare
    from cellseg.tracking.runs import resolve_tracking_uri

    for option, value in (("--strategy", options.strategy), ("--codes", options.codes)):
        if value is not None:
            raise ConfigError(f"--strategies {strategies} and {option} {value}: compare takes --strategies (a list) "
                              "only")
    config = tracking.apply(options.load())
    uri = resolve_tracking_uri(config.tracking.uri)
    typer.echo(f"comparison in {out} · MLflow {uri}", err=True)
    result = run_compare(config, strategies.split(","), replicates, out, name=name, log_models=log_models)
    for row in result.summary.itertuples():
        sd = "" if row.n < 2 else f" ± {row.accuracy_sd:.4f}"
        typer.echo(f"{row.strategy}: accuracy {row.accuracy_mean:.4f}{sd} (n={row.n})")
    typer.echo(f"wrote {out / 'compare.csv'}, {out / 'compare_runs.csv'}, {result.figure}")
    typer.echo(f"MLflow parent run {result.parent_run_id}; look at it: cellseg ui --tracking-uri {uri}")


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command("tune")(tune)
    app.command("compare")(compare)
