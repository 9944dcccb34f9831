"""Ingest: every TIFF arrangement of a dataset folder (docs/data.md), masks, nested ids,
bad inputs, atomicity, idempotency.

The input trees are written here with tifffile/PIL, independent of the synthetic generator.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data import ingest as ingest_module
from cellseg.data.ingest import ingest
from cellseg.data.store import open_store
from cellseg.errors import BadInputError
from cellseg.locks import hold

H, W = 24, 32


def _image(c: int, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 4000, (c, h, w), dtype=np.uint16)


def _mask(seed: int = 0, value: int = 1, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[4 + seed % 5 : 16, 6:20] = value
    return m


def write_stack(root: Path, sid: str, image: np.ndarray, suffix: str = ".ome.tif", **kwargs) -> Path:
    path = root / "FullImage" / f"{sid}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, **kwargs)
    return path


def write_mask(root: Path, sid: str, mask: np.ndarray) -> Path:
    path = root / "Mask_Norm" / f"{sid}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def make_root(root: Path, n: int = 3, channels: int = 16, codes: str = "Background\nCell\n") -> Path:
    """n stacks s0..s{n-1} (the last one a negative control), 0/1 masks, codes.txt."""
    for i in range(n):
        write_stack(root, f"s{i}", _image(channels, seed=i))
        write_mask(root, f"s{i}", _mask(i, value=0 if i == n - 1 else 1))
    (root / "codes.txt").write_text(codes)
    return root


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- arrangements and masks -----------------------------------------------------------------


def _rgb_contig(img):  # (H, W, C) single page, C samples
    return np.moveaxis(img, 0, -1), {"photometric": "rgb"}


ARRANGEMENTS = {
    # name: (channels, how to turn the (C, H, W) image into what is written, writer kwargs)
    "pages": (16, lambda a: (a, {"photometric": "minisblack"})),
    "imagej": (16, lambda a: (a, {"imagej": True, "metadata": {"axes": "CYX"}})),
    "ome": (16, lambda a: (a, {"ome": True, "metadata": {"axes": "CYX", "Channel": {"Name": [str(i) for i in range(16)]}}})),
    "imagej_tzc": (16, lambda a: (a.reshape(1, 2, 8, H, W), {"imagej": True, "metadata": {"axes": "TZCYX"}})),
    "single_page_chw": (3, lambda a: (a, {"photometric": "minisblack", "planarconfig": "separate"})),
    "single_page_chw4": (4, lambda a: (a, {"photometric": "minisblack", "planarconfig": "separate",
                                            "extrasamples": ["unspecified"] * 3})),
    "single_page_hwc": (3, _rgb_contig),
    "hwc_pagewise": (16, lambda a: (np.moveaxis(a, 0, -1), {})),  # tifffile writes (H, W, 16) page by page
    "grey_2d": (1, lambda a: (a[0], {})),
    "float_integral": (4, lambda a: (a.astype(np.float32), {})),
}


@pytest.mark.parametrize("name", sorted(ARRANGEMENTS))
def test_every_tiff_arrangement_round_trips(tmp_path, name):
    channels, arrange = ARRANGEMENTS[name]
    image = _image(channels)
    written, kwargs = arrange(image)
    write_stack(tmp_path, "x", written, **kwargs)
    write_mask(tmp_path, "x", _mask())
    (tmp_path / "codes.txt").write_text("Background\nCell\n")
    layout = "trainer" if channels == 16 else None  # a layout disambiguates page-wise (H, W, C)
    ingest(tmp_path, tmp_path / "s.zarr", layout=layout)
    store = open_store(tmp_path / "s.zarr")
    assert store.shape(0) == (channels, H, W)
    np.testing.assert_array_equal(store.read_image(0), image)
    np.testing.assert_array_equal(store.channel_max[0], image.reshape(channels, -1).max(axis=1))


def test_float_stack_is_scaled_per_channel_and_keeps_ratios(tmp_path):
    image = np.random.default_rng(1).random((2, H, W)).astype(np.float32) * np.array([1.0, 0.01])[:, None, None]
    write_stack(tmp_path, "f", image)
    write_mask(tmp_path, "f", _mask())
    (tmp_path / "codes.txt").write_text("Background\nCell\n")
    ingest(tmp_path, "s.zarr")
    got = open_store("s.zarr").read_image(0).astype(np.float64)
    assert got.max(axis=(1, 2)).tolist() == [65535, 65535]
    expected = image / image.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got / 65535, expected, atol=1e-4)


@pytest.mark.parametrize("value", [1, 255])
def test_binary_masks_0_1_and_0_255_become_class_indices(tmp_path, value):
    make_root(tmp_path, n=1)
    write_mask(tmp_path, "s0", _mask(0, value=value))
    ingest(tmp_path, "s.zarr")
    store = open_store("s.zarr")
    np.testing.assert_array_equal(store.read_mask(0), _mask(0, value=1))
    assert store.read_mask(0).dtype == np.uint8
    assert store.classes == ["Background", "Cell"]


def test_multiclass_masks_map_to_codes(tmp_path):
    make_root(tmp_path, n=1, codes="Background\nCell\nDebris\n")
    mask = _mask(0)
    mask[0:2, 0:2] = 2
    write_mask(tmp_path, "s0", mask)
    ingest(tmp_path, "s.zarr")
    store = open_store("s.zarr")
    assert store.classes == ["Background", "Cell", "Debris"]
    np.testing.assert_array_equal(store.read_mask(0), mask)


def test_nested_folders_give_path_ids_and_manifest(tmp_path):
    ids = ["plate1/well_a/cell_01", "plate1/cell_02", "top"]
    for i, sid in enumerate(ids):
        write_stack(tmp_path, sid, _image(16, i), suffix=".tif" if i == 1 else ".ome.tif")
        write_mask(tmp_path, sid, _mask(i, value=0 if i == 2 else 255))
    write_mask(tmp_path, "orphan", _mask())
    (tmp_path / "codes.txt").write_text("Background\nCell\n")
    report = ingest(tmp_path, "s.zarr", layout="trainer")
    store = open_store("s.zarr")
    assert store.ids == sorted(ids)
    m = store.manifest.set_index("id")
    assert m.loc["plate1/cell_02", "source"] == "FullImage/plate1/cell_02.tif"
    assert m.loc["top", "negative"] and not m.loc["plate1/cell_02", "negative"]
    assert m.loc["plate1/cell_02", "foreground_fraction"] == pytest.approx((_mask(1) > 0).mean())
    assert set(m["layout"]) == {"trainer"} and set(m["channels"]) == {16}
    assert report.stacks == 3 and report.negatives == 1
    assert report.unmatched_masks == ["Mask_Norm/orphan.png"]
    assert store.layout.name == "trainer" and store.layout.channel_names[12] == "bf_0"


def test_without_layout_channels_are_indexed_and_odd_counts_are_bad(tmp_path):
    make_root(tmp_path, n=3, channels=5)
    write_stack(tmp_path, "odd", _image(7))
    write_mask(tmp_path, "odd", _mask())
    result = cli("data", "ingest", tmp_path, "--out", "s.zarr")
    assert result.exit_code != 0
    assert "FullImage/odd.ome.tif" in result.output and "7 channels, most stacks have 5" in result.output
    report = ingest(tmp_path, "s.zarr", skip_bad=True)
    store = open_store("s.zarr")
    assert store.layout.name == "indexed" and store.layout.channel_names == ["0", "1", "2", "3", "4"]
    assert report.skipped == [("FullImage/odd.ome.tif", "7 channels, most stacks have 5 (no --layout given)")]


def test_layout_from_yaml_file_and_ome_channel_labels(tmp_path):
    make_root(tmp_path, n=2, channels=2)
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("name: mine\nchannels:\n- name: dapi\n- name: bf\n")
    ingest(tmp_path, "s.zarr", layout=yaml)
    store = open_store("s.zarr")
    assert store.layout.channel_names == ["dapi", "bf"]
    attrs = json.loads(Path("s.zarr/zarr.json").read_text())["attributes"]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["dapi", "bf"]
    assert attrs["cellseg"]["complete"] is True


def test_hidden_files_are_ignored(tmp_path):
    make_root(tmp_path, n=2)
    (tmp_path / "FullImage" / "._s0.ome.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert ingest(tmp_path, "s.zarr").stacks == 2


# --- bad input: one line naming the file, non-zero exit, no traceback, nothing written -----------


def _corrupt(root):
    (root / "FullImage" / "s1.ome.tif").write_bytes(b"this is not a tiff")
    return "FullImage/s1.ome.tif", "not a readable TIFF"


def _truncated(root):
    path = root / "FullImage" / "s1.ome.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "FullImage/s1.ome.tif", "truncated or corrupt TIFF"


def _no_mask(root):
    (root / "Mask_Norm" / "s1.png").unlink()
    return "FullImage/s1.ome.tif", "no mask (expected Mask_Norm/s1.png)"


def _mask_shape(root):
    write_mask(root, "s1", np.zeros((H + 1, W), np.uint8))
    return "Mask_Norm/s1.png", f"mask is {H + 1}x{W} (HxW) but its stack is {H}x{W}"


def _mask_values(root):
    mask = _mask(1)
    mask[0, 0] = 7
    write_mask(root, "s1", mask)
    return "Mask_Norm/s1.png", "mask values 7 not covered by codes.txt (2 classes: 0..1)"


def _few_channels(root):
    write_stack(root, "s1", _image(9))
    return "FullImage/s1.ome.tif", "9 channels, fewer than the layout's 16"


def _nan(root):
    image = _image(16).astype(np.float32)
    image[3, 2, 2] = np.nan
    write_stack(root, "s1", image)
    return "FullImage/s1.ome.tif", "1 NaN and 0 infinite pixels"


def _inf(root):
    image = _image(16).astype(np.float32)
    image[0, 0, 0] = np.inf
    write_stack(root, "s1", image)
    return "FullImage/s1.ome.tif", "0 NaN and 1 infinite pixels"


BAD_STACKS = {f.__name__[1:]: f for f in (_corrupt, _truncated, _no_mask, _mask_shape, _mask_values, _few_channels, _nan, _inf)}


def _assert_clean_failure(result, *expected: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in lines[0], result.output


@pytest.mark.parametrize("case", sorted(BAD_STACKS))
def test_bad_stack_fails_with_file_and_reason_and_writes_nothing(tmp_path, case):
    root = make_root(tmp_path / "in")
    name, reason = BAD_STACKS[case](root)
    result = cli("data", "ingest", root, "--out", "s.zarr", "--layout", "trainer")
    _assert_clean_failure(result, name, reason)
    assert not Path("s.zarr").exists()
    assert not list(Path(".").glob(".s.zarr*"))  # no temporary left behind


@pytest.mark.parametrize("case", sorted(BAD_STACKS))
def test_skip_bad_ingests_the_rest_and_lists_the_skipped(tmp_path, case):
    root = make_root(tmp_path / "in")
    name, reason = BAD_STACKS[case](root)
    result = cli("data", "ingest", root, "--out", "s.zarr", "--layout", "trainer", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert f"skipped {name}: {reason}" in result.output
    assert open_store("s.zarr").ids == ["s0", "s2"]


def test_skip_bad_lists_every_bad_stack(tmp_path):
    root = make_root(tmp_path / "in", n=6)
    _nan(root)  # s1: found while decoding pixels
    write_stack(root, "s3", _image(3))  # found from the header
    (root / "Mask_Norm" / "s4.png").unlink()
    report = ingest(root, "s.zarr", layout="trainer", skip_bad=True)
    assert report.skipped == [
        ("FullImage/s1.ome.tif", "1 NaN and 0 infinite pixels"),
        ("FullImage/s3.ome.tif", "3 channels, fewer than the layout's 16"),
        ("FullImage/s4.ome.tif", "no mask (expected Mask_Norm/s4.png)"),
    ]
    assert open_store("s.zarr").ids == ["s0", "s2", "s5"]


def test_all_bad_with_skip_bad_is_an_error(tmp_path):
    root = make_root(tmp_path / "in", n=1)
    _nan_only = _image(16).astype(np.float32)
    _nan_only[:] = np.nan
    write_stack(root, "s0", _nan_only)
    result = cli("data", "ingest", root, "--out", "s.zarr", "--skip-bad")
    _assert_clean_failure(result, "no good stacks to ingest (1 skipped)")
    assert not Path("s.zarr").exists()


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda r: None, "input folder not found"),
        (lambda r: r.mkdir(), "no FullImage/ folder"),
        (lambda r: (r / "FullImage").mkdir(parents=True) or (r / "Mask_Norm").mkdir(), "no .tif/.ome.tif stacks found"),
        (lambda r: make_root(r) and __import__("shutil").rmtree(r / "Mask_Norm"), "no Mask_Norm/ folder"),
        (lambda r: make_root(r) and (r / "codes.txt").unlink(), "codes.txt: file not found"),
        (lambda r: make_root(r, codes="Background\n"), "codes.txt needs at least 2 class names"),
    ],
    ids=["missing", "empty", "no-stacks", "no-masks", "no-codes", "one-class"],
)
def test_bad_folders_fail_with_one_line(tmp_path, setup, expected):
    root = tmp_path / "in"
    setup(root)
    (tmp_path / "codes.txt").touch()  # a codes.txt in the wrong place must not be picked up
    for extra in ([], ["--skip-bad"]):
        result = cli("data", "ingest", root, "--out", "s.zarr", *extra)
        _assert_clean_failure(result, expected)
        assert not Path("s.zarr").exists()


def test_unknown_layout_is_one_line(tmp_path):
    root = make_root(tmp_path / "in")
    _assert_clean_failure(cli("data", "ingest", root, "--out", "s.zarr", "--layout", "nope"), "unknown layout 'nope'")


def test_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path):
    root = make_root(tmp_path / "in")
    precious = Path("results")
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    _assert_clean_failure(cli("data", "ingest", root, "--out", precious), "is not a cellseg store")
    assert (precious / "keep.txt").read_text() == "x"


# --- idempotency and atomicity --------------------------------------------------------------------


def test_reingest_is_idempotent_and_skips_unchanged_sources(tmp_path):
    root = make_root(tmp_path / "in")
    first = ingest(root, "a.zarr", layout="trainer")
    again = ingest(root, "a.zarr", layout="trainer")
    elsewhere = ingest(root, "b.zarr", layout="trainer")
    assert not first.reused and again.reused and not elsewhere.reused
    assert first.content_hash == again.content_hash == elsewhere.content_hash
    assert open_store("a.zarr").content_hash == first.content_hash

    write_mask(root, "s0", _mask(3))  # a changed input is re-ingested and changes the hash
    changed = ingest(root, "a.zarr", layout="trainer")
    assert not changed.reused and changed.content_hash != first.content_hash
    assert ingest(root, "a.zarr").layout == "indexed"  # other options rebuild too


def test_reingest_with_skipped_stacks_still_fails_without_skip_bad(tmp_path):
    root = make_root(tmp_path / "in")
    _nan(root)
    assert ingest(root, "s.zarr", layout="trainer", skip_bad=True).stacks == 2
    again = ingest(root, "s.zarr", layout="trainer", skip_bad=True)
    assert again.reused and [n for n, _ in again.skipped] == ["FullImage/s1.ome.tif"]
    with pytest.raises(BadInputError, match="NaN"):
        ingest(root, "s.zarr", layout="trainer")


class _Crash(RuntimeError):
    pass


@contextlib.contextmanager
def _crash_on_third(monkeypatch, exc=_Crash):
    """Decoding the third stack raises ``exc`` (a crash or Ctrl-C half-way through writing)."""
    calls = {"n": 0}
    real = ingest_module.decode_stack

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc("disk on fire")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would also undo the autouse chdir
        patch.setattr(ingest_module, "decode_stack", flaky)
        yield


@pytest.mark.parametrize("exc", [_Crash, KeyboardInterrupt])
def test_interrupted_ingest_leaves_no_store_and_rerun_succeeds(tmp_path, monkeypatch, exc):
    root = make_root(tmp_path / "in", n=4)
    with _crash_on_third(monkeypatch, exc), pytest.raises(exc):
        ingest(root, "s.zarr", layout="trainer")
    assert not Path("s.zarr").exists() and not list(Path(".").glob(".s.zarr*"))
    with pytest.raises(BadInputError, match="store not found"):
        open_store("s.zarr")
    assert ingest(root, "s.zarr", layout="trainer").stacks == 4
    assert Path.cwd() == tmp_path


def test_interrupted_reingest_keeps_the_previous_store(tmp_path, monkeypatch):
    root = make_root(tmp_path / "in", n=4)
    before = ingest(root, "s.zarr", layout="trainer").content_hash
    write_stack(root, "s0", _image(16, seed=99))  # changed: a real rewrite is attempted
    with _crash_on_third(monkeypatch), pytest.raises(_Crash):
        ingest(root, "s.zarr", layout="trainer")
    assert open_store("s.zarr").content_hash == before


def test_leftover_of_a_killed_run_is_removed_and_never_looks_complete(tmp_path):
    root = make_root(tmp_path / "in")
    leftover = Path(".s.zarr.k1ll3d.tmp")  # what atomic_path leaves when the process is killed
    (leftover / "stacks").mkdir(parents=True)
    (leftover / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"cellseg": {"format": 1, "complete": False}}}))
    with pytest.raises(BadInputError, match="incomplete"):
        open_store(leftover)
    report = ingest(root, "s.zarr", layout="trainer")
    assert report.removed_leftovers == [leftover.name] and not leftover.exists()
    assert len(open_store("s.zarr")) == 3


# --- two ingests into one store at once ----------------------------------------------------------

PAUSED_INGEST = """
import pathlib, sys, time
from cellseg.data import ingest as m
real, calls = m.decode_stack, []
def paused(*args):
    calls.append(1)
    if len(calls) == 2:  # half-way: the lock is held and the working copy exists
        pathlib.Path("paused").touch()
        while not pathlib.Path("go").exists():
            time.sleep(0.02)
    return real(*args)
m.decode_stack = paused
from cellseg.cli.main import app
app(sys.argv[1:], prog_name="cellseg")
"""


def _wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_second_ingest_into_a_store_being_written_is_one_line_and_the_first_completes(tmp_path):
    first_root, second_root = make_root(tmp_path / "a", n=4), make_root(tmp_path / "b", n=3)
    first = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, "data", "ingest", str(first_root),
                              "--out", "s.zarr", "--layout", "trainer"], stdout=subprocess.PIPE, text=True)
    _wait_until(Path("paused").exists)
    second = cli("data", "ingest", second_root, "--out", "s.zarr", "--layout", "trainer")
    _assert_clean_failure(second, f"s.zarr: another cellseg process (pid {first.pid} on host",
                          "is writing it; wait for it or pass --wait")
    assert len(list(Path().glob(".s.zarr.*.tmp"))) == 1  # the first's working copy was left alone
    Path("go").touch()
    assert first.wait(timeout=120) == 0 and "ingested 4 stacks" in first.stdout.read()
    store = open_store("s.zarr")
    assert store.ids == ["s0", "s1", "s2", "s3"] and store.verify(deep=True) == []


def test_ingest_wait_waits_for_the_writer_then_writes(tmp_path):
    root = make_root(tmp_path / "in")
    with hold("s.zarr", "writing it"), open("err.txt", "w") as err:
        waiting = subprocess.Popen([sys.executable, "-m", "cellseg.cli.main", "data", "ingest", str(root),
                                    "--out", "s.zarr", "--layout", "trainer", "--wait"], stderr=err)
        _wait_until(lambda: "waiting for it" in Path("err.txt").read_text())
        assert waiting.poll() is None and not Path("s.zarr").exists()
    assert waiting.wait(timeout=120) == 0
    assert f"pid {os.getpid()}" in Path("err.txt").read_text()
    assert open_store("s.zarr").ids == ["s0", "s1", "s2"]


# --- the CLI summary --------------------------------------------------------------------------


def test_cli_ingest_and_info(tmp_path):
    root = make_root(tmp_path / "in")
    result = cli("data", "ingest", root, "--out", "s.zarr", "--layout", "trainer")
    assert result.exit_code == 0, result.output
    assert "ingested 3 stacks (1 negative)" in result.output
    info = cli("data", "info", "s.zarr", "--json")
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["stacks"] == 3 and summary["negatives"] == 1 and summary["layout"] == "trainer"
    assert summary["channels"][0] == "cyto_total" and summary["content_hash"] == open_store("s.zarr").content_hash
    text = cli("data", "info", "s.zarr")
    assert text.exit_code == 0 and "content_hash" in text.output and "bf_0" in text.output
    _assert_clean_failure(cli("data", "info", "missing.zarr"), "missing.zarr", "store not found")
