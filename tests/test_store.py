"""The Zarr store: writer/reader round trip, channel-selective reads, validation of what is opened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from zarr.storage import LocalStore

from cellseg.data.layouts import indexed_layout, load_layout
from cellseg.data.schemas import MANIFEST_SCHEMA, validate
from cellseg.data.store import StackRecord, open_store, stack_hash, write_store
from cellseg.errors import BadInputError

CLASSES = ["Background", "Cell"]


def _records(n=3, c=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 20 + i, 30 - i  # stacks differ in size
        image = rng.integers(0, 5000, (c, h, w), dtype=np.uint16)
        image[1] = 0  # an empty channel: maximum 0
        mask = np.zeros((h, w), np.uint8)
        if i:
            mask[5:10, 5:15] = 1
        out.append(StackRecord(f"dir/stack{i}", image, mask, source=f"FullImage/dir/stack{i}.tif"))
    return out


@pytest.fixture
def written(tmp_path):
    recs = _records()
    write_store(tmp_path / "s.zarr", recs, indexed_layout(4), CLASSES, attrs={"note": "test"})
    return tmp_path / "s.zarr", recs


def test_round_trip(written):
    path, recs = written
    store = open_store(path)
    assert len(store) == 3 and store.ids == [r.id for r in recs]
    assert store.layout.name == "indexed" and store.classes == CLASSES
    assert store.attrs["note"] == "test"
    for i, rec in enumerate(recs):
        assert store.shape(i) == rec.image.shape
        np.testing.assert_array_equal(store.read_image(i), rec.image)
        np.testing.assert_array_equal(store.read_mask(i), rec.mask)
        assert store.read_image(i).dtype == np.uint16 and store.read_mask(i).dtype == np.uint8
        assert store.index(rec.id) == i
    assert store.channel_max.dtype == np.float32 and store.channel_max.shape == (3, 4)
    np.testing.assert_array_equal(store.channel_max, [r.image.reshape(4, -1).max(axis=1) for r in recs])
    assert store.channel_max[0, 1] == 0


def test_manifest_contents(written):
    path, recs = written
    m = open_store(path).manifest
    assert list(m.columns) == ["id", "key", "source", "height", "width", "channels", "layout",
                               "negative", "foreground_fraction", "content_hash"]
    assert m["key"].tolist() == ["00000", "00001", "00002"]
    assert m["negative"].tolist() == [True, False, False]
    assert m["foreground_fraction"].iloc[1] == pytest.approx(50 / (21 * 29))
    assert m["content_hash"].tolist() == [stack_hash(r.image, r.mask) for r in recs]
    assert m["source"].iloc[2] == "FullImage/dir/stack2.tif"


def test_per_stack_attrs_and_chunking(written):
    path, recs = written
    meta = json.loads((path / "stacks/00001/zarr.json").read_text())["attributes"]
    assert meta["id"] == "dir/stack1" and meta["channel_max"] == recs[1].image.reshape(4, -1).max(axis=1).tolist()
    image_meta = json.loads((path / "stacks/00001/image/zarr.json").read_text())
    assert image_meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 21, 29]
    assert image_meta["data_type"] == "uint16"


@pytest.mark.parametrize("channels", [[2], [3, 0], [0, 2, 3]])
def test_reads_only_the_requested_channels(written, monkeypatch, channels):
    path, recs = written
    store = open_store(path)
    files: list[str] = []
    real_fromfile = np.fromfile

    def spy(file, *args, **kwargs):
        files.append(Path(file).relative_to(path).as_posix())
        return real_fromfile(file, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", spy)
    got = store.read_image(2, channels)
    np.testing.assert_array_equal(got, recs[2].image[channels])
    assert files == [f"stacks/00002/image/c/{c}/0/0" for c in channels]


def test_arrays_written_by_other_tools_are_read_through_zarr(written, monkeypatch):
    """A compressed or differently chunked array (e.g. rewritten by another tool) has no plain chunk
    files: the store reads it through zarr-python, with the same values."""
    import zarr

    path, recs = written
    for i, rec in enumerate(recs):
        group = zarr.open_group(LocalStore(path / "stacks" / f"{i:05d}"), mode="a", zarr_format=3)
        group.create_array("image", data=rec.image, chunks=(2, 8, 8), overwrite=True)  # zstd, tiled
    keys: list[str] = []
    real_get = LocalStore.get

    async def spy(self, key, *args, **kwargs):
        keys.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", spy)
    store = open_store(path)
    for i, rec in enumerate(recs):
        np.testing.assert_array_equal(store.read_image(i, [3, 0]), rec.image[[3, 0]])
        np.testing.assert_array_equal(store.read_image(i), rec.image)
    assert any("/image/c/" in k for k in keys)


def test_bad_indices(written):
    store = open_store(written[0])
    with pytest.raises(IndexError):
        store.read_image(3)
    with pytest.raises(IndexError):
        store.read_image(0, [4])
    with pytest.raises(BadInputError, match="no stack with id 'nope'"):
        store.index("nope")


def test_content_hash_identifies_the_data(tmp_path):
    layout = indexed_layout(4)
    a = write_store(tmp_path / "a.zarr", _records(), layout, CLASSES)
    b = write_store(tmp_path / "b.zarr", _records(), layout, CLASSES)
    changed = _records()
    changed[0].image[0, 0, 0] += 1
    c = write_store(tmp_path / "c.zarr", changed, layout, CLASSES)
    hashes = [open_store(p).content_hash for p in (a, b, c)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert len(hashes[0]) == 64


def test_writer_rejects_inconsistent_records(tmp_path):
    rec = _records(1)[0]
    with pytest.raises(BadInputError, match="4 channels, layout 'trainer' has 16"):
        write_store(tmp_path / "s.zarr", [rec], load_layout("trainer"), CLASSES)
    bad_mask = StackRecord("x", rec.image, np.full(rec.mask.shape, 2, np.uint8))
    with pytest.raises(BadInputError, match="mask value 2 has no class"):
        write_store(tmp_path / "s.zarr", [bad_mask], indexed_layout(4), CLASSES)
    with pytest.raises(BadInputError, match="no stacks"):
        write_store(tmp_path / "s.zarr", [], indexed_layout(4), CLASSES)
    assert not (tmp_path / "s.zarr").exists()


def test_open_rejects_missing_incomplete_and_invalid(written, tmp_path):
    path, _ = written
    with pytest.raises(BadInputError, match="store not found"):
        open_store(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadInputError, match="not a cellseg"):
        open_store(tmp_path / "plain")

    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["cellseg"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="incomplete"):
        open_store(path)
    doc["attributes"]["cellseg"]["complete"] = True
    (path / "zarr.json").write_text(json.dumps(doc))

    manifest = pd.read_csv(path / "manifest.csv", dtype=str)
    manifest.loc[0, "content_hash"] = "not-a-hash"
    manifest.to_csv(path / "manifest.csv", index=False)
    with pytest.raises(BadInputError, match=r"manifest.csv: invalid manifest table"):
        open_store(path)
    (path / "manifest.csv").unlink()
    with pytest.raises(BadInputError, match="manifest table not found"):
        open_store(path)


def test_manifest_schema_checks_negative_against_foreground():
    row = {"id": "a", "key": "00000", "source": "FullImage/a.tif", "height": 2, "width": 2, "channels": 1,
           "layout": "indexed", "negative": True, "foreground_fraction": 0.5, "content_hash": "0" * 64}
    with pytest.raises(BadInputError, match="where.csv"):
        validate(pd.DataFrame([row]), MANIFEST_SCHEMA, Path("where.csv"))
    row["negative"] = False
    assert len(validate(pd.DataFrame([row]), MANIFEST_SCHEMA, "where.csv")) == 1
