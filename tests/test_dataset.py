"""Per-sample dataset, split and batch sources: values against numpy, reproducibility, and the
resident and streaming paths building the same batches; plus the ``codes`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.batches import make_batch_source, resident_bytes
from cellseg.data.codes import resolve_codes
from cellseg.data.dataset import open_dataset
from cellseg.data.geometry import Geometry, resize_labels, resize_planes
from cellseg.data.intensity import Normalisation
from cellseg.data.layouts import load_layout
from cellseg.data.split import Split, make_split
from cellseg.data.store import StackRecord, open_store, write_store
from cellseg.errors import BadInputError, ConfigError

TRAINER = load_layout("trainer")
SHAPES = [(20, 24), (24, 20), (16, 16), (28, 22), (18, 30), (22, 22), (26, 18)]
STACK16 = Geometry("stack", 16)  # whole stacks fitted into 16 x 16
CROP16 = Geometry("none", 16)  # native pixels, random 16 x 16 crops
GEOMETRIES = pytest.mark.parametrize("geometry", [STACK16, CROP16], ids=["stack", "crop"])


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Seven `trainer` stacks of different sizes with known pixels; stack 2 has an all-zero channel 3."""
    rng = np.random.default_rng(0)
    records = []
    for n, (h, w) in enumerate(SHAPES):
        image = rng.integers(0, 4000 * (n + 1), (16, h, w), dtype=np.uint16)
        if n == 2:
            image[3] = 0
        mask = (rng.random((h, w)) > 0.6).astype(np.uint8) if n != 5 else np.zeros((h, w), np.uint8)
        sid = f"plate{n % 2}/cell_{n:02d}"
        records.append(StackRecord(id=sid, image=image, mask=mask, source=f"FullImage/{sid}.ome.tif"))
    out = tmp_path_factory.mktemp("stores") / "known.zarr"
    return write_store(out, records, TRAINER, ["Background", "Cell"])


def _expected(store, index: int, channels: list[int]) -> np.ndarray:
    raw = store.read_image(index).astype(np.float64)[channels]
    maxima = raw.reshape(len(channels), -1).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(maxima[:, None, None] > 0, raw / maxima[:, None, None], 0.0)


def test_dataset_sample_matches_numpy(store_path):
    ds = open_dataset(store_path, [100, 3, 12, 110], normalisation=Normalisation("max"))
    store = open_store(store_path)
    assert len(ds) == 7
    for index in (0, 2, 4):
        x, y = ds[index]
        h, w = SHAPES[index]
        assert x.dtype == torch.float32 and x.shape == (4, h, w)
        assert y.dtype == torch.int64 and y.shape == (h, w)
        norm = _expected(store, index, [0, 3, 6, 12])
        np.testing.assert_allclose(x[0].numpy(), norm[[0, 1, 2]].mean(axis=0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(x[1].numpy(), norm[1], rtol=1e-6)
        np.testing.assert_allclose(x[2].numpy(), norm[3], rtol=1e-6)
        assert not x[3].any()
        np.testing.assert_array_equal(y.numpy(), store.read_mask(index))
    assert torch.isfinite(ds[2][0]).all() and not ds[2][0][1].any()  # all-zero channel stays zero


def test_dataset_reads_only_the_channels_its_draw_uses(store_path, monkeypatch):
    """brightfield = [101, 12, 102]: one of 9-11, channel 12, one of 13-15; dropped channels not at all."""
    ds = open_dataset(store_path, "brightfield")
    assert ds.plan.needed_channels == [9, 10, 11, 12, 13, 14, 15]
    seen = []
    original = ds.store.read_image

    def spy(store):
        monkeypatch.setattr(store, "read_image", lambda i, channels=None: seen.append(list(channels)) or original(i, channels))

    spy(ds.store)
    ds[1]
    low, mid, high = seen[0]
    assert low in (9, 10, 11) and mid == 12 and high in (13, 14, 15)
    seen.clear()
    dropped = open_dataset(store_path, [203, 212], channel_dropout=1.0)
    spy(dropped.store)
    assert not dropped[1][0].any() and seen == [[3]]  # all black: one channel read for the size


def test_dataset_size_subset_and_epochs(store_path):
    ds = open_dataset(store_path, [107, 111, 212], seed=3, indices=[1, 4], geometry=Geometry("stack", 12, keep_aspect=False))
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and y.shape == (12, 12) and len(ds) == 2
    np.testing.assert_array_equal(ds[0][0], x)  # same epoch, same draw
    draws = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.append(ds[0][0])
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    other_seed = open_dataset(store_path, [107, 111, 212], seed=4, indices=[1, 4], geometry=Geometry("stack", 12))
    assert any(not torch.equal(other_seed[0][0], ds[0][0]) for _ in range(1))


def test_dataset_unknown_code_fails_before_reading(store_path):
    with pytest.raises(ConfigError, match="unknown loading code 55"):
        open_dataset(store_path, [0, 55])
    external_plan = resolve_codes([0], load_layout("external"))
    with pytest.raises(ConfigError, match="resolved for layout 'external'"):
        open_dataset(store_path, external_plan)


def test_resize_keeps_dtype_range_and_classes():
    raw = np.random.default_rng(0).integers(0, 65535, (2, 30, 20), dtype=np.uint16)
    small = resize_planes(raw, (10, 10))
    assert small.dtype == np.uint16 and small.shape == (2, 10, 10) and small.max() <= raw.max()
    assert resize_planes(raw.astype(np.float32), (10, 10)).dtype == np.float32
    mask = np.zeros((30, 20), np.uint8)
    mask[5:25, 4:16] = 1
    assert set(np.unique(resize_labels(mask, (10, 10)))) == {0, 1}
    assert resize_planes(raw, (30, 20)) is raw


def test_split_is_seeded_disjoint_and_saved(store_path, tmp_path):
    store = open_store(store_path)
    split = make_split(store, 0.2, seed=0)
    assert sorted(split.train + split.val) == sorted(store.ids)
    assert not set(split.train) & set(split.val) and len(split.val) == 1
    assert make_split(store, 0.2, seed=0) == split
    assert {tuple(make_split(store, 0.3, seed=s).val) for s in range(10)} != {tuple(split.val)}
    path = split.save(tmp_path / "split.json")
    assert Split.load(path) == split and json.loads(path.read_text())["seed"] == 0
    train, val = split.indices(store)
    assert sorted(train + val) == list(range(7))
    with pytest.raises(BadInputError, match="no stack with id 'gone'"):
        Split(train=["gone"], val=[]).indices(store)
    (tmp_path / "bad.json").write_text('{"train": ["a"], "val": ["a"]}')
    with pytest.raises(BadInputError, match="bad.json: invalid split"):
        Split.load(tmp_path / "bad.json")


@GEOMETRIES
@pytest.mark.parametrize("residency", ["ram", "device", "stream"])
def test_batch_source_shapes_and_determinism(store_path, residency, geometry):
    plan = resolve_codes([107, 111, 212], TRAINER)
    source = make_batch_source(store_path, [0, 1, 2, 3, 4, 6], plan, geometry, batch_size=4, device="cpu",
                               residency=residency, seed=1)
    assert len(source) == 2
    batches = list(source.epoch(0))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape[1:] == (16, 16) for x, y in batches)
    again = list(source.epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(batches, source.epoch(1)))
    dropped = make_batch_source(store_path, [0, 1, 2, 3, 4, 6], plan, geometry, 4, "cpu", residency, drop_last=True)
    assert len(dropped) == 1 and len(list(dropped.epoch(0))) == 1


@GEOMETRIES
@pytest.mark.parametrize("method", ["max", "percentile"])
def test_resident_and_streaming_batches_are_identical(store_path, geometry, method):
    """Same view, crop, normalisation and per-sample draws: equal batches, random codes included."""
    norm = Normalisation(method)
    for codes, workers, epoch in (([0, 100, 12], 0, 0), ([107, 111, 212], 0, 1), ([107, 111, 212], 2, 2)):
        plan = resolve_codes(codes, TRAINER)
        ram = make_batch_source(store_path, range(7), plan, geometry, 3, "cpu", "ram", seed=5, normalisation=norm)
        stream = make_batch_source(store_path, range(7), plan, geometry, 3, "cpu", "stream", seed=5,
                                   num_workers=workers, normalisation=norm)
        for (xa, ya), (xb, yb) in zip(ram.epoch(epoch), stream.epoch(epoch), strict=True):
            torch.testing.assert_close(xa, xb, rtol=0, atol=0)
            assert torch.equal(ya, yb)


@GEOMETRIES
def test_resident_batches_match_the_dataset(store_path, geometry):
    plan = resolve_codes([107, 111, 212], TRAINER)
    ds = open_dataset(store_path, plan, seed=2, geometry=geometry)
    source = make_batch_source(store_path, range(7), plan, geometry, 7, "cpu", "ram", seed=2, shuffle=False)
    ds.set_epoch(3)
    x, y = next(iter(source.epoch(3)))
    for i in range(7):
        xi, yi = ds[i]
        torch.testing.assert_close(x[i], xi, rtol=0, atol=0)
        assert torch.equal(y[i], yi)


def test_auto_residency_and_errors(store_path):
    plan = resolve_codes("fluorescence", TRAINER)
    source = make_batch_source(store_path, range(7), plan, STACK16, 2, "cpu")
    assert source.residency == "ram"
    store = open_store(store_path)
    assert resident_bytes(store, range(7), 3, STACK16) == 7 * 16 * 16 * 7
    native = sum(h * w for h, w in SHAPES)  # the 16 x 16 stack needs no padding
    assert resident_bytes(store, range(7), 3, CROP16) == native * 7
    with pytest.raises(ConfigError, match="residency"):
        make_batch_source(store_path, range(7), plan, STACK16, 2, "cpu", residency="disk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("residency", ["ram", "device", "stream"])
def test_batches_on_cuda_match_cpu(store_path, residency):
    plan = resolve_codes([107, 111, 212], TRAINER)
    cpu = make_batch_source(store_path, range(7), plan, CROP16, 4, "cpu", "ram", seed=1)
    gpu = make_batch_source(store_path, range(7), plan, CROP16, 4, "cuda", residency, seed=1)
    assert gpu.residency == residency
    for (xa, ya), (xb, yb) in zip(cpu.epoch(0), gpu.epoch(0), strict=True):
        assert xb.device.type == "cuda" and yb.device.type == "cuda"
        torch.testing.assert_close(xb.cpu(), xa)
        assert torch.equal(yb.cpu(), ya)


@pytest.mark.parametrize(
    ("layout", "strategy"),
    [("trainer", "merge_brightfield"), ("test", "brightfield"), ("external", "ext_merge_brightfield")],
)
def test_synth_ingest_dataset_round_trip(tmp_path, layout, strategy):
    from cellseg import data
    from cellseg.data.ingest import ingest
    from cellseg.data.synth import synthesize

    synthesize(tmp_path / "raw", layout=layout, cells=1, negatives=1, size=48, seed=0)
    ingest(tmp_path / "raw", tmp_path / "store.zarr", layout=layout)
    ds = data.open_dataset(tmp_path / "store.zarr", strategy, geometry=Geometry("stack", 32))
    assert len(ds) == 2
    for i in range(2):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
        assert set(torch.unique(y).tolist()) <= {0, 1}
    assert {int(ds[i][1].sum() > 0) for i in range(2)} == {0, 1}  # one cell stack, one negative control


# --- CLI ------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_codes_list():
    result = runner.invoke(app, ["codes", "list"])
    assert result.exit_code == 0 and "111" in result.output and "merge_brightfield" in result.output
    result = runner.invoke(app, ["codes", "list", "--json", "--layout", "external"])
    data = json.loads(result.output)
    by_code = {row["code"]: row for row in data["codes"]}
    assert by_code[121]["resolved"] == ["cyto", "nucleus"] and by_code[100]["resolved"] is None
    assert {s["name"] for s in data["strategies"]} >= {"ext_brightfield", "all_black"}
    assert "fluorescence" not in {s["name"] for s in data["strategies"]}


def test_cli_codes_render_writes_what_the_dataset_builds(store_path, tmp_path):
    out = tmp_path / "x.npy"
    result = runner.invoke(app, ["codes", "render", str(store_path), "plate0/cell_04", "--codes", "100,12,103",
                                 "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    x = np.load(out)
    assert x.dtype == np.float32 and x.shape == (3, *SHAPES[4])
    # by hand (numpy): the default normalisation maps each channel's 1st-99.8th percentile to 0-1, clipped;
    # 100 = mean of channels 0, 3, 6; 12 = channel 12; 103 = one of the brightfield channels 9-15
    raw = open_store(store_path).read_image(4).astype(np.float64)
    lo, hi = np.percentile(raw.reshape(16, -1), [1.0, 99.8], axis=1)
    norm = np.clip((raw - lo[:, None, None]) / (hi - lo)[:, None, None], 0.0, 1.0)
    np.testing.assert_allclose(x[0], norm[[0, 3, 6]].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x[1], norm[12], rtol=1e-5, atol=1e-6)
    assert sum(np.allclose(x[2], norm[c], rtol=1e-5, atol=1e-6) for c in range(9, 16)) == 1
    result = runner.invoke(app, ["codes", "render", str(store_path), "plate0/cell_04", "--strategy", "fluorescence",
                                 "--out", str(out)])
    assert result.exit_code == 0 and np.load(out).shape == (3, *SHAPES[4])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plate0/nope", "--codes", "0"], "no stack with id 'plate0/nope'"),
        (["plate0/cell_00", "--codes", "0,55"], "unknown loading code 55"),
        (["plate0/cell_00", "--codes", "0,x"], "codes '0,x'"),
        (["plate0/cell_00"], "exactly one of --codes and --strategy"),
    ],
)
def test_cli_codes_render_errors_are_one_line(store_path, tmp_path, args, message):
    out = tmp_path / "x.npy"
    result = runner.invoke(app, ["codes", "render", str(store_path), *args, "--out", str(out)])
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()
