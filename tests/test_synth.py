"""The synthetic dataset generator: the folder layout on disk (docs/data.md), imaging physics, determinism, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.layouts import load_layout
from cellseg.data.synth import render_stack, synthesize
from cellseg.data.synth_optics import CAMERA_OFFSET
from cellseg.errors import BadInputError, ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> tuple[np.ndarray, list[str], int]:
    with tifffile.TiffFile(path) as tif:
        channels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]
        return tif.asarray(), [c["Name"] for c in channels], len(tif.pages)


def _mask(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "Mask_Norm" / f"{name}.png"))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = dict(layout="trainer", cells=2, negatives=1, size=48)
    a = _files(synthesize(tmp_path / "a", seed=3, **kwargs).out)
    b = _files(synthesize(tmp_path / "b", seed=3, **kwargs).out)
    c = _files(synthesize(tmp_path / "c", seed=4, **kwargs).out)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".tif"))


def test_output_does_not_depend_on_worker_count(tmp_path):
    kwargs = dict(layout="external", cells=3, negatives=1, size=40, seed=1)
    serial = synthesize(tmp_path / "serial", workers=1, **kwargs).out
    parallel = synthesize(tmp_path / "parallel", workers=2, **kwargs).out
    assert _files(serial) == _files(parallel)


@pytest.mark.parametrize("layout", ["trainer", "test", "external"])
def test_layout_on_disk(tmp_path, layout):
    summary = synthesize(tmp_path / layout, layout=layout, cells=2, negatives=1, size=48, seed=0)
    root, expected = summary.out, load_layout(layout)
    assert (root / "codes.txt").read_text() == "Background\nCell\n"
    names = sorted(p.name.removesuffix(".ome.tif") for p in (root / "FullImage").iterdir())
    assert names == ["cell_0000", "cell_0001", "negative_0000"]
    for name in names:
        image, channel_names, pages = _read(root / "FullImage" / f"{name}.ome.tif")
        mask = _mask(root, name)
        assert image.dtype == np.uint16 and mask.dtype == np.uint8
        assert pages == expected.n_channels == image.shape[0]
        assert channel_names == expected.channel_names
        assert image.shape[1:] == mask.shape
        assert all(43 <= s <= 53 for s in mask.shape)  # crops vary by up to 10 % around --size
        assert set(np.unique(mask)) <= {0, 1}


def test_masks_central_cell_whole_neighbours_cut_negatives_empty(tmp_path):
    root = synthesize(tmp_path / "d", cells=8, negatives=3, size=64, seed=0).out
    components, cut = [], 0
    for i in range(8):
        mask = _mask(root, f"cell_{i:04d}")
        labels, n = ndimage.label(mask)
        components.append(n)
        central = labels[mask.shape[0] // 2, mask.shape[1] // 2]
        assert central > 0, "the ROI's cell is at the centre"
        whole = labels == central
        assert not (whole[0].any() or whole[-1].any() or whole[:, 0].any() or whole[:, -1].any())
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        cut += int((edge > 0).sum())
    assert min(components) >= 1 and max(components) >= 3
    assert cut >= 8
    for i in range(3):
        assert not _mask(root, f"negative_{i:04d}").any()


def test_some_cells_unlabelled_while_in_the_mask():
    """Inconsistent labelling: a cell in the ground truth may show no signal in a label's channel."""
    layout = load_layout("trainer")
    excess = []  # per cell: median cytoplasm-channel signal above the background
    for i in range(8):
        image, mask, _ = render_stack(layout, 96, 0, "cell", i)
        cyto = image[0].astype(float)
        background = np.median(cyto[~ndimage.binary_dilation(mask, iterations=6)])
        labels, n = ndimage.label(ndimage.binary_erosion(mask, iterations=2))
        excess += [np.median(cyto[labels == k]) - background for k in range(1, n + 1) if (labels == k).sum() >= 50]
    assert min(excess) < 10, "some cell in the mask shows no label"
    assert max(excess) > 30, "and others do"


def test_polarisation_channels_split_the_total():
    layout = load_layout("trainer")
    image, _, _ = render_stack(layout, 96, 2, "cell", 0)
    photons = image.astype(float) - CAMERA_OFFSET
    for total in (0, 3, 6):  # total, parallel, perpendicular
        split = photons[total + 1].sum() + photons[total + 2].sum()
        assert split == pytest.approx(photons[total].sum(), rel=0.03)
        assert photons[total + 1].sum() >= photons[total + 2].sum()


def test_brightfield_contrast_grows_with_defocus():
    """A weak phase object: nearly invisible in focus, edges appear out of focus (either side)."""
    layout = load_layout("trainer")
    z = {layout.channels[c].z_um: c for c in range(9, 16)}
    for i in range(3):
        image, _, _ = render_stack(layout, 96, 0, "cell", i)
        detail = {
            um: float(np.std(image[c] - ndimage.gaussian_filter(image[c].astype(float), 8))) for um, c in z.items()
        }
        assert detail[0] < detail[-5] < detail[-10]
        assert detail[0] < detail[5] < detail[10]


def test_refuses_to_replace_a_folder_that_is_not_a_synthetic_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not a synthetic dataset"):
        synthesize(tmp_path / "mine", cells=1, negatives=0, size=40)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    first = synthesize(tmp_path / "again", cells=1, negatives=1, size=40).out
    synthesize(first, cells=1, negatives=0, size=40)  # a previous dataset is replaced whole
    assert sorted(p.name for p in (first / "FullImage").iterdir()) == ["cell_0000.ome.tif"]


def test_user_layout_file(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(
        "name: mine\nchannels:\n"
        "- {name: dna, kind: fluorescence, label: nucleus}\n"
        "- {name: bf, kind: brightfield, z_um: 2}\n"
    )
    image, mask, _ = render_stack(load_layout(good), 40, 0, "cell", 0)
    assert image.shape[0] == 2 and mask.any()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nchannels:\n- {name: actin, kind: fluorescence, label: actin}\n")
    with pytest.raises(ConfigError, match="channel 'actin'"):
        synthesize(tmp_path / "x", layout=bad, cells=1, negatives=0, size=40)


def test_cli_synth_prints_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "synth", str(tmp_path / "cli"), "--layout", "test", "--cells", "2", "--negatives", "1",
              "--size", "40", "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1
    assert "2 cell stacks" in result.stdout and "1 controls" in result.stdout
    assert len(list((tmp_path / "cli" / "FullImage").iterdir())) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "nonesuch"], "unknown layout 'nonesuch'"),
        (["--cells", "-1"], "--cells must be >= 0"),
        (["--size", "8"], "--size must be >="),
    ],
)
def test_cli_bad_options_give_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "bad"), *args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "bad").exists()
