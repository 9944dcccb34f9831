"""Tiled prediction, previews, evaluation and their CLI: tiny models on the CPU, tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.layouts import load_layout
from cellseg.data.schemas import EVAL_STACKS_SCHEMA, EVAL_SUMMARY_SCHEMA
from cellseg.engine.checkpoint import save_checkpoint
from cellseg.data.intensity import Normalisation
from cellseg.inference.predict import Stack, input_plan, model_input
from cellseg.inference.tiling import gaussian_window, predict_tiled, tile_starts, tiles
from cellseg.model import build_model
from cellseg.tracking.models import load_trained_model
from cellseg.visualize import PREDICTION_COLOUR, TRUTH_COLOUR, outlines, overlay

runner = CliRunner()
SIZE = 64


def tiny_metadata(codes=(0, 3, 6), strategy="fluorescence") -> dict:
    return {
        "codes": list(codes), "strategy": strategy, "layout": load_layout("trainer").model_dump(mode="json"),
        "classes": ["Background", "Cell"], "size": SIZE, "in_channels": len(codes), "num_classes": 2,
        "channel_dropout": 0.5, "merge_dropout": 0.5, "encoder": "test_resnet",
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding only what predict needs from the engine's checkpoint: metadata + weights."""
    torch.manual_seed(0)
    model = build_model("test_resnet", 3, 2)
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder / "checkpoint_last.pt", {"metadata": tiny_metadata(), "model": model.state_dict()})
    return folder


def big_stack(path, height=150, width=170, channels=16, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4000, size=(channels, height, width), dtype=np.uint16)
    image[:, 40:90, 50:120] += 20000  # a bright "cell"
    tifffile.imwrite(path, image)
    return path


# --- visualize -------------------------------------------------------------------------------------


def test_overlay_draws_prediction_and_truth_outlines():
    image = np.random.default_rng(0).random((16, 40, 50)).astype(np.float32)
    pred = np.zeros((40, 50), np.uint8)
    pred[10:20, 10:30] = 1
    truth = np.zeros((40, 50), np.uint8)
    truth[25:35, 5:15] = 1
    rgb = overlay(image, pred, truth)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert ((rgb == PREDICTION_COLOUR).all(-1) == outlines(pred)).all()
    assert ((rgb == TRUTH_COLOUR).all(-1) == outlines(truth)).all()
    assert outlines(pred).sum() == 2 * 10 + 2 * 20 - 4  # one-pixel ring, inside the object
    grey = overlay(torch.ones(1, 8, 8), torch.zeros(8, 8))
    assert (grey == 255).all()  # one channel shown as grey, scaled by its maximum


# --- tiling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,tile,overlap", [(2048, 400, 0.25), (150, 64, 0.25), (64, 64, 0.5), (65, 64, 0.0),
                                                 (40, 64, 0.25), (1000, 97, 0.6)])
def test_tiles_cover_every_pixel_with_requested_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    t = min(tile, length)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + t] += 1
    assert starts[0] == 0 and starts[-1] + t == length
    assert (covered >= 1).all()
    if len(starts) > 1:
        assert min(b - a for a, b in zip(starts, starts[1:])) >= 1
        assert max(b - a for a, b in zip(starts, starts[1:])) <= int(t * (1 - overlap))


def test_blending_weights_normalise_to_one():
    """A model with the same logits everywhere gives exactly those probabilities after blending."""
    logits = torch.tensor([0.3, -1.2, 2.0])

    def constant(x):
        return logits[None, :, None, None].expand(x.shape[0], 3, *x.shape[-2:])

    probs = predict_tiled(constant, torch.zeros(2, 150, 170), tile=64, overlap=0.3, batch_size=3)
    assert probs.shape == (3, 150, 170)
    assert torch.allclose(probs, torch.softmax(logits, 0)[:, None, None].expand_as(probs), atol=1e-6)
    w = gaussian_window(64, 64)
    assert 0.99 < w.max() <= 1.0 and w.min() > 0


def test_tiled_prediction_has_no_seams():
    """Pointwise model: tiled == whole exactly; 3x3 convolutions: equal away from the zero-padded
    tile borders, which the window weights down."""
    torch.manual_seed(0)
    image = torch.rand(3, 130, 141)
    pointwise = torch.nn.Conv2d(3, 2, 1).eval()
    whole = torch.softmax(pointwise(image[None]), 1)[0].detach()
    tiled = predict_tiled(pointwise, image, tile=48, overlap=0.25, batch_size=5)
    assert torch.allclose(tiled, whole, atol=1e-5)

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 2, 3, padding=1))
    whole = torch.softmax(conv(image[None]), 1)[0].detach()
    tiled = predict_tiled(conv.eval(), image, tile=48, overlap=0.5)
    assert (tiled - whole).abs().max() < 1e-3
    assert len(tiles(130, 141, 48, 0.5)) > 9


# --- model input -------------------------------------------------------------------------------------


def test_model_input_uses_codes_with_run_dropout_off(run_dir):
    trained = load_trained_model(run_dir)
    plan = input_plan(trained, codes="200,3,111")  # dropout of channel 0, membrane, merge with merge dropout
    channels = np.stack([np.full((8, 8), 100 * (k + 1), np.uint16) for k in range(len(plan.needed_channels))])
    stack = Stack("s", "s", channels)
    x = model_input(stack, plan, Normalisation("max"), seed=0)
    assert x.shape == (3, 8, 8)
    assert torch.all(x == 1.0)  # every channel loaded: no dropout at inference
    assert torch.equal(x, model_input(stack, plan, Normalisation("max"), seed=0))


# --- predict CLI -------------------------------------------------------------------------------------


def test_predict_image_larger_than_training_size(run_dir, tmp_path):
    image = big_stack(tmp_path / "big.ome.tif")
    result = runner.invoke(app, ["predict", str(run_dir), str(image), "--out", "out", "--device", "cpu",
                                 "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open("out/masks/big.png"))
    preview = np.asarray(Image.open("out/overlays/big.png"))
    assert mask.shape == (150, 170) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert preview.shape == (150, 170, 3)
    assert "big: 150x170" in result.output


def test_predict_reads_a_zarr_store_and_a_tiff_folder(run_dir, trainer_store, synth_trainer):
    result = runner.invoke(app, ["predict", str(run_dir), str(trainer_store), "--out", "z", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from cellseg.data.store import open_store

    store = open_store(trainer_store)
    for i, stack_id in enumerate(store.ids):
        assert np.asarray(Image.open(f"z/masks/{stack_id}.png")).shape == store.shape(i)[1:]
    result = runner.invoke(app, ["predict", str(run_dir), str(synth_trainer / "FullImage"), "--out", "f",
                                 "--device", "cpu", "--tile", "32"])
    assert result.exit_code == 0, result.output
    assert f"{len(store)} image(s) segmented" in result.output


def test_predict_errors_are_one_line(run_dir, tmp_path):
    nine = tmp_path / "nine.tif"
    tifffile.imwrite(nine, np.zeros((9, 40, 40), np.uint16))
    cases = [
        (["predict", "no/such/model", str(nine), "--out", "o"], "no/such/model: no such model"),
        (["predict", str(run_dir), str(nine), "--out", "o", "--device", "cpu"],
         "9 channels, but the model was trained on 16"),
        (["predict", str(run_dir), str(nine), "--out", "o", "--codes", "0,3"], "gives 2 input channels"),
        (["predict", str(run_dir), "missing.tif", "--out", "o", "--device", "cpu"], "missing.tif: no such image"),
        (["predict", str(run_dir), str(nine), "--out", "o", "--device", "tpu"], "--device tpu"),
    ]
    for argv, message in cases:
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, (argv, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (argv, result.output)
        assert "Traceback" not in result.output


# --- evaluate ----------------------------------------------------------------------------------------


def test_evaluate_writes_valid_tables_and_logs_to_mlflow(run_dir, trainer_store, mlflow_db, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/cellseg", "evaluate", "--tracking-uri", "http://me:pw@host"])
    result = runner.invoke(app, ["evaluate", str(run_dir), "--data", str(trainer_store), "--out", "ev",
                                 "--device", "cpu", "--overlays"])
    assert result.exit_code == 0, result.output
    per_stack = EVAL_STACKS_SCHEMA.validate(pd.read_csv("ev/per_stack.csv", dtype={"id": str}))
    summary = EVAL_SUMMARY_SCHEMA.validate(pd.read_csv("ev/summary.csv"))
    assert len(per_stack) == 6 and per_stack["negative"].sum() == 2
    assert list(summary["scope"]) == ["all", "cells", "negatives"]
    assert summary.set_index("scope").loc["all", "pixels"] == int((per_stack["height"] * per_stack["width"]).sum())
    assert np.isnan(summary.set_index("scope").loc["negatives", "cell_accuracy"])
    assert len(json.loads(open("ev/summary.json").read())) == 3
    assert len(list(Path("ev/overlays").rglob("*.png"))) == 6
    mlflow.set_tracking_uri(mlflow_db)
    runs = mlflow.search_runs(experiment_names=["cellseg"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["cellseg.model_uri"] == str(run_dir)
    # the UI's "Source": the command as typed, its password redacted (not MLflow's script path)
    assert run.data.tags["mlflow.source.name"] == "cellseg evaluate --tracking-uri 'http://me:***@host'"
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    assert run.data.metrics["eval_accuracy"] == pytest.approx(summary.set_index("scope").loc["all", "accuracy"])


def test_evaluate_rejects_a_store_with_other_channels(tmp_path):
    from cellseg.data.layouts import indexed_layout
    from cellseg.data.store import StackRecord, write_store

    store = write_store(tmp_path / "nine.zarr", [StackRecord("a", np.ones((9, 32, 32), np.uint16),
                                                             np.zeros((32, 32), np.uint8), source="a.tif")],
                        indexed_layout(9), ["Background", "Cell"])
    torch.manual_seed(0)
    folder = tmp_path / "run"
    weights = build_model("test_resnet", 3, 2).state_dict()
    save_checkpoint(folder / "checkpoint_last.pt", {"metadata": tiny_metadata(), "model": weights})
    result = runner.invoke(app, ["evaluate", str(folder), "--data", str(store), "--out", "ev", "--device", "cpu"])
    assert result.exit_code == 1
    assert "store has 9-channel stacks" in result.output and "trained on 16" in result.output
