"""Subimage generation (docs/data.md): crops, clamping, previews, masks, bad ROI files, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.subimages import generate_subimages, roi_boxes
from cellseg.errors import ConfigError

C, H, W = 7, 60, 80
NAMES = [f"ch{i}" for i in range(C)]


def make_stack(folder: Path, name: str, seed: int = 0, rois: str | None = None, shape=(C, H, W), pixels=None) -> np.ndarray:
    """A multi-page OME-TIFF with channel names (random values unless given) and its ROI file."""
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(1, 60000, size=shape, dtype=np.uint16)
    shape = pixels.shape
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"axes": "CYX", "Channel": {"Name": NAMES[: shape[0]]}}
    tifffile.imwrite(folder / f"{name}.ome.tif", pixels, ome=True, photometric="minisblack", metadata=metadata)
    if rois is not None:
        (folder / f"{name}--labels.txt").write_text(rois)
    return pixels


def read_crop(out: Path, stem: str) -> np.ndarray:
    return tifffile.imread(out / "Segmented_Image" / f"{stem}.ome.tif")


def ome_channel_names(path: Path) -> list[str]:
    with tifffile.TiffFile(path) as tif:
        import xml.etree.ElementTree as ET

        return [ch.get("Name") for ch in ET.fromstring(tif.ome_metadata).iter() if ch.tag.endswith("}Channel")]


def test_crops_match_numpy_slicing_and_summary(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = make_stack(src, "field", rois="Class,X,Y,W,H\nCell,20,15,10,8\nNeg,50,40,21,11\n")

    report = generate_subimages(src, out, [0, 3, 6])

    assert not report.bad and len(report.rows) == 2
    # centre (20, 15), size 10x8 -> x 15:25, y 11:19; odd sizes keep the centre pixel in the middle
    np.testing.assert_array_equal(read_crop(out, "field_0"), pixels[:, 11:19, 15:25])
    np.testing.assert_array_equal(read_crop(out, "field_1"), pixels[:, 35:46, 40:61])
    assert ome_channel_names(out / "Segmented_Image" / "field_0.ome.tif") == NAMES
    summary = pd.read_csv(out / "rois.csv", keep_default_na=False)
    assert summary[["source", "roi", "class", "x0", "y0", "x1", "y1"]].values.tolist() == [
        ["field.ome.tif", 0, "Cell", 15, 11, 25, 19],
        ["field.ome.tif", 1, "Neg", 40, 35, 61, 46],
    ]
    assert summary["image"].tolist() == ["Segmented_Image/field_0.ome.tif", "Segmented_Image/field_1.ome.tif"]
    assert not (out / "Segmented_Masks").exists()


@pytest.mark.parametrize(
    ("x", "y", "w", "h", "box"),
    [
        (2, 30, 10, 10, (0, 25, 7, 35)),  # left border
        (78, 30, 10, 10, (73, 25, 80, 35)),  # right border
        (40, 1, 10, 10, (35, 0, 45, 6)),  # top border
        (40, 58, 10, 10, (35, 53, 45, 60)),  # bottom border
        (79, 59, 20, 20, (69, 49, 80, 60)),  # bottom-right corner
        (0, 0, 6, 6, (0, 0, 3, 3)),  # top-left corner
        (40, 30, 200, 200, (0, 0, 80, 60)),  # larger than the image
    ],
)
def test_boxes_crossing_the_border_are_clamped(tmp_path, x, y, w, h, box):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = make_stack(src, "s", rois=f"Class,X,Y,W,H\nCell,{x},{y},{w},{h}\n")

    report = generate_subimages(src, out, [0, 1, 2])

    x0, y0, x1, y1 = box
    assert not report.bad
    assert tuple(report.rows[0][k] for k in ("x0", "y0", "x1", "y1")) == box
    np.testing.assert_array_equal(read_crop(out, "s_0"), pixels[:, y0:y1, x0:x1])


def test_box_rounding_is_half_up():
    rois = pd.DataFrame({"Class": ["a"], "X": [10.5], "Y": [10.0], "W": [3.0], "H": [4.0]})
    (box,) = roi_boxes(rois, 100, 100, Path("r.txt"))
    assert (box.x0, box.x1, box.y0, box.y1) == (9, 12, 8, 12)


def test_preview_is_8bit_rgb_of_the_chosen_channels(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = np.stack([40 * ((c + 1) * yy + (C - c) * xx) for c in range(C)]).astype(np.uint16)  # distinct per channel
    pixels = make_stack(src, "s", rois="Class,X,Y,W,H\nCell,30,20,17,13\n", pixels=smooth)

    generate_subimages(src, out, [6, 0, 3])

    with Image.open(out / "Segmented_JPEGs" / "s_0.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (17, 13)
        rgb = np.asarray(im).astype(float)
    crop = pixels[:, 14:27, 22:39].astype(float)
    expected = np.stack([crop[c] / crop[c].max() * 255 for c in (6, 0, 3)], axis=-1)
    assert np.abs(rgb - expected).mean() < 3  # JPEG is lossy; a wrong channel or scale is far off


def test_ground_truth_mask_is_cropped(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_stack(src, "s", rois="Class,X,Y,W,H\nCell,75,30,20,10\n")
    truth = np.random.default_rng(1).integers(0, 3, size=(H, W), dtype=np.uint8)
    Image.fromarray(truth).save(src / "s_seg.png")

    report = generate_subimages(src, out, [0, 1, 2], gt_suffix="_seg.png")

    assert not report.bad
    mask = np.asarray(Image.open(out / "Segmented_Masks" / "s_0.png"))
    np.testing.assert_array_equal(mask, truth[25:35, 65:80])
    assert report.rows[0]["mask"] == "Segmented_Masks/s_0.png"


def test_ground_truth_problems_skip_the_stack(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_stack(src, "nomask", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")
    make_stack(src, "small", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")
    Image.fromarray(np.zeros((H - 1, W), np.uint8)).save(src / "small_seg.png")

    report = generate_subimages(src, out, [0, 1, 2], gt_suffix="_seg.png")

    reasons = sorted(str(e) for e in report.bad)
    assert "nomask_seg.png: ground-truth mask not found" in reasons[0]
    assert "small_seg.png: mask is 80x59, its stack is 80x60" in reasons[1]
    assert not report.rows


def test_black_masks_have_the_crop_size(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_stack(src, "ctrl", rois="Class,X,Y,W,H\nNeg,5,5,12,9\nNeg,40,30,15,7\n")

    generate_subimages(src, out, [0, 1, 2], black_masks=True)

    for stem, shape in (("ctrl_0", (9, 11)), ("ctrl_1", (7, 15))):
        mask = np.asarray(Image.open(out / "Segmented_Masks" / f"{stem}.png"))
        assert mask.shape == shape and mask.dtype == np.uint8 and not mask.any()


def test_move_to_front_reorders_channels_and_names(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = make_stack(src, "s", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")

    generate_subimages(src, out, [5, 2, 5], move_to_front=True)

    order = [5, 2, 0, 1, 3, 4, 6]
    np.testing.assert_array_equal(read_crop(out, "s_0"), pixels[order][:, 25:35, 25:35])
    assert ome_channel_names(out / "Segmented_Image" / "s_0.ome.tif") == [NAMES[c] for c in order]


def test_single_page_hwc_stack_is_read(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    hwc = np.random.default_rng(2).integers(0, 60000, size=(H, W, 3), dtype=np.uint16)
    tifffile.imwrite(src / "rgb.tif", hwc)
    (src / "rgb--labels.txt").write_text("Class,X,Y,W,H\nCell,30,30,10,10\n")

    report = generate_subimages(src, out, [0, 1, 2])

    assert not report.bad
    np.testing.assert_array_equal(read_crop(out, "rgb_0"), hwc[25:35, 25:35].transpose(2, 0, 1))


BAD_ROIS = {
    "missingcol": ("Class,X,Y,W\nCell,10,10,5\n", "column 'H' not in dataframe"),
    "text": ("Class,X,Y,W,H\nCell,10,ten,5,5\n", "'ten' in row 1"),
    "zerow": ("Class,X,Y,W,H\nCell,10,10,0,5\n", "greater_than(0)"),
    "negh": ("Class,X,Y,W,H\nCell,10,10,5,-2\n", "greater_than(0)"),
    "outside": ("Class,X,Y,W,H\nCell,10,10,5,5\nCell,500,10,5,5\n", "row 2: box X=500 Y=10 W=5 H=5 lies entirely outside"),
    "empty": ("Class,X,Y,W,H\n", "no ROI rows"),
    "blank": ("", "cannot read ROI table"),
    "extra": ("Class,X,Y,W,H\nCell,1,10,10,5,5\n", "more fields than the header"),
}


def make_mixed_source(src: Path) -> dict[str, np.ndarray]:
    """Two good stacks, every kind of bad ROI file, a stack without ROI file, an orphan ROI file."""
    good = {name: make_stack(src, name, seed=i, rois="Class,X,Y,W,H\nCell,30,30,10,10\n") for i, name in enumerate(("a", "z"))}
    for name, (text, _) in BAD_ROIS.items():
        make_stack(src, name, rois=text)
    make_stack(src, "norois")
    (src / "orphan--labels.txt").write_text("Class,X,Y,W,H\nCell,30,30,10,10\n")
    return good


def test_bad_roi_files_are_reported_by_name_and_good_ones_processed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    good = make_mixed_source(src)

    report = generate_subimages(src, out, [0, 1, 2])

    messages = {Path(e.path).name.split("--")[0].split(".")[0]: str(e) for e in report.bad}
    for name, (_, reason) in BAD_ROIS.items():
        assert f"{name}--labels.txt: " in messages[name] and reason in messages[name], messages[name]
        assert "\n" not in messages[name]
    assert "norois.ome.tif: no ROI file norois--labels.txt beside it" in messages["norois"]
    assert "orphan--labels.txt: ROI file without a stack" in messages["orphan"]
    assert len(report.bad) == len(BAD_ROIS) + 2
    for name, pixels in good.items():
        np.testing.assert_array_equal(read_crop(out, f"{name}_0"), pixels[:, 25:35, 25:35])
    assert sorted(p.name for p in (out / "Segmented_Image").iterdir()) == ["a_0.ome.tif", "z_0.ome.tif"]
    assert pd.read_csv(out / "rois.csv")["source"].tolist() == ["a.ome.tif", "z.ome.tif"]


def test_rerun_keeps_earlier_outputs_of_sources_now_bad(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_stack(src, "a", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")
    make_stack(src, "b", rois="Class,X,Y,W,H\nCell,30,30,10,10\nCell,10,10,4,4\n")
    generate_subimages(src, out, [0, 1, 2])
    (src / "a--labels.txt").write_text("Class,X,Y\n")  # broken after the first run
    (src / "b--labels.txt").write_text("Class,X,Y,W,H\nNeg,20,20,6,6\n")

    report = generate_subimages(src, out, [0, 1, 2])

    assert [Path(e.path).name for e in report.bad] == ["a--labels.txt"]
    assert (out / "Segmented_Image" / "a_0.ome.tif").is_file()
    summary = pd.read_csv(out / "rois.csv")
    assert summary[["source", "roi", "class"]].values.tolist() == [["a.ome.tif", 0, "Cell"], ["b.ome.tif", 0, "Neg"]]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries left


def test_preview_channel_beyond_the_stack_is_one_line(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_stack(src, "s", rois="Class,X,Y,W,H\nCell,30,30,10,10\n", shape=(4, H, W))

    report = generate_subimages(src, out, [0, 3, 6])

    (err,) = report.bad
    assert str(err).endswith("s.ome.tif: --preview-channels 0,3,6: the stack has only 4 channel(s)")
    assert not (out / "Segmented_Image").exists()


def test_ground_truth_and_black_masks_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="choose one"):
        generate_subimages(tmp_path, tmp_path / "out", [0, 1, 2], gt_suffix="_seg.png", black_masks=True)


runner = CliRunner()


def test_cli_success(tmp_path):
    src = tmp_path / "src"
    make_stack(src, "s", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")
    result = runner.invoke(app, ["data", "subimages", str(src), "out", "--preview-channels", "0,3,6", "--black-masks"])
    assert result.exit_code == 0, result.output
    assert "1 subimage(s) from 1 of 1 source file(s)" in result.stdout
    assert Path("out/Segmented_Masks/s_0.png").is_file()


def test_cli_bad_files_exit_nonzero_after_writing_the_good_ones(tmp_path):
    src = tmp_path / "src"
    make_mixed_source(src)
    result = runner.invoke(app, ["data", "subimages", str(src), "out", "--preview-channels", "0,3,6"])
    assert result.exit_code == 1
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(BAD_ROIS) + 2 and any("zerow--labels.txt" in line for line in skipped)
    assert result.stderr.splitlines()[-1] == f"error: {len(BAD_ROIS) + 2} of {len(BAD_ROIS) + 4} source file(s) skipped (listed above)"
    assert "Traceback" not in result.output
    assert Path("out/Segmented_Image/a_0.ome.tif").is_file() and Path("out/Segmented_Image/z_0.ome.tif").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preview-channels", "0,3"], "--preview-channels: expected three"),
        (["--preview-channels", "0,x,6"], "--preview-channels: expected three comma-separated"),
        (["--preview-channels", "0,1,2", "--black-masks", "--ground-truth-suffix", "_seg.png"], "choose one"),
    ],
)
def test_cli_option_errors(tmp_path, args, message):
    src = tmp_path / "src"
    make_stack(src, "s", rois="Class,X,Y,W,H\nCell,30,30,10,10\n")
    result = runner.invoke(app, ["data", "subimages", str(src), "out", *args])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_or_empty_source(tmp_path):
    result = runner.invoke(app, ["data", "subimages", "nowhere", "out", "--preview-channels", "0,1,2"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: nowhere: source folder not found"
    Path("empty").mkdir()
    result = runner.invoke(app, ["data", "subimages", "empty", "out", "--preview-channels", "0,1,2"])
    assert result.exit_code == 1 and "empty: no TIFF stacks found" in result.stderr
