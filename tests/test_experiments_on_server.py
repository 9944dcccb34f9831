"""`cellseg tune` and `cellseg compare` against a real `mlflow server` over HTTP (issue 6, item 1):
the results are read back through MLflow's client, and nothing goes to the local default store."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from experiments_support import TINY_FIT, small_encoder_file

runner = CliRunner()


@pytest.fixture
def http_limits(monkeypatch):
    """check_tracking_uri caps MLflow's HTTP retries via the environment: keep that inside the test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@pytest.mark.slow
def test_tune_and_compare_log_to_a_tracking_server(trainer_store, mlflow_server, http_limits):
    from mlflow import MlflowClient

    common = ["--data", str(trainer_store), "--config", small_encoder_file(), "--tracking-uri", mlflow_server,
              "--experiment", "experiments-over-http", *TINY_FIT]
    tuned = runner.invoke(app, ["tune", "--study", "http-study", "--trials", "1", "--out", "best.yaml", *common])
    assert tuned.exit_code == 0, tuned.output
    compared = runner.invoke(app, ["compare", "--strategies", "fluorescence,all_black", "--replicates", "1",
                                   "--out", "cmp", *common])
    assert compared.exit_code == 0, compared.output

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("experiments-over-http").experiment_id
    runs = client.search_runs([experiment])
    tune_children = [r for r in runs if r.data.tags.get("study") == "http-study" and r.data.tags.get("mlflow.parentRunId")]
    compare_children = [r for r in runs if r.data.tags.get("strategy") in {"fluorescence", "all_black"}
                        and r.data.tags.get("replicate")]
    assert len(tune_children) == 1 and len(compare_children) == 2
    for child in tune_children + compare_children:
        assert child.info.status == "FINISHED"
        assert client.get_metric_history(child.info.run_id, "accuracy"), child.data.tags
    assert Path("best.yaml").is_file() and Path("cmp/compare.csv").is_file()
    assert not Path("mlflow.db").exists()  # nothing went to the local default store
