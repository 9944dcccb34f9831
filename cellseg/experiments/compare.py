"""Strategy comparison (the paper's ``model_comparison.png``): every strategy × replicate trained by the
engine on ONE split, so differences come from the loading codes and the seed, never from which cells
were held out.

The split is made once (seeded by ``config.seed``) and saved as ``OUT/split.json``; every fit gets
it. Replicate r (1-based) trains with seed ``config.seed + r - 1`` (weights, draws, augmentation).
Runs live in ``OUT/runs/<strategy>-r<r>``; split, parent run (tagged ``comparison``) and resume are
the runner's (cellseg.experiments.runner): re-running the same command continues — finished runs are
kept, interrupted ones resume from their checkpoint, under the same MLflow parent run. Each child is tagged ``comparison``, ``strategy`` and
``replicate``, so the MLflow UI can filter and compare them. Outputs: ``OUT/compare_runs.csv`` (one
row per run and epoch), ``OUT/compare.csv`` (mean ± sd of the final metrics per strategy, n),
``OUT/compare.png`` (accuracy vs epoch, mean with a ±sd band; final accuracy bars with sd error
bars), all validated/logged on the parent run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cellseg.config import Config
from cellseg.data.schemas import (
    COMPARE_RUNS_COLUMNS,
    COMPARE_RUNS_SCHEMA,
    COMPARE_SUMMARY_COLUMNS,
    COMPARE_SUMMARY_SCHEMA,
    validate,
)
from cellseg.data.split import Split
from cellseg.errors import ConfigError
from cellseg.experiments.runner import default_name, experiment, plan
from cellseg.fileio import write_text
from cellseg.plots import save_figure

KIND = "compare"
METRICS = ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "val_loss")
PER_RUN_KEYS = ("seed", "data.strategy", "data.codes")  # set per child run, not by the base config


@dataclass
class CompareResult:
    summary: pd.DataFrame  # compare.csv
    runs: pd.DataFrame  # compare_runs.csv
    out: Path
    figure: Path
    parent_run_id: str
    split: Split


def compare(
    config: Config,
    strategies: Sequence[str],
    replicates: int,
    out: str | Path,
    name: str | None = None,
    log_models: bool = False,
    show_progress: bool = True,
) -> CompareResult:
    """Train ``strategies`` × ``replicates`` on one split and write the tables and figure to ``out``.

    ``name`` identifies the comparison in MLflow (default: ``default_name(out)``);
    ``log_models`` logs each run's model to its child run (large: off by default; the checkpoints
    in the run folders load with ``load_trained_model`` either way)."""
    out = Path(out)
    strategies = _check_strategies(strategies)
    if replicates < 1:
        raise ConfigError(f"--replicates {replicates}: must be at least 1")
    planned = plan([_run_config(config, s, 1) for s in strategies], out, "use a new --out")
    name = name or default_name(out)
    params = {"strategies": ",".join(strategies), "replicates": replicates,
              "seeds": ",".join(str(config.seed + r) for r in range(replicates)),
              **{k: v for k, v in config.flat().items() if k not in PER_RUN_KEYS}}
    runs = [(s, r) for s in strategies for r in range(1, replicates + 1)]
    records: list[dict[str, Any]] = []
    with experiment(planned, KIND, "comparison", name, len(runs), "runs", params,
                    show_progress=show_progress) as runner:
        for strategy, replicate in runs:
            run_config = _run_config(config, strategy, replicate)
            run_dir = out / "runs" / f"{strategy}-r{replicate}"
            child = runner.child(f"{strategy}-r{replicate}", {"replicate": replicate}, log_model=log_models)
            result = runner.fit(run_config, run_dir, child)
            records += _records(result.history, strategy, replicate, run_config.seed, run_dir, child.run_id)
            runner.done(_line(strategy, replicate, result.final))
        runs_table = validate(pd.DataFrame(records, columns=COMPARE_RUNS_COLUMNS), COMPARE_RUNS_SCHEMA,
                              out / "compare_runs.csv")
        summary = validate(summary_table(runs_table, strategies), COMPARE_SUMMARY_SCHEMA, out / "compare.csv")
        write_text(out / "compare_runs.csv", runs_table.to_csv(index=False))
        write_text(out / "compare.csv", summary.to_csv(index=False))
        figure = save_figure(comparison_figure(runs_table, summary), out / "compare.png")
        parent = runner.parent
        parent.log_artifacts([out / "compare.csv", out / "compare_runs.csv", figure])
        for row in summary.itertuples():
            parent.log_metrics({f"{row.strategy}.accuracy_mean": row.accuracy_mean,
                                **({f"{row.strategy}.accuracy_sd": row.accuracy_sd}
                                   if math.isfinite(row.accuracy_sd) else {})})
    return CompareResult(summary=summary, runs=runs_table, out=out, figure=figure, parent_run_id=parent.run_id,
                         split=planned.split)


def _check_strategies(strategies: Sequence[str]) -> list[str]:
    """The given names, stripped, at least one and none twice."""
    strategies = [s.strip() for s in strategies if s.strip()]
    if not strategies:
        raise ConfigError("--strategies: give at least one strategy name, e.g. fluorescence,cytoplasm")
    twice = sorted({s for s in strategies if strategies.count(s) > 1})
    if twice:
        raise ConfigError(f"--strategies: {', '.join(twice)} given more than once")
    return strategies


def _run_config(config: Config, strategy: str, replicate: int) -> Config:
    run = config.with_overrides({"seed": config.seed + replicate - 1, "data.strategy": strategy})
    run.data.codes = None  # the strategy decides the codes
    return run


def _records(history, strategy: str, replicate: int, seed: int, run_dir: Path, run_id: str | None):
    return [{"strategy": strategy, "replicate": replicate, "seed": seed, "epoch": h["epoch"], "phase": h["phase"],
             "lr": h.get("lr"), "train_loss": h.get("train_loss"), **{m: h.get(m) for m in METRICS},
             "run_dir": str(run_dir), "mlflow_run_id": run_id} for h in history]


def _line(strategy: str, replicate: int, final: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = final.get(key)
        return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"

    return (f"{strategy} replicate {replicate}: accuracy {fmt('accuracy')} · cell accuracy "
            f"{fmt('cell_accuracy')} · dice {fmt('dice')} · val_loss {fmt('val_loss')}")


def summary_table(runs: pd.DataFrame, strategies: Sequence[str]) -> pd.DataFrame:
    """Per strategy: n replicates, epochs, mean and sample sd of each metric at each run's last epoch."""
    last = runs.sort_values("epoch").groupby(["strategy", "replicate"], sort=False).tail(1)
    rows = []
    for strategy in strategies:
        final = last[last["strategy"] == strategy]
        row = {"strategy": strategy, "n": len(final), "epochs": int(final["epoch"].max())}
        for metric in METRICS:
            values = final[metric].astype(float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_sd"] = values.std(ddof=1) if values.count() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=COMPARE_SUMMARY_COLUMNS)


def comparison_figure(runs: pd.DataFrame, summary: pd.DataFrame):
    """Left: validation accuracy vs epoch per strategy (mean over replicates, ±sd band).
    Right: final accuracy per strategy, mean with sd error bars."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.15, 1]})
    lows = []
    for i, strategy in enumerate(summary["strategy"]):
        per_epoch = runs[runs["strategy"] == strategy].groupby("epoch")["accuracy"]
        mean, sd = per_epoch.mean(), per_epoch.std(ddof=1).fillna(0.0)
        curves.plot(mean.index, mean.values, color=f"C{i}", lw=1.8, label=_label(strategy))
        curves.fill_between(mean.index, mean - sd, mean + sd, color=f"C{i}", alpha=0.2, lw=0)
        lows.append(mean.min())  # bands may run off the bottom; the means set the scale
    curves.set_xlabel("epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_ylabel("validation accuracy")
    curves.legend(fontsize=8, frameon=False)
    sds = summary["accuracy_sd"].fillna(0.0)
    bars.bar(range(len(summary)), summary["accuracy_mean"], yerr=sds, capsize=4, color="#3953a4")
    bars.set_xticks(range(len(summary)), [_label(s) for s in summary["strategy"]], rotation=45, ha="right")
    bars.set_ylabel("final validation accuracy")
    lows.append((summary["accuracy_mean"] - sds).min())
    bottom = max(0.0, math.floor((min(lows) - 0.02) * 20) / 20) if lows and math.isfinite(min(lows)) else 0.0
    for ax in (curves, bars):
        ax.set_ylim(bottom, 1.0)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _label(strategy: str) -> str:
    return strategy.replace("_", " ").title()
