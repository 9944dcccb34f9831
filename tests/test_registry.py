"""Loading trained models from every kind of source, the registry (list, promote, aliases) and `cellseg ui`."""

from __future__ import annotations

import json
import shutil
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cellseg.cli import models as models_cli
from cellseg.cli.main import app
from cellseg.engine.checkpoint import save_checkpoint
from cellseg.errors import TrackingError
from cellseg.model import build_model
from cellseg.tracking.models import list_models, load_trained_model, promote
from cellseg.tracking.runs import resolve_tracking_uri
from tests.test_predict import SIZE, tiny_metadata

runner = CliRunner()
NAME = "cellseg-fluorescence"


@pytest.fixture(scope="module")
def registry(_mlflow_template, tmp_path_factory):
    """A tracking store holding one tiny model logged as the trainer logs it (pickle format), registered twice."""
    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(_mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    torch.manual_seed(0)
    model = build_model("test_resnet", 3, 2).eval()
    experiment = mlflow.create_experiment("cellseg", artifact_location=str(folder / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metrics({"accuracy": 0.91, "dice": 0.8, "val_loss": 0.3})
        info = mlflow.pytorch.log_model(model, name="model", input_example=np.zeros((1, 3, SIZE, SIZE), np.float32),
                                        metadata=tiny_metadata(), registered_model_name=NAME,
                                        pip_requirements=["torch"], serialization_format="pickle")
    mlflow.MlflowClient().create_model_version(NAME, info.model_uri, run_id=run.info.run_id, model_id=info.model_id)
    return {"uri": uri, "run_id": run.info.run_id, "model_uri": info.model_uri, "model": model, "folder": folder}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["version", "run", "logged", "folder"])
def test_load_every_uri_kind(registry, kind, tmp_path):
    uri = {
        "version": f"models:/{NAME}/1",
        "run": f"runs:/{registry['run_id']}/model",
        "logged": registry["model_uri"],
        "folder": None,
    }[kind]
    if kind == "folder":
        uri = mlflow.artifacts.download_artifacts(artifact_uri=registry["model_uri"], dst_path=str(tmp_path / "m"))
    trained = load_trained_model(uri, tracking_uri=registry["uri"])
    assert same_weights(trained.model, registry["model"])
    assert trained.metadata["codes"] == [0, 3, 6] and trained.size == SIZE
    assert trained.run_id == registry["run_id"] and not trained.model.training
    # MLflow saves a torch.export program fixed to the example's shape; the rebuilt model takes any
    out = trained.model(torch.rand(2, 3, 45, 77))
    assert out.shape == (2, 2, 45, 77)


@pytest.mark.slow
def test_load_a_pt2_model_folder(tmp_path):
    """MLflow's default format is a torch.export program fixed to batch 1 and the example's size."""
    model = build_model("test_resnet", 3, 2).eval()
    mlflow.pytorch.save_model(model, tmp_path / "pt2", input_example=np.zeros((1, 3, SIZE, SIZE), np.float32),
                              metadata=tiny_metadata(), pip_requirements=["torch"], serialization_format="pt2")
    trained = load_trained_model(tmp_path / "pt2")
    assert same_weights(trained.model, model)
    assert trained.model(torch.rand(3, 3, 40, 100)).shape == (3, 2, 40, 100)


def test_load_run_folder_checkpoint(tmp_path):
    model = build_model("test_resnet", 3, 2)
    save_checkpoint(tmp_path / "run" / "checkpoint_last.pt", {"metadata": tiny_metadata(), "model": model.state_dict()})
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoint_last.pt"):
        assert same_weights(load_trained_model(source).model, model)


@pytest.mark.parametrize("uri", [f"models:/{NAME}/9", f"models:/{NAME}@nobody", "models:/no-such-model/1",
                                 "runs:/0123456789abcdef/model", "no/such/folder"])
def test_missing_model_is_one_line_naming_it(registry, uri):
    with pytest.raises(TrackingError) as err:
        load_trained_model(uri, tracking_uri=registry["uri"])
    message = str(err.value)
    assert message.startswith(uri) and "\n" not in message


def test_metadata_and_folder_errors(registry, tmp_path):
    folder = mlflow.artifacts.download_artifacts(artifact_uri=registry["model_uri"], dst_path=str(tmp_path / "m"))
    mlmodel = tmp_path / "m" / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    del spec["metadata"]["encoder"]
    mlmodel.write_text(yaml.safe_dump(spec))
    with pytest.raises(TrackingError, match="metadata lacks encoder"):
        load_trained_model(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrackingError, match="neither an MLflow model folder"):
        load_trained_model(tmp_path / "empty")


def test_promote_then_load_by_alias_and_list(registry):
    done = promote(NAME, 2, "champion", tracking_uri=registry["uri"])
    assert done["uri"] == f"models:/{NAME}@champion"
    trained = load_trained_model(f"models:/{NAME}@champion", tracking_uri=registry["uri"])
    assert same_weights(trained.model, registry["model"])
    rows = list_models(registry["uri"])
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [(NAME, 2, ["champion"]), (NAME, 1, [])]
    assert rows[0]["strategy"] == "fluorescence" and rows[0]["codes"] == [0, 3, 6]
    assert rows[0]["metrics"] == {"accuracy": 0.91, "dice": 0.8}
    with pytest.raises(TrackingError, match=f"models:/{NAME}/7"):
        promote(NAME, 7, "champion", tracking_uri=registry["uri"])


def test_models_cli(registry):
    uri = ["--tracking-uri", registry["uri"]]
    result = runner.invoke(app, ["models", "promote", NAME, "1", "--alias", "challenger", *uri])
    assert result.exit_code == 0, result.output
    assert f"models:/{NAME}@challenger -> version 1" in result.output
    result = runner.invoke(app, ["models", "list", "--json", *uri])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["version"]: r["aliases"] for r in rows}[1] == ["challenger"]
    result = runner.invoke(app, ["models", "list", *uri])
    assert result.exit_code == 0 and NAME in result.output and "fluorescence" in result.output
    result = runner.invoke(app, ["models", "promote", NAME, "5", *uri])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: models:/{NAME}/5") and result.output.count("\n") == 1


def test_models_list_empty_store(mlflow_db):
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "no registered models" in result.output


# --- cellseg ui ------------------------------------------------------------------------------------


def test_ui_runs_mlflow_on_the_default_store(monkeypatch, mlflow_db):
    calls = []
    monkeypatch.setattr(models_cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(models_cli, "find_mlflow", lambda: "/bin/mlflow")
    result = runner.invoke(app, ["ui", "--port", "5001"])
    assert result.exit_code == 0, result.output
    assert calls == [["/bin/mlflow", "ui", "--backend-store-uri", resolve_tracking_uri(), "--host", "127.0.0.1",
                      "--port", "5001"]]
    assert resolve_tracking_uri().endswith("/mlflow.db")
    shutil.copy("mlflow.db", "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    runner.invoke(app, ["ui"])
    assert calls[-1][3] == resolve_tracking_uri() and calls[-1][3].endswith("/other.db")


def test_ui_without_mlflow_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 1
    assert result.output == "error: mlflow: command not found on PATH (install it with `pip install mlflow`)\n"


def test_ui_with_a_server_uri_points_there(monkeypatch):
    monkeypatch.setattr(models_cli.subprocess, "call", lambda argv: pytest.fail("must not start a server"))
    result = runner.invoke(app, ["ui", "--tracking-uri", "http://mlflow.example:5000"])
    assert result.exit_code == 0 and "open it in a browser" in result.output
