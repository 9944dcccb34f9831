"""`cellseg sweep-ce`: one model per cell weight on one split, a validated table, the trade-off and
prediction figures, one MLflow parent run with a child per weight, a re-run that continues (as
compare's; `--resume` is accepted and changes nothing), and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.schemas import SWEEP_CE_SCHEMA, read_csv
from cellseg.errors import ConfigError
from cellseg.experiments.runner import default_name
from cellseg.experiments.sweep_ce import check_weights
from experiments_support import TINY, TINY_FIT, one_line_error, small_encoder_file

runner = CliRunner()


@pytest.mark.slow
def test_sweep_trains_one_model_per_weight_on_one_split(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    args = ["sweep-ce", "--data", str(trainer_store), "--strategy", "fluorescence", "--weights", "0.1,10",
            "--out", "ce", "--config", small_encoder_file(), *TINY_FIT]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    table = read_csv("ce/sweep_ce.csv", SWEEP_CE_SCHEMA)
    assert table["weight"].tolist() == [0.1, 10.0] and set(table["strategy"]) == {"fluorescence"}
    # overall error = the per-class errors weighted by the validation pixels of each class: one cell fraction
    # f (the same split for both weights) solves wrong_overall = (1 - f) wrong_background + f wrong_cell for
    # both rows, and is the split's cell fraction in the store's masks (validated at --size 64, up to resizing)
    from cellseg.data.store import open_store

    store = open_store(trainer_store)
    val = [store.read_mask(store.ids.index(i)) for i in json.loads(Path("ce/split.json").read_text())["val"]]
    cell_fraction = sum(int((m == 1).sum()) for m in val) / sum(m.size for m in val)
    rows = list(table.itertuples())
    if cell_fraction > 0:
        first = rows[0]
        f = (first.wrong_overall - first.wrong_background) / (first.wrong_cell - first.wrong_background)
        assert f == pytest.approx(cell_fraction, abs=0.02)
    else:
        f = 0.0
    for row in rows:
        wrong_cell = row.wrong_cell if cell_fraction > 0 else 0.0
        assert row.wrong_overall == pytest.approx((1 - f) * row.wrong_background + f * wrong_cell, abs=1e-6), row
    assert (table["epochs"] == 2).all()
    for name in ("sweep_ce.png", "sweep_ce_predictions.png"):
        assert Path("ce", name).stat().st_size > 0
    splits = {Path(f"ce/weight-{w}/split.json").read_text() for w in ("0.1", "10")}
    assert len(splits) == 1 and json.loads(splits.pop())["val"] == json.loads(Path("ce/split.json").read_text())["val"]
    configs = [Path(f"ce/weight-{w}/config.yaml").read_text() for w in ("0.1", "10")]
    assert "- 0.1" in configs[0] and "- 10.0" in configs[1]  # ce_weights = [1, w]

    client = MlflowClient(resolve_tracking_uri())  # absolute: MLflow caches stores by URI
    experiment = client.get_experiment_by_name("cellseg").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`cellseg.kind` = 'sweep-ce'")
    parent_id = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == default_name(Path("ce"))
    assert parent.data.tags["strategy"] == "fluorescence"
    assert {a.path for a in client.list_artifacts(parent_id)} == {
        "sweep_ce.csv", "sweep_ce.png", "sweep_ce_predictions.png", "split.json"}
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(c.data.tags["weight"] for c in children) == ["0.1", "10"]
    assert {c.data.tags["strategy"] for c in children} == {"fluorescence"}
    assert sorted(c.info.run_name for c in children) == ["ce-w0.1", "ce-w10"]  # like trial-7, fluorescence-r1
    assert parent.data.tags["mlflow.source.name"] and parent.data.tags["mlflow.user"]  # "Source", "Created by"
    assert {c.data.tags["mlflow.source.type"] for c in [parent, *children]} == {"LOCAL"}
    assert set(table["run_id"]) == {c.info.run_id for c in children}

    for again in (args, [*args, "--resume"]):  # finished weights are re-read, not retrained, --resume or not
        result = runner.invoke(app, again)
        assert result.exit_code == 0, result.output
        assert read_csv("ce/sweep_ce.csv", SWEEP_CE_SCHEMA)["accuracy"].tolist() == table["accuracy"].tolist()
        assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")) == 2
    assert len(client.search_runs([experiment], "tags.`cellseg.kind` = 'sweep-ce'")) == 1  # the same parent


def test_weights_must_be_distinct_positive_numbers():
    assert check_weights([0.01, 1, 100]) == [0.01, 1.0, 100.0]
    for bad, needle in (([], "at least one"), ([0, 1], "positive"), ([1, 1.0], "twice")):
        with pytest.raises(ConfigError, match=needle):
            check_weights(bad)


def test_bad_sweep_input_is_one_line(trainer_store, mlflow_db):
    store = str(trainer_store)
    one_line_error(runner.invoke(app, ["sweep-ce", "--data", store, "--weights", "1,x", *TINY]), "--weights '1,x'")
    one_line_error(runner.invoke(app, ["sweep-ce", "--data", store, "--weights", "-1,1", *TINY]), "positive")
    one_line_error(runner.invoke(app, ["sweep-ce", "--data", store, "--ce-weights", "1,2", *TINY]), "--ce-weights")
    one_line_error(runner.invoke(app, ["sweep-ce", "--data", store, "--strategy", "telepathy", *TINY]), "telepathy")
    one_line_error(runner.invoke(app, ["sweep-ce", "--data", "nowhere.zarr", *TINY]), "nowhere.zarr")
