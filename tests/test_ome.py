"""Outputs others open (issue 14, item 4): label images as OME-TIFF, predictions of a store as OME-Zarr
(NGFF 0.5), checked with the validators of ome-zarr-models and read back with ome-zarr-py, napari's reader."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr_models.v05 import Image, ImageLabel
from test_instances import checkpoint, runner

from cellseg.cli.main import app
from cellseg.data.store import open_store
from cellseg.inference.instances import write_labels
from cellseg.inference.ome import write_ome_zarr


def napari_layers(path) -> list:
    """What napari-ome-zarr would show for ``path``: ome-zarr-py's nodes (its reader) and their arrays."""
    return list(Reader(parse_url(str(path)))())


def check_ngff(image_path, shape, channels: int, pixel_size: float | None):
    """``image_path`` is a valid NGFF 0.5 image with one channel axis and a valid ``labels/cells`` label
    image of ``shape``; returns the labels as read by ome-zarr-py."""
    image = Image.from_zarr(zarr.open_group(image_path, mode="r"))  # raises on invalid metadata
    assert image.labels.label_paths == ["cells"]
    cells = ImageLabel.from_zarr(zarr.open_group(image_path / "labels" / "cells", mode="r"))
    scale = cells.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert list(scale) == [pixel_size or 1.0] * 2
    assert [a.unit for a in cells.ome_attributes.multiscales[0].axes] == ["micrometer" if pixel_size else None] * 2
    nodes = napari_layers(image_path)
    assert [n.data[0].shape for n in nodes if n.data] == [(channels, *shape), shape]
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    return np.asarray(label_node.data[0])


@pytest.mark.parametrize("pixel_size", [0.25, None])
def test_label_images_are_ome_tiff_with_their_pixel_size(tmp_path, pixel_size):
    ids = np.arange(70_000, dtype=np.int64).reshape(280, 250)
    write_labels(tmp_path / "a.ome.tif", ids, pixel_size)
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "YX"
        assert tif.asarray().dtype == np.uint32 and np.array_equal(tif.asarray(), ids)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels.get("PhysicalSizeX") == pixel_size and pixels.get("PhysicalSizeY") == pixel_size
    if pixel_size:
        assert pixels["PhysicalSizeXUnit"] == "µm"


def test_ome_zarr_is_valid_ngff_and_napari_reads_image_and_cells(tmp_path):
    rng = np.random.default_rng(0)
    channels = rng.integers(0, 4000, (3, 40, 50), dtype=np.uint16)
    labels = np.arange(2000).reshape(40, 50) % 7
    path = write_ome_zarr(tmp_path / "labels.zarr", "a", channels, ["m", "n", "o"], labels, 0.5)
    assert np.array_equal(check_ngff(path, (40, 50), 3, 0.5), labels)
    assert zarr.open_array(path / "0", mode="r")[...].tolist() == channels.tolist()
    assert [c["label"] for c in zarr.open_group(path, mode="r").attrs["ome"]["omero"]["channels"]] == ["m", "n", "o"]
    nested = write_ome_zarr(tmp_path / "labels.zarr", "sub/b", channels[:, :30, :20], ["m", "n", "o"],
                            np.ones((30, 20), int))  # a store id with '/': groups nest, sizes differ
    assert np.array_equal(check_ngff(nested, (30, 20), 3, None), np.ones((30, 20)))
    write_ome_zarr(tmp_path / "labels.zarr", "a", channels[:, :10, :10], ["m", "n", "o"], labels[:10, :10])
    assert check_ngff(path, (10, 10), 3, None).shape == (10, 10)  # written again: replaced, still valid


def test_predict_instances_on_a_store_writes_an_ome_zarr(tmp_path, trainer_store):
    run = checkpoint(tmp_path / "run")
    result = runner.invoke(app, ["predict", str(run), str(trainer_store), "--out", "out", "--device", "cpu",
                                 "--instances", "--pixel-size", "0.5"])
    assert result.exit_code == 0, result.output
    store = open_store(trainer_store)
    for i, stack_id in enumerate(store.ids):
        shape = store.shape(i)[1:]
        labels = check_ngff(tmp_path / "out" / "labels.zarr" / stack_id, shape, 3, 0.5)
        assert (labels == 1).all()  # the checkpoint calls every pixel cell: one cell
        assert np.array_equal(tifffile.imread(f"out/labels/{stack_id}.ome.tif"), labels)
        read = zarr.open_array(tmp_path / "out" / "labels.zarr" / stack_id / "0", mode="r")[...]
        assert np.array_equal(read, store.read_image(i, [0, 3, 6]))  # the channels the model read


def test_predict_instances_on_tiffs_writes_no_ome_zarr(tmp_path):
    run = checkpoint(tmp_path / "run")
    tifffile.imwrite(tmp_path / "s.tif", np.ones((16, 40, 40), np.uint16))
    result = runner.invoke(app, ["predict", str(run), str(tmp_path / "s.tif"), "--out", "out", "--device", "cpu",
                                 "--instances"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "labels" / "s.ome.tif").is_file() and not (tmp_path / "out" / "labels.zarr").exists()


def test_every_stack_of_an_ingested_store_is_a_valid_ome_zarr_image(tmp_path):
    """The store's own stack groups carry NGFF 0.5 multiscales metadata: napari's reader opens them as they are."""
    from cellseg.data.layouts import load_layout
    from cellseg.data.store import StackRecord, write_store

    rng = np.random.default_rng(0)
    records = [StackRecord(id=f"s{i}", image=rng.integers(0, 4000, (16, 20 + i, 24), dtype=np.uint16),
                           mask=np.zeros((20 + i, 24), np.uint8), source=f"s{i}.tif") for i in range(2)]
    path = write_store(tmp_path / "s.zarr", records, load_layout("trainer"), ["Background", "Cell"])
    store = open_store(path)
    for i in range(2):
        group = path / "stacks" / f"{i:05d}"
        Image.from_zarr(zarr.open_group(group, mode="r"))  # raises on invalid metadata
        nodes = list(Reader(parse_url(group))())
        np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), store.read_image(i))
