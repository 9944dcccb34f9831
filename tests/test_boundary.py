"""The third class Boundary (issue 14): derived at ingest (`--classes background,cell,boundary`) from instance
label images or the masks' connected components, trained into a 3-class model that `predict --instances` splits
touching cells with, and per-epoch instance metrics (val_ap_50) for stores that keep their true cells."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from experiments_support import one_line_error

from cellseg.cli.main import app
from cellseg.data.boundary import boundary_band, with_boundary
from cellseg.data.store import open_store
from cellseg.engine.instance_validation import instance_metrics
from cellseg.tracking.runs import resolve_tracking_uri

runner = CliRunner()
H, W = 48, 64


def two_touching_cells(shift: int = 0) -> np.ndarray:
    """Label image: cell 1 (columns 10..29) and cell 2 (30..49) share a vertical edge; cell 3 stands alone."""
    labels = np.zeros((H, W), np.uint16)
    labels[10:30, 10 + shift:30] = 1
    labels[10:30, 30:50 - shift] = 2
    labels[36:44, 54:62] = 3
    return labels


def write_folder(root: Path, n: int = 4, instances: bool = True, labels=two_touching_cells) -> Path:
    """n stacks (2 channels: the cells bright on a dim background), binary masks, codes.txt, Instances/."""
    rng = np.random.default_rng(0)
    for d in ("FullImage", "Mask_Norm", "Instances"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cells = labels(i % 3)
        image = rng.integers(0, 200, (2, H, W), dtype=np.uint16)
        image[0][cells > 0] += 3000
        image[1][cells > 0] += 1000
        image[0][boundary_band(cells)] = 100  # a dark line where cells touch, as membranes look
        tifffile.imwrite(root / "FullImage" / f"s{i}.ome.tif", image)
        Image.fromarray((cells > 0).astype(np.uint8)).save(root / "Mask_Norm" / f"s{i}.png")
        if instances:
            tifffile.imwrite(root / "Instances" / f"s{i}.tif", cells)
    if not instances:
        (root / "Instances").rmdir()
    (root / "codes.txt").write_text("Background\nCell\n")
    return root


def ingest(*args) -> object:
    return runner.invoke(app, ["data", "ingest", *map(str, args)])


# --- which pixels are Boundary -------------------------------------------------------------------------


def test_the_band_lies_between_touching_cells_only():
    labels = two_touching_cells()
    band = boundary_band(labels)
    # touching: one pixel on each side of the shared edge, over the whole contact
    assert band[10:30, 29:31].all() and band[10:30, 29:31].sum() == band[10:30, 10:50].sum() == 40
    assert not band[:, :29].any() and not band[36:44].any()  # free edges and the lone cell: no band
    mask = with_boundary(labels)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
    assert ((mask > 0) == (labels > 0)).all()  # the band takes no background here
    # one background pixel between two cells: that pixel and one cell's edge; three pixels: nothing
    gap = np.zeros((12, 20), np.uint16)
    gap[2:10, 2:8], gap[2:10, 9:15] = 1, 2
    g = boundary_band(gap)
    assert g[3:9, 8].all() and g[3:9, 7:10].sum() == 12 and not g[:, :7].any() and not g[:, 10:].any()
    wide = np.zeros((12, 20), np.uint16)
    wide[2:10, 2:8], wide[2:10, 11:17] = 1, 2
    assert not boundary_band(wide).any() and not boundary_band(np.zeros((5, 5), np.uint16)).any()
    # cells touching at the image edge: the band reaches the edge, so their interiors stay apart
    edge = np.zeros((8, 10), np.uint16)
    edge[0:8, 0:5], edge[0:8, 5:10] = 1, 2
    assert boundary_band(edge)[:, 4:6].all() and boundary_band(edge).sum() == 16


# --- ingest --classes ------------------------------------------------------------------------------------


def test_ingest_derives_the_boundary_from_label_images_and_keeps_them(tmp_path):
    root = write_folder(tmp_path / "in")
    result = ingest(root, "--out", tmp_path / "b.zarr", "--classes", "background,cell,boundary")
    assert result.exit_code == 0, result.output
    assert "classes Background, Cell, Boundary; cells kept as instances (label images)" in result.output
    store = open_store(tmp_path / "b.zarr")
    assert store.classes == ["Background", "Cell", "Boundary"] and store.instances == "label images"
    mask, cells = store.read_mask(0), store.read_instances(0)
    assert (mask[10:30, 29:31] == 2).all() and (mask[10:30, 11:28] == 1).all() and mask[0, 0] == 0
    assert cells.dtype == np.uint16 and np.array_equal(cells, two_touching_cells(0))
    assert store.verify(deep=True) == []
    info = runner.invoke(app, ["data", "info", str(tmp_path / "b.zarr")])
    assert "classes       Background, Cell, Boundary" in info.output and "instances     label images" in info.output
    chunk = tmp_path / "b.zarr" / "stacks" / "00000" / "instances" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # damage the label image: verify finds it, ingest repairs it
    damage = f"instances chunk c/0/0 has 100 bytes, expected {2 * H * W}"
    assert open_store(tmp_path / "b.zarr").verify() == [("s0", damage)]
    repaired = ingest(root, "--out", tmp_path / "b.zarr", "--classes", "background,cell,boundary")
    assert "rewrote the damaged store: stack s0" in repaired.output
    assert np.array_equal(open_store(tmp_path / "b.zarr").read_instances(0), two_touching_cells(0))
    # the default keeps codes.txt's classes, and still keeps the label images (for val_ap_50)
    plain = ingest(root, "--out", tmp_path / "p.zarr")
    assert plain.exit_code == 0, plain.output
    store = open_store(tmp_path / "p.zarr")
    assert store.classes == ["Background", "Cell"] and store.instances == "label images"
    assert set(np.unique(store.read_mask(0))) == {0, 1}
    # the option is part of what the store was built from: asking again rewrites, asking the same reuses
    again = ingest(root, "--out", tmp_path / "p.zarr", "--classes", "background,cell,boundary")
    assert "not rewritten" not in again.output and open_store(tmp_path / "p.zarr").classes[-1] == "Boundary"
    same = ingest(root, "--out", tmp_path / "p.zarr", "--classes", "Background,Cell,Boundary")
    assert "store up to date (same sources), not rewritten" in same.output


def test_without_label_images_the_cells_are_the_masks_connected_components(tmp_path):
    def apart(shift: int) -> np.ndarray:  # two cells one background pixel apart: separate components
        labels = np.zeros((H, W), np.uint16)
        labels[10:30, 10:29], labels[10:30, 30:50] = 1, 2
        return labels

    root = write_folder(tmp_path / "in", instances=False, labels=apart)
    result = ingest(root, "--out", tmp_path / "c.zarr", "--classes", "background,cell,boundary")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "c.zarr")
    assert store.instances == "connected components"
    mask = store.read_mask(0)
    assert (mask[11:29, 29] == 2).all()  # the background pixel between them is Boundary
    assert store.read_instances(0).max() == 2
    # a binary mask folder without label images, ingested plainly: no instances kept (as before)
    plain = ingest(root, "--out", tmp_path / "plain.zarr")
    assert plain.exit_code == 0 and open_store(tmp_path / "plain.zarr").instances is None


def test_bad_classes_and_instances_are_one_line(tmp_path):
    root = write_folder(tmp_path / "in")
    line = one_line_error(ingest(root, "--out", tmp_path / "x.zarr", "--classes", "background,cell,nucleus"))
    assert "--classes background,cell,nucleus: unknown class 'nucleus' (known: background, cell, boundary)" in line
    line = one_line_error(ingest(root, "--out", tmp_path / "x.zarr", "--classes", "cell,background"))
    assert "--classes cell,background: expected background,cell or background,cell,boundary" in line
    # touching cells in binary masks without label images: one component each, nothing tells them apart
    merged = write_folder(tmp_path / "merged", instances=False)
    line = one_line_error(ingest(merged, "--out", tmp_path / "x.zarr", "--classes", "background,cell,boundary"))
    assert "--classes background,cell,boundary: no two cells touch in Mask_Norm/" in line
    assert "cannot be told apart" in line and "Instances/NAME.tif" in line
    assert not (tmp_path / "x.zarr").exists()
    # masks with other classes than background/cell
    (merged / "codes.txt").write_text("Background\nNucleus\n")
    line = one_line_error(ingest(merged, "--out", tmp_path / "x.zarr", "--classes", "background,cell,boundary"))
    assert "--classes background,cell,boundary:" in line and "lists Background, Nucleus" in line
    # a label image of another size, or other cells than its mask: the file is named
    tifffile.imwrite(root / "Instances" / "s1.tif", np.zeros((5, 7), np.uint16))
    line = one_line_error(ingest(root, "--out", tmp_path / "x.zarr"))
    assert "Instances/s1.tif" in line and "label image is 5x7 (HxW) but its stack is 48x64" in line
    moved = two_touching_cells(1)  # s1's cells
    moved[0:2, 0:2] = 9
    tifffile.imwrite(root / "Instances" / "s1.tif", moved)
    line = one_line_error(ingest(root, "--out", tmp_path / "x.zarr"))
    assert "Instances/s1.tif" in line and "disagree at 4 pixels" in line
    (root / "Instances" / "s1.tif").unlink()
    line = one_line_error(ingest(root, "--out", tmp_path / "x.zarr"))
    assert "FullImage/s1.ome.tif" in line and "no label image (expected Instances/s1.tif" in line
    assert "--classes" in runner.invoke(app, ["data", "ingest", "--help"]).output


# --- training, validation, prediction -----------------------------------------------------------------------


def test_a_boundary_store_trains_a_three_class_model_that_predict_splits_cells_with(tmp_path, mlflow_db,
                                                                                   monkeypatch):
    root = write_folder(tmp_path / "in", n=5)
    assert ingest(root, "--out", "b.zarr", "--classes", "background,cell,boundary").exit_code == 0
    Path("tiny.yaml").write_text("model:\n  encoder: test_resnet\n")
    result = runner.invoke(app, ["train", "--data", "b.zarr", "--codes", "0,1", "--config", "tiny.yaml",
                                 "--size", "64", "--batch-size", "2", "--epochs-frozen", "0", "--epochs", "1",
                                 "--device", "cpu", "--run-dir", "run", "--no-register"])
    assert result.exit_code == 0, result.output
    # num_classes and the cross-entropy weights followed the store (no config named 3 classes)
    checkpoint = torch.load("run/checkpoint_last.pt", weights_only=False)
    assert checkpoint["metadata"]["classes"] == ["Background", "Cell", "Boundary"]
    assert checkpoint["metadata"]["num_classes"] == 3 and checkpoint["config"]["train"]["ce_weights"] == [1, 1, 1]
    # the store keeps label images: every epoch reports cellpose's AP@0.5 on the validation stacks
    (record,) = json.loads(Path("run/metrics.json").read_text())
    assert 0.0 <= record["val_ap_50"] <= 1.0
    mlflow.set_tracking_uri(resolve_tracking_uri(mlflow_db))
    (logged,) = mlflow.search_runs(experiment_names=["cellseg"], output_format="list")
    assert logged.data.metrics["val_ap_50"] == record["val_ap_50"]

    from cellseg.inference import predict as predict_module

    seen = []
    real = predict_module.instances_from_probabilities

    def spy(probs, cell=1, diameter=30.0, boundary=None):
        seen.append((probs.shape[0], cell, boundary))
        return real(probs, cell, diameter, boundary)

    monkeypatch.setattr(predict_module, "instances_from_probabilities", spy)
    result = runner.invoke(app, ["predict", "run", str(root / "FullImage" / "s0.ome.tif"), "--out", "out",
                                 "--device", "cpu", "--instances"])
    assert result.exit_code == 0, result.output
    assert seen == [(3, 1, 2)]  # three classes in, the Boundary class (index 2) used to split cells
    assert tifffile.imread("out/labels/s0.ome.tif").shape == (H, W)


def test_stores_without_instances_add_no_instance_metric(tmp_path):
    root = write_folder(tmp_path / "in", n=2, instances=False)
    assert ingest(root, "--out", "plain.zarr").exit_code == 0
    assert instance_metrics(SimpleNamespace(store=open_store("plain.zarr"))) == {}
