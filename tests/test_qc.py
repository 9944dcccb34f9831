"""`cellseg data qc`: the channel statistics, the synthetic physics calibrated with them against the
paper's own planes, the command's table/CSV/figure/MLflow run and its bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.layouts import indexed_layout, load_layout
from cellseg.data.qc import Regions, plane_statistics, stack_statistics
from cellseg.data.schemas import QC_SCHEMA, read_csv
from cellseg.data.store import StackRecord, write_store
from cellseg.data.synth import render_stack
from cellseg.data.synth_optics import PAPER_PLANES

FIGURE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "images" / "dataloader.png"
BRIGHTFIELD = ["bf_m10", "bf_m5", "bf_m3", "bf_0", "bf_p3", "bf_p5", "bf_p10"]


def _disc(shape=(40, 40), radius=12) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < radius**2).astype(np.uint8)


def test_statistics_of_a_hand_made_plane():
    """A cell of 150 on a background of 100: contrast 0.5 everywhere inside, Otsu finds it exactly."""
    mask = _disc()
    plane = np.where(mask > 0, 150, 100).astype(np.uint16)
    stats = plane_statistics(plane, Regions.of(mask))
    assert stats["interior_contrast"] == pytest.approx(0.5)
    assert stats["edge_contrast"] == pytest.approx(0.5)
    assert stats["otsu_dice"] == pytest.approx(1.0)
    assert stats["floor"] == pytest.approx(1 - mask.mean())  # the background is the minimum
    assert stats["saturated"] == 0.0
    dark = plane_statistics((250 - plane).astype(np.uint16), Regions.of(mask))  # darker cells count too
    assert dark["otsu_dice"] == pytest.approx(1.0)


def test_constant_plane_has_no_statistics_but_saturation():
    mask = _disc()
    stats = plane_statistics(np.full(mask.shape, 65535, np.uint16), Regions.of(mask))
    assert np.isnan(stats["otsu_dice"]) and np.isnan(stats["interior_contrast"])
    assert stats["saturated"] == 1.0


@pytest.fixture(scope="module")
def synthetic_medians() -> pd.DataFrame:
    """Median statistics of 8 synthetic trainer cell stacks at 96 px (the default pipeline's size)."""
    layout = load_layout("trainer")
    frames = []
    for index in range(8):
        image, mask, _ = render_stack(layout, 96, seed=0, kind="cell", index=index)
        assert image.min() > 0 and image.max() < 65535  # nothing clipped
        frames.append(stack_statistics(image, mask, layout.channel_names))
    return pd.concat(frames).groupby("channel").median()


def test_synthetic_brightfield_is_like_the_papers(synthetic_medians):
    """The paper's planes (PAPER_PLANES): faint interiors (<= 0.054), edge halos 0.08-0.19 weakest in
    focus, a threshold gets nowhere (Otsu Dice <= 0.23). The synthetic planes must fall in that regime."""
    bf = synthetic_medians.loc[BRIGHTFIELD]
    assert (bf["interior_contrast"] <= 0.15).all()
    assert bf.loc[["bf_m10", "bf_p10"], "edge_contrast"].between(0.04, 0.4).all()
    assert bf["edge_contrast"].idxmin() == "bf_0"
    assert (bf["otsu_dice"] <= 0.6).all()
    assert (bf["floor"] < 0.01).all()


def test_synthetic_fluorescence_stays_thresholdable_and_ordered_like_the_papers(synthetic_medians):
    fl = synthetic_medians["otsu_dice"]
    assert fl["cyto_total"] >= 0.6
    assert fl["cyto_total"] > fl["memb_total"] > fl["mito_total"]  # paper: 0.91 > 0.68 > 0.31
    assert fl["mito_total"] < 0.5


@pytest.mark.skipif(not FIGURE.is_file(), reason=f"{FIGURE} (the seed's figure) is not beside the repo")
def test_paper_planes_are_measured_from_the_figure():
    """PAPER_PLANES recomputed from Figure 1c as synth_optics' docstring describes."""
    from PIL import Image
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    figure = np.asarray(Image.open(FIGURE).convert("RGB"))
    tiles = [figure[2060:2296, x + 4:x + 201] for x in (203, 437, 672, 913, 1148, 1383, 1618, 1853, 2088, 2323)]
    red = tiles[0][..., 0].astype(float)
    mask = ndimage.binary_fill_holes(red > threshold_otsu(red))
    parts, n = ndimage.label(mask)
    mask = parts == 1 + np.argmax(ndimage.sum(mask, parts, range(1, n + 1)))
    regions = Regions.of(mask)
    for (name, expected), tile in zip(PAPER_PLANES.items(), tiles):
        colour = {"cytoplasm": 0, "membrane": 1, "mitochondria": 2}.get(name)
        plane = tile[..., colour] if colour is not None else np.round(tile.astype(float).mean(-1)).astype(np.uint8)
        stats = plane_statistics(plane, regions)
        measured = (stats["interior_contrast"], stats["edge_contrast"], stats["otsu_dice"])
        assert measured == pytest.approx(expected, abs=0.001), name


def _store(path: Path, planes: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    layout = indexed_layout(planes[0].shape[0])
    records = [StackRecord(id=f"s{i}", image=p, mask=m, source=f"s{i}.tif") for i, (p, m) in enumerate(zip(planes, masks))]
    write_store(path, records, layout, ["Background", "Cell"])
    return path


def _bright_cell(mask: np.ndarray, constant_second: bool = False) -> np.ndarray:
    rng = np.random.default_rng(0)
    cell = np.where(mask > 0, 400, 100) + rng.integers(0, 20, mask.shape)
    second = np.full(mask.shape, 7) if constant_second else 500 - cell
    return np.stack([cell, second]).astype(np.uint16)


def test_cli_writes_table_csv_and_figure_and_compares(tmp_path):
    mask = _disc()
    one = _store(tmp_path / "one.zarr", [_bright_cell(mask)], [mask])  # a store with one stack works
    other = _store(tmp_path / "other.zarr", [_bright_cell(mask, constant_second=True)] * 2, [mask] * 2)
    result = CliRunner().invoke(app, ["data", "qc", str(one), "--compare", str(other), "--out", str(tmp_path / "qc")])
    assert result.exit_code == 0, result.output
    assert "| one.zarr | 0 |" in result.output and "| other.zarr | 1 | constant channel |" in result.output
    table = read_csv(tmp_path / "qc" / "qc.csv", QC_SCHEMA)
    assert list(table["store"]) == ["one.zarr", "other.zarr", "one.zarr", "other.zarr"]  # channel by channel
    assert table.set_index(["store", "channel"]).loc[("one.zarr", "0"), "otsu_dice"] == pytest.approx(1.0)
    assert list(table["stacks"]) == [1, 2, 1, 2]
    assert (tmp_path / "qc" / "qc.png").stat().st_size > 0


def test_cli_logs_to_mlflow_when_asked(tmp_path, mlflow_db):
    import mlflow

    mask = _disc()
    store = _store(tmp_path / "one.zarr", [_bright_cell(mask)], [mask])
    result = CliRunner().invoke(app, ["data", "qc", str(store), "--out", str(tmp_path / "qc"), "--log"])
    assert result.exit_code == 0, result.output
    run = mlflow.MlflowClient(tracking_uri=mlflow_db).get_run(result.output.strip().split()[-1])
    assert run.data.metrics["one.zarr.0.otsu_dice"] == pytest.approx(1.0)
    assert run.data.tags["cellseg.kind"] == "qc"


@pytest.mark.parametrize("case", ["not a store", "no cells"])
def test_cli_bad_input_is_one_line(tmp_path, case):
    if case == "not a store":
        target = tmp_path / "folder"
        target.mkdir()
        expected = str(target)
    else:
        target = _store(tmp_path / "empty.zarr", [_bright_cell(_disc())], [np.zeros((40, 40), np.uint8)])
        expected = "no stack with cells"
    result = CliRunner().invoke(app, ["data", "qc", str(target), "--out", str(tmp_path / "qc")])
    assert result.exit_code != 0
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "qc" / "qc.csv").exists()
