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
from tests.test_predict import SIZE, tiny_metadata

runner = CliRunner()
NAME = "cellseg-fluorescence"


@pytest.fixture(scope="module")
def _registry_template(_mlflow_template, tmp_path_factory):
    """A tracking store holding two tiny models of different weights, each logged as the trainer logs it
    (pickle format) by its own run and registered: version 1 (seed 0) and version 2 (seed 1). Built once;
    MLflow's process-wide URIs are put back afterwards, so nothing here depends on them."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(_mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("cellseg", artifact_location=str(folder / "artifacts"))
        versions = {}
        for version, (seed, metrics) in enumerate([(0, {"accuracy": 0.91, "dice": 0.8, "val_loss": 0.3}),
                                                   (1, {"accuracy": 0.95, "dice": 0.85, "val_loss": 0.2})], 1):
            torch.manual_seed(seed)
            model = build_model("test_resnet", 3, 2).eval()
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.log_metrics(metrics)
                info = mlflow.pytorch.log_model(model, name="model", metadata=tiny_metadata(),
                                                input_example=np.zeros((1, 3, SIZE, SIZE), np.float32),
                                                registered_model_name=NAME, pip_requirements=["torch"],
                                                serialization_format="pickle")
            versions[version] = {"run_id": run.info.run_id, "model_uri": info.model_uri, "model": model}
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
    assert not same_weights(versions[1]["model"], versions[2]["model"])  # else a wrong version would pass
    return {"db": folder / "mlflow.db", "versions": versions, **versions[1]}


@pytest.fixture
def registry(_registry_template, tmp_path):
    """The template registry, its database copied for this test: aliases set by one test never reach another
    (the artifacts, only read, stay shared)."""
    shutil.copy(_registry_template["db"], tmp_path / "registry.db")
    return {**_registry_template, "uri": f"sqlite:///{tmp_path / 'registry.db'}"}


def download_logged_model(registry, dst) -> str:
    """The logged model (models:/m-ID) in folder ``dst``. MLflow resolves such a URI with the process-wide
    registry URI whatever ``tracking_uri`` is passed, so set it here (conftest unsets it after each test)."""
    mlflow.set_tracking_uri(registry["uri"])
    mlflow.set_registry_uri(registry["uri"])
    return mlflow.artifacts.download_artifacts(artifact_uri=registry["model_uri"], dst_path=str(dst))


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
        uri = download_logged_model(registry, tmp_path / "m")
    trained = load_trained_model(uri, tracking_uri=registry["uri"])
    assert same_weights(trained.model, registry["model"])
    assert not same_weights(trained.model, registry["versions"][2]["model"])
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
    folder = download_logged_model(registry, tmp_path / "m")
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
    assert same_weights(trained.model, registry["versions"][2]["model"])
    assert not same_weights(trained.model, registry["versions"][1]["model"])
    assert trained.run_id == registry["versions"][2]["run_id"]
    rows = list_models(registry["uri"])
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [(NAME, 2, ["champion"]), (NAME, 1, [])]
    assert rows[0]["strategy"] == "fluorescence" and rows[0]["codes"] == [0, 3, 6]
    assert rows[0]["metrics"] == {"accuracy": 0.95, "dice": 0.85}  # version 2's own run
    assert rows[1]["metrics"] == {"accuracy": 0.91, "dice": 0.8}
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


def direct_masks(model: torch.nn.Module, trained, store_path) -> dict[str, np.ndarray]:
    """Per stack of the store: the model applied directly to the whole normalised input, argmax over
    classes, with the near-ties (|logit difference| < 1e-4) marked -1: blended probabilities may break them
    the other way."""
    from cellseg.inference.predict import input_plan, model_input, model_layout, model_normalisation, store_stacks

    plan = input_plan(trained)
    masks = {}
    with torch.no_grad():
        for stack in store_stacks(store_path, model_layout(trained), plan):
            x = model_input(stack, plan, model_normalisation(trained), seed=0)
            logits = model.eval()(x[None])[0]
            top2 = logits.topk(2, 0).values
            mask = logits.argmax(0).numpy().astype(np.int64)
            mask[(top2[0] - top2[1]).numpy() < 1e-4] = -1
            masks[stack.name] = mask
    return masks


def test_predict_and_evaluate_by_alias_from_the_cli(registry, trainer_store):
    """`cellseg predict/evaluate models:/NAME@alias` score the aliased version: masks equal to its model
    applied directly to the normalised input (the store's 64 px stacks are one tile at the model's size),
    and evaluate's accuracy/Dice those of these masks against the store's."""
    from PIL import Image

    from cellseg.data.store import open_store

    uri = ["--tracking-uri", registry["uri"]]
    result = runner.invoke(app, ["models", "promote", NAME, "2", "--alias", "champion", *uri])
    assert result.exit_code == 0, result.output
    trained = load_trained_model(f"models:/{NAME}/2", tracking_uri=registry["uri"])
    expected = direct_masks(registry["versions"][2]["model"], trained, trainer_store)
    other = direct_masks(registry["versions"][1]["model"], trained, trainer_store)
    # the two versions disagree on many pixels, so a wrong version cannot pass
    assert sum(int((expected[k] != other[k]).sum()) for k in expected) > 0.05 * sum(m.size for m in expected.values())

    result = runner.invoke(app, ["predict", f"models:/{NAME}@champion", str(trainer_store), "--out", "pred",
                                 "--device", "cpu", *uri])
    assert result.exit_code == 0, result.output
    store = open_store(trainer_store)
    assert sorted(expected) == sorted(store.ids)
    hits = pixels = 0
    cell = {"tp": 0, "fp": 0, "fn": 0}
    for i, stack_id in enumerate(store.ids):
        got = np.asarray(Image.open(f"pred/masks/{stack_id}.png")).astype(np.int64)
        want = expected[stack_id]
        decided = want >= 0
        assert got.shape == want.shape and (got[decided] == want[decided]).all(), stack_id
        assert decided.mean() > 0.99
        truth = store.read_mask(i).astype(np.int64)
        hits += int((got == truth).sum())
        pixels += truth.size
        cell["tp"] += int(((got == 1) & (truth == 1)).sum())
        cell["fp"] += int(((got == 1) & (truth != 1)).sum())
        cell["fn"] += int(((got != 1) & (truth == 1)).sum())

    result = runner.invoke(app, ["evaluate", f"models:/{NAME}@champion", "--data", str(trainer_store), "--out", "ev",
                                 "--device", "cpu", "--no-log", *uri])
    assert result.exit_code == 0, result.output
    import pandas as pd

    summary = pd.read_csv("ev/summary.csv").set_index("scope").loc["all"]
    assert summary["pixels"] == pixels
    assert summary["accuracy"] == pytest.approx(hits / pixels, abs=1e-3)  # near-ties may flip a pixel or two
    assert summary["dice"] == pytest.approx(2 * cell["tp"] / (2 * cell["tp"] + cell["fp"] + cell["fn"]), abs=1e-3)


def test_models_list_empty_store(mlflow_db):
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "no registered models" in result.output


# --- cellseg ui ------------------------------------------------------------------------------------


def test_ui_runs_mlflow_on_the_default_store(monkeypatch, mlflow_db, tmp_path):
    calls = []
    monkeypatch.setattr(models_cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(models_cli, "find_mlflow", lambda: "/bin/mlflow")
    result = runner.invoke(app, ["ui", "--port", "5001"])
    assert result.exit_code == 0, result.output
    here = f"sqlite:///{tmp_path.resolve().as_posix()}"  # the test's folder, absolute
    assert calls == [["/bin/mlflow", "ui", "--backend-store-uri", f"{here}/mlflow.db", "--host", "127.0.0.1",
                      "--port", "5001"]]
    shutil.copy("mlflow.db", "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    runner.invoke(app, ["ui"])
    assert calls[-1][3] == f"{here}/other.db"


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
