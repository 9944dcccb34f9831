"""`cellseg compare`: strategies × replicates on one identical split, tables validated by pandera,
the two-panel figure, child runs tagged under one parent (read back through MlflowClient), and a
re-run that continues instead of retraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from experiments_support import TINY_FIT, small_encoder_file

from cellseg.cli.main import app
from cellseg.data.schemas import COMPARE_RUNS_SCHEMA, COMPARE_SUMMARY_SCHEMA, read_csv
from cellseg.errors import BadInputError

runner = CliRunner()


def compare_args(store, *extra: str) -> list[str]:
    return ["compare", "--data", str(store), "--config", small_encoder_file(), "--strategies", "fluorescence,all_black",
            "--replicates", "2", "--out", "cmp", *TINY_FIT, *extra]


@pytest.mark.slow
def test_compare_end_to_end(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.experiments.compare import default_name
    from cellseg.tracking.runs import resolve_tracking_uri

    result = runner.invoke(app, compare_args(trainer_store, "--seed", "5"))
    assert result.exit_code == 0, result.output
    assert "all_black replicate 2: accuracy" in result.output and "fluorescence: accuracy" in result.output

    out = Path("cmp")
    runs = [out / "runs" / f"{s}-r{r}" for s in ("fluorescence", "all_black") for r in (1, 2)]
    splits = {(run / "split.json").read_text() for run in runs}
    assert len(splits) == 1 and splits == {(out / "split.json").read_text()}  # one split for every run
    assert json.loads(splits.pop())["seed"] == 5
    seeds = {run.name: int(next(line for line in (run / "config.yaml").read_text().splitlines()
                                if line.startswith("seed:")).split()[1]) for run in runs}
    assert seeds == {"fluorescence-r1": 5, "fluorescence-r2": 6, "all_black-r1": 5, "all_black-r2": 6}

    summary = read_csv(out / "compare.csv", COMPARE_SUMMARY_SCHEMA)
    assert list(summary["strategy"]) == ["fluorescence", "all_black"] and list(summary["n"]) == [2, 2]
    per_run = read_csv(out / "compare_runs.csv", COMPARE_RUNS_SCHEMA)
    assert len(per_run) == 8 and set(per_run["epoch"]) == {1, 2}
    final = per_run[(per_run["strategy"] == "fluorescence") & (per_run["epoch"] == 2)]["accuracy"]
    assert summary.loc[0, "accuracy_mean"] == pytest.approx(final.mean())
    assert summary.loc[0, "accuracy_sd"] == pytest.approx(final.std(ddof=1), nan_ok=True)
    assert (out / "compare.png").stat().st_size > 0

    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name("cellseg").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`cellseg.kind` = 'compare'")
    name = parent.data.tags["comparison"]
    assert name == default_name(out) and name.startswith("cmp-") and parent.info.status == "FINISHED"
    children = client.search_runs([experiment], filter_string=f"tags.comparison = '{name}' AND tags.replicate = '2'")
    assert sorted(c.data.tags["strategy"] for c in children) == ["all_black", "fluorescence"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert set(per_run["mlflow_run_id"]) >= {c.info.run_id for c in children}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"compare.csv", "compare_runs.csv", "compare.png", "split.json"} <= artifacts

    again = runner.invoke(app, compare_args(trainer_store, "--seed", "5"))  # continues: nothing to train
    assert again.exit_code == 0, again.output
    assert read_csv(out / "compare_runs.csv", COMPARE_RUNS_SCHEMA).equals(per_run)
    assert len(client.search_runs([experiment], filter_string=f"tags.comparison = '{name}'")) == 5  # same runs


def test_bad_strategies_fail_before_training(trainer_store):
    for strategies, needle in (("fluorescence,telepathy", "telepathy"), ("membrane,membrane", "more than once"),
                               (",", "at least one")):
        result = runner.invoke(app, ["compare", "--data", str(trainer_store), "--strategies", strategies,
                                     "--out", "cmp"])
        assert result.exit_code == 1 and needle in result.output, result.output
    result = runner.invoke(app, ["compare", "--data", str(trainer_store), "--strategies", "membrane",
                                 "--strategy", "fluorescence", "--out", "cmp"])
    assert result.exit_code == 1 and "--strategies (a list)" in result.output
    assert not Path("cmp").exists() and not Path("mlflow.db").exists()


def test_summary_and_figure_from_a_runs_table(tmp_path):
    from cellseg.experiments.compare import comparison_figure, summary_table
    from cellseg.plots import save_figure

    rows = [{"strategy": s, "replicate": r, "seed": r, "epoch": e, "phase": 1, "lr": 1e-3, "train_loss": 0.5,
             "accuracy": base + 0.01 * e + 0.005 * r, "background_accuracy": 0.9, "cell_accuracy": float("nan"),
             "dice": 0.5, "iou": 0.3, "val_loss": 0.4, "run_dir": f"runs/{s}-r{r}", "mlflow_run_id": None}
            for s, base in (("membrane", 0.8), ("all_black", 0.7)) for r in (1, 2, 3) for e in (1, 2)]
    runs = COMPARE_RUNS_SCHEMA.validate(pd.DataFrame(rows))
    summary = COMPARE_SUMMARY_SCHEMA.validate(summary_table(runs, ["membrane", "all_black"]))
    assert list(summary["n"]) == [3, 3] and list(summary["epochs"]) == [2, 2]
    assert summary.loc[0, "accuracy_mean"] == pytest.approx(0.83)
    assert summary.loc[0, "accuracy_sd"] == pytest.approx(0.005)
    assert math.isnan(summary.loc[0, "cell_accuracy_mean"])
    assert save_figure(comparison_figure(runs, summary), tmp_path / "c.png").stat().st_size > 0
    bad = tmp_path / "bad.csv"
    summary.assign(accuracy_mean=1.5).to_csv(bad, index=False)
    with pytest.raises(BadInputError, match="bad.csv: invalid comparison summary table"):
        read_csv(bad, COMPARE_SUMMARY_SCHEMA)
