"""`cellseg data verify`: damaged chunks and arrays are named by stack id; re-ingest repairs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.store import open_store
from cellseg.errors import BadInputError

INGEST = ["data", "ingest", None, "--out", "s.zarr", "--layout", "trainer"]


@pytest.fixture
def store(synth_trainer):
    """A fresh store from the tiny synthetic dataset: Path, and the ingest arguments that rebuild it."""
    args = [str(synth_trainer) if a is None else a for a in INGEST]
    assert CliRunner().invoke(app, args).exit_code == 0
    return Path("s.zarr"), args


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error(result, *needles):
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _chunk(path: Path, sid: str, name: str = "image/c/3/0/0") -> Path:
    key = open_store(path).manifest.set_index("id").loc[sid, "key"]
    return path / "stacks" / key / name


def test_truncated_chunk_is_named_by_stack_id_and_reingest_repairs_it(store):
    path, args = store
    assert cli("data", "verify", path).output.strip() == "ok: 6 stacks (arrays and chunk sizes checked)"
    chunk = _chunk(path, "cell_0001")
    chunk.write_bytes(chunk.read_bytes()[:100])

    result = cli("data", "verify", path)
    assert "damaged stack cell_0001: image chunk c/3/0/0 has 100 bytes, expected" in result.output
    _one_error(result, "s.zarr: 1 of 6 stacks damaged (listed above)")
    stack = open_store(path).index("cell_0001")
    with pytest.raises(BadInputError, match="stack cell_0001 is damaged .image chunk c/3/0/0 has 100 bytes"):
        open_store(path).read_image(stack)  # what train and codes render now say instead of a ValueError

    repaired = cli(*args)
    assert repaired.exit_code == 0, repaired.output
    assert "rewrote the damaged store: stack cell_0001: image chunk c/3/0/0 has 100 bytes" in repaired.output
    assert cli("data", "verify", path, "--deep").exit_code == 0
    assert "up to date" in cli(*args).output


def test_deep_catches_a_same_size_byte_flip(store):
    path, _ = store
    chunk = _chunk(path, "cell_0002", "mask/c/0/0")
    data = bytearray(chunk.read_bytes())
    data[5] ^= 1
    chunk.write_bytes(bytes(data))
    assert cli("data", "verify", path).exit_code == 0  # sizes are intact
    result = cli("data", "verify", path, "--deep")
    assert "damaged stack cell_0002: content differs from its hash in the manifest" in result.output
    _one_error(result, "1 of 6 stacks damaged")


def test_missing_chunk_and_missing_array_are_named(store):
    path, _ = store
    _chunk(path, "cell_0000").unlink()
    shutil.rmtree(_chunk(path, "negative_0000", "mask"))
    result = cli("data", "verify", path)
    assert "damaged stack cell_0000: image chunk c/3/0/0 is missing" in result.output
    assert "damaged stack negative_0000: unreadable (" in result.output
    _one_error(result, "2 of 6 stacks damaged")


def test_edited_manifest_and_missing_store_are_one_line(store):
    path, _ = store
    manifest = pd.read_csv(path / "manifest.csv", dtype=str)
    manifest.loc[0, "height"] = str(int(manifest.loc[0, "height"]) + 1)
    manifest.to_csv(path / "manifest.csv", index=False)
    _one_error(cli("data", "verify", path), "manifest.csv does not match the store's content hash")
    _one_error(cli("data", "verify", "missing.zarr"), "missing.zarr: store not found")
