"""One dispatch loads a trained model from a checkpoint, a run folder or (through a resolver) a model
URI, for prediction and for `--init-from` alike; the engine never needs MLflow's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellseg.engine.checkpoint import save_checkpoint
from cellseg.engine.restore import load_initial_model
from cellseg.errors import TrackingError
from cellseg.model import build_model
from cellseg.model.loading import load_trained_model
from cellseg.run_folder import CHECKPOINT_NAME

METADATA = {"codes": [0, 3, 6], "layout": {}, "classes": ["Background", "Cell"], "size": 64, "in_channels": 3,
            "num_classes": 2, "encoder": "test_resnet"}


@pytest.fixture
def run_folder(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = build_model("test_resnet").state_dict()
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"metadata": METADATA, "model": state,
                                                 "callbacks": {"mlflow": {"run_id": "abc"}}})
    return tmp_path, state


def test_a_run_folder_and_its_checkpoint_load_the_same_model(run_folder):
    folder, state = run_folder
    for source in (folder, folder / CHECKPOINT_NAME):
        trained = load_trained_model(source)
        assert trained.run_id == "abc" and not trained.model.training
        assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in state.items())
    weights, metadata = load_initial_model(folder)
    assert metadata == METADATA and all(torch.equal(weights[k], v) for k, v in state.items())


def test_a_uri_goes_through_the_resolver(tmp_path):
    with pytest.raises(TrackingError, match="models:/m/1: a model URI, but nothing here resolves"):
        load_trained_model("models:/m/1")
    asked = []

    def resolve(uri: str, scratch: Path) -> Path:
        asked.append(uri)
        return scratch  # an empty folder: no MLmodel

    with pytest.raises(TrackingError, match=r"models:/m/1: not an MLflow model \(no MLmodel file there\)"):
        load_trained_model("models:/m/1", resolve=resolve)
    assert asked == ["models:/m/1"]


def test_init_from_errors_name_the_option(tmp_path):
    with pytest.raises(TrackingError, match="^--init-from nowhere: no such model"):
        load_initial_model("nowhere")
    with pytest.raises(TrackingError, match="^--init-from .*: neither an MLflow model folder"):
        load_initial_model(tmp_path)
