"""Cells as instances (issue 14): labelling, per-cell measurements, instance metrics and their CLI."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from experiments_support import one_line_error

from cellseg.cli.main import app
from cellseg.data.geometry import Geometry
from cellseg.data.intensity import Normalisation
from cellseg.data.layouts import load_layout
from cellseg.data.schemas import CELLS_SCHEMA, EVAL_STACKS_SCHEMA, EVAL_SUMMARY_SCHEMA
from cellseg.data.store import open_store
from cellseg.engine.checkpoint import save_checkpoint
from cellseg.inference.instance_metrics import match, scores
from cellseg.inference.instances import instances_from_probabilities, label_instances, write_labels
from cellseg.inference.measurements import cell_table
from cellseg.model import build_model
from cellseg.tracking.runs import resolve_tracking_uri

runner = CliRunner()
TRAINER = load_layout("trainer")


def disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def checkpoint(folder, classes=("Background", "Cell"), cell_bias: float = 5.0):
    """A tiny test_resnet run folder whose head ignores its input: every pixel is class 1 (``cell_bias``
    > 0), so predict's one cell is the whole image."""
    torch.manual_seed(0)
    model = build_model("test_resnet", 3, len(classes))
    weights = model.state_dict()
    weights["head.weight"].zero_()
    weights["head.bias"].copy_(torch.tensor([0.0, cell_bias, *[-5.0] * (len(classes) - 2)]))
    metadata = {"codes": [0, 3, 6], "strategy": None, "layout": TRAINER.model_dump(mode="json"),
                "classes": list(classes), "size": 64, "in_channels": 3, "num_classes": len(classes),
                "encoder": "test_resnet", "geometry": {**Geometry("none", 64).to_dict(), "cell_diameter": 12.0},
                "normalisation": Normalisation("max").to_dict()}
    save_checkpoint(folder / "checkpoint_last.pt", {"metadata": metadata, "model": weights})
    return folder


# --- labelling -------------------------------------------------------------------------------------


def test_touching_disks_are_split_by_the_watershed():
    shape = (60, 90)
    mask = disk(shape, (30, 25), 12) | disk(shape, (30, 47), 12)  # overlapping: one blob, a neck between
    mask[30, 25] = False  # a hole: filled
    mask[5:7, 80:82] = True  # a speck far below a cell's size: dropped
    labels = label_instances(mask, diameter=24)
    assert labels.dtype == np.uint16 and labels.max() == 2
    left, right = labels[30, 20], labels[30, 52]
    assert {left, right} == {1, 2} and labels[30, 25] == left and labels[5, 80] == 0
    assert abs(int((labels == 1).sum()) - int((labels == 2).sum())) < 0.05 * mask.sum()
    # the same from class probabilities (class 1 = cell), as a tensor
    probs = torch.from_numpy(np.stack([~mask, mask]).astype(np.float32))
    assert (instances_from_probabilities(probs, 1, 24) > 0).sum() == (labels > 0).sum()
    assert label_instances(np.zeros(shape, bool)).max() == 0


def test_a_boundary_class_separates_touching_cells_the_cell_class_alone_merges():
    """Two touching 20 x 20 squares: as one cell blob they are one object to a seedless split; with the
    model's boundary class between them they are two cells, grown back over their boundary pixels."""
    probs = np.zeros((3, 40, 60), np.float32)
    probs[0] = 1.0
    probs[:, 10:30, 10:50] = [[[0.0]], [[1.0]], [[0.0]]]  # cell
    probs[:, 10:30, 29:31] = [[[0.0]], [[0.2]], [[0.8]]]  # boundary between the two squares
    merged = instances_from_probabilities(probs[:2], cell=1, diameter=60)
    assert merged.max() == 1
    labels = instances_from_probabilities(probs, cell=1, diameter=20, boundary=2)
    assert labels.max() == 2 and (labels > 0).sum() == 20 * 40
    assert len(np.unique(labels[10:30, 10:29])) == 1 and len(np.unique(labels[10:30, 31:50])) == 1


def test_more_than_65535_cells_are_written_as_uint32(tmp_path):
    ids = np.arange(1, 70_001, dtype=np.int64).reshape(280, 250)
    write_labels(tmp_path / "many.tif", ids)
    back = tifffile.imread(tmp_path / "many.tif")
    assert back.dtype == np.uint32 and np.array_equal(back, ids)
    write_labels(tmp_path / "few.tif", ids % 65_536)
    assert tifffile.imread(tmp_path / "few.tif").dtype == np.uint16


# --- measurements -----------------------------------------------------------------------------------


def test_cell_table_measures_known_squares():
    labels = np.zeros((40, 50), np.uint16)
    labels[2:6, 3:9] = 1  # 4 x 6
    labels[10:20, 20:30] = 2  # 10 x 10 square
    channels = np.stack([np.arange(2000, dtype=np.uint16).reshape(40, 50), np.full((40, 50), 7, np.uint16)])
    table = cell_table(labels, channels, ["membrane", "nucleus"], pixel_size=0.5)
    assert list(table.columns) == ["label", "area_px", "area_um2", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
                                   "bbox_y1", "bbox_x1", "eccentricity", "mean_membrane", "mean_nucleus",
                                   "max_membrane", "max_nucleus"]
    one, two = table.to_dict(orient="records")
    assert (one["label"], one["area_px"], one["area_um2"]) == (1, 24, 6.0)
    assert (one["centroid_y"], one["centroid_x"]) == (3.5, 5.5)
    assert (one["bbox_y0"], one["bbox_x0"], one["bbox_y1"], one["bbox_x1"]) == (2, 3, 6, 9)
    assert one["mean_membrane"] == channels[0][2:6, 3:9].mean() and one["max_membrane"] == 5 * 50 + 8
    assert two["eccentricity"] == pytest.approx(0.0) and two["mean_nucleus"] == 7.0 and two["area_px"] == 100
    unknown = cell_table(labels, channels, ["membrane", "nucleus"])
    assert unknown["area_um2"].isna().all()
    CELLS_SCHEMA.validate(cell_table(np.zeros((8, 8), np.uint16), channels[:, :8, :8], ["a", "b"]))


# --- metrics ------------------------------------------------------------------------------------------


def test_instance_metrics_on_a_hand_computed_case():
    """Truth: touching squares A, B, a missed C, D. Prediction: A+B as one object (IoU 100/240 with each:
    no match), D' = 8/10 of D (IoU 0.8), a false positive E.
    IoU 0.5 and 0.75: TP 1 (D), FP 2 (A+B, E), FN 3 (A, B, C) -> AP 1/6; IoU 0.9: TP 0 -> 0/7.
    Precision 1/3, recall 1/4, F1 2*1/(2+2+3) = 2/7, PQ 0.8 / (1 + 2/2 + 3/2) = 0.8/3.5; A and B merged."""
    truth = np.zeros((100, 100), np.uint16)
    truth[0:10, 0:10], truth[0:10, 10:20], truth[30:40, 30:40], truth[50:60, 0:10] = 1, 2, 3, 4
    pred = np.zeros_like(truth)
    pred[0:12, 0:20], pred[50:60, 0:8], pred[70:75, 70:75] = 7, 3, 9  # any ids
    one = scores([match(truth, pred)])
    assert one == pytest.approx({
        "true_cells": 4, "predicted_cells": 3, "ap_50": 1 / 6, "ap_75": 1 / 6, "ap_90": 0.0,
        "precision_50": 1 / 3, "recall_50": 1 / 4, "f1_50": 2 / 7, "panoptic_quality_50": 0.8 / 3.5,
        "split_cells": 0, "merged_cells": 2})
    # with a perfect second image: AP is the mean over images (cellpose), the rest pooled (StarDist)
    perfect = match(truth, truth)
    two = scores([match(truth, pred), perfect])
    assert two["ap_50"] == pytest.approx((1 / 6 + 1) / 2)
    assert two["precision_50"] == pytest.approx(5 / 7) and two["recall_50"] == pytest.approx(5 / 8)
    assert two["panoptic_quality_50"] == pytest.approx(4.8 / (5 + 1 + 1.5))
    # one true cell predicted as two halves: split; each half has IoU exactly 0.5, which matches (>=, as in
    # cellpose and StarDist), once: TP 1, FP 1 -> AP 1/2. Empty images leave AP undefined, not 0.
    halves = np.zeros((10, 20), np.uint8)
    halves[:, :10], halves[:, 10:] = 1, 2
    split = scores([match(np.ones((10, 20), np.uint8), halves)])
    assert (split["split_cells"], split["merged_cells"], split["ap_50"]) == (1, 0, 0.5)
    assert np.isnan(scores([match(np.zeros((5, 5), int), np.zeros((5, 5), int))])["ap_50"])


# --- CLI -------------------------------------------------------------------------------------------------


def test_predict_instances_writes_labels_and_a_cell_table(tmp_path):
    run = checkpoint(tmp_path / "run")
    image = np.random.default_rng(0).integers(0, 4000, (16, 60, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", image)
    result = runner.invoke(app, ["predict", str(run), str(tmp_path / "s.tif"), "--out", "out", "--device", "cpu",
                                 "--instances", "--pixel-size", "0.25"])
    assert result.exit_code == 0, result.output
    assert "s: 60x70, 100.0% cell, 1 cells" in result.output
    labels = tifffile.imread("out/labels/s.ome.tif")
    assert labels.dtype == np.uint16 and labels.shape == (60, 70) and (labels == 1).all()  # all cell: one cell
    table = CELLS_SCHEMA.validate(pd.read_csv("out/cells/s.csv"))
    names = [TRAINER.channel_names[c] for c in (0, 3, 6)]
    assert [c for c in table.columns if c.startswith("mean_")] == [f"mean_{n}" for n in names]
    row = table.iloc[0]
    assert row["area_px"] == 60 * 70 and row["area_um2"] == pytest.approx(60 * 70 / 16)
    assert row[f"mean_{names[1]}"] == pytest.approx(image[3].mean()) and row[f"max_{names[2]}"] == image[6].max()
    assert np.asarray(Image.open("out/masks/s.png")).shape == (60, 70)  # the semantic outputs as before


def test_instances_on_a_model_without_a_cell_class_is_one_line(tmp_path):
    run = checkpoint(tmp_path / "run", classes=("Background", "Nucleus"))
    tifffile.imwrite(tmp_path / "s.tif", np.ones((16, 40, 40), np.uint16))
    line = one_line_error(runner.invoke(app, ["predict", str(run), str(tmp_path / "s.tif"), "--out", "o",
                                          "--device", "cpu", "--instances"]))
    assert "--instances: model" in line and "has no cell class (its classes: Background, Nucleus)" in line
    assert not (tmp_path / "o" / "masks").exists()  # refused before any stack is segmented


def test_evaluate_reports_instance_metrics_and_logs_them(tmp_path, trainer_store, mlflow_db):
    run = checkpoint(tmp_path / "run", cell_bias=-5.0)  # predicts no cells: every true cell missed
    result = runner.invoke(app, ["evaluate", str(run), "--data", str(trainer_store), "--out", "ev",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "cells (truth: connected components)" in result.output
    per_stack = EVAL_STACKS_SCHEMA.validate(pd.read_csv("ev/per_stack.csv", dtype={"id": str}))
    summary = EVAL_SUMMARY_SCHEMA.validate(pd.read_csv("ev/summary.csv")).set_index("scope")
    assert (per_stack["predicted_cells"] == 0).all() and (per_stack["instance_truth"] == "connected components").all()
    cells = per_stack[~per_stack["negative"]]
    assert (cells["true_cells"] > 0).all() and (cells["ap_50"] == 0).all() and (cells["recall_50"] == 0).all()
    assert per_stack[per_stack["negative"]]["ap_50"].isna().all()  # no cells either side: undefined
    assert summary.loc["all", "true_cells"] == cells["true_cells"].sum() and summary.loc["all", "ap_50"] == 0
    mlflow.set_tracking_uri(resolve_tracking_uri(mlflow_db))  # absolute: MLflow caches a store per URI
    (logged,) = mlflow.search_runs(experiment_names=["cellseg"], output_format="list")
    assert logged.data.metrics["eval_ap_50"] == 0.0 and logged.data.metrics["eval_cells_recall_50"] == 0.0
    assert "eval_precision_50" not in logged.data.metrics  # 0 / 0: not logged


def test_evaluate_reads_true_label_images_and_refuses_a_wrong_shape(tmp_path, trainer_store):
    run = checkpoint(tmp_path / "run")  # predicts the whole image as one cell
    store = open_store(trainer_store)
    folder = tmp_path / "instances"
    folder.mkdir()
    for i, stack_id in enumerate(store.ids):
        tifffile.imwrite(folder / f"{stack_id}.tif", np.ones(store.shape(i)[1:], np.uint16))  # one cell each
    argv = ["evaluate", str(run), "--data", str(trainer_store), "--out", "ev", "--device", "cpu", "--no-log",
            "--instances-from", str(folder)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    per_stack = EVAL_STACKS_SCHEMA.validate(pd.read_csv("ev/per_stack.csv", dtype={"id": str}))
    assert (per_stack["instance_truth"] == "label images").all() and (per_stack["ap_90"] == 1.0).all()
    wrong = folder / f"{store.ids[1]}.tif"
    tifffile.imwrite(wrong, np.ones((5, 7), np.uint16))
    line = one_line_error(runner.invoke(app, argv))
    h, w = store.shape(1)[1:]
    assert f"{wrong}: label image is 5x7, stack {store.ids[1]} is {h}x{w}" in line
    (folder / f"{store.ids[0]}.tif").unlink()
    line = one_line_error(runner.invoke(app, argv))
    assert f"{folder}: no label image for stack {store.ids[0]}" in line
    nucleus = checkpoint(tmp_path / "nucleus", classes=("Background", "Nucleus"))
    line = one_line_error(runner.invoke(app, ["evaluate", str(nucleus), *argv[2:]]))
    assert "--instances-from: model" in line and "no cell class" in line
