"""Mask images: every integer PNG/TIFF variant decodes to the class indices, or is refused in one line.

Pillow cannot write 16-bit RGB(A) PNGs (the kind OpenCV writes), so ``write_png`` encodes PNGs
itself, with Sub-filtered rows: a decoder that unfilters with the wrong pixel size fails the test.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.ingest import ingest
from cellseg.data.readers import decode_mask
from cellseg.data.store import open_store
from cellseg.errors import BadInputError

H, W = 12, 10
CELL = np.zeros((H, W), np.uint8)
CELL[3:8, 2:6] = 1
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """A PNG of uint8/uint16 pixels (H, W) or (H, W, channels), every other row Sub-filtered."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.astype(pixels.dtype.newbyteorder(">")).reshape(H, -1).view(np.uint8)
    step = channels * pixels.dtype.itemsize  # bytes per pixel: what the Sub filter subtracts across
    body = b""
    for i, row in enumerate(rows):
        if i % 2:
            left = np.concatenate([np.zeros(step, np.uint8), row[:-step]])
            body += b"\x01" + (row - left).tobytes()  # uint8 arithmetic wraps mod 256, as PNG's does
        else:
            body += b"\x00" + row.tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, pixels.dtype.itemsize * 8, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body))
                     + chunk(b"IEND", b""))
    return path


def _rgb(mask, dtype, colour=(1, 1, 1)):
    return (mask[..., None] * np.array(colour)).astype(dtype)


def _alpha(pixels, alpha):
    return np.dstack([pixels, np.full((H, W), alpha, pixels.dtype)])


def _palette(path: Path) -> None:
    im = Image.fromarray(CELL, "L").convert("P")
    im.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)  # index 1 shows red: the index is the class
    im.save(path)


PNG_VARIANTS = {
    "gray8_0_1": lambda p: write_png(p, CELL),
    "gray8_0_255": lambda p: write_png(p, CELL * 255),
    "gray16_0_1": lambda p: write_png(p, CELL.astype(np.uint16)),
    "gray16_0_65535": lambda p: write_png(p, CELL.astype(np.uint16) * 65535),
    "gray8_alpha": lambda p: write_png(p, _alpha(CELL * 255, 255)),
    "rgb8_0_255": lambda p: write_png(p, _rgb(CELL, np.uint8, (255, 255, 255))),
    "rgb16_0_1": lambda p: write_png(p, _rgb(CELL, np.uint16)),  # issue 12: read as all background
    "rgb16_0_255": lambda p: write_png(p, _rgb(CELL, np.uint16, (255, 255, 255))),
    "rgb16_0_65535": lambda p: write_png(p, _rgb(CELL, np.uint16, (65535,) * 3)),
    "rgba8": lambda p: write_png(p, _alpha(_rgb(CELL, np.uint8, (255, 255, 255)), 255)),
    "rgba16_0_1": lambda p: write_png(p, _alpha(_rgb(CELL, np.uint16), 65535)),
    "rgb8_one_colour": lambda p: write_png(p, _rgb(CELL, np.uint8, (0, 255, 0))),
    "rgb16_one_colour": lambda p: write_png(p, _rgb(CELL, np.uint16, (0, 0, 300))),
    "rgba8_transparent_white_background": lambda p: write_png(
        p, np.where(CELL[..., None] == 1, [255, 0, 0, 255], [255, 255, 255, 0]).astype(np.uint8)),
    "palette": _palette,
    "bilevel": lambda p: Image.fromarray(CELL.astype(bool)).save(p),
}
TIFF_VARIANTS = {
    "tiff_gray8_0_255": lambda p: tifffile.imwrite(p, CELL * 255),
    "tiff_gray16_0_1": lambda p: tifffile.imwrite(p, CELL.astype(np.uint16)),
    "tiff_gray16_0_65535": lambda p: tifffile.imwrite(p, CELL.astype(np.uint16) * 65535),
    "tiff_rgb8": lambda p: tifffile.imwrite(p, _rgb(CELL, np.uint8), photometric="rgb"),
    "tiff_rgb16_planar": lambda p: tifffile.imwrite(p, np.moveaxis(_rgb(CELL, np.uint16, (255,) * 3), -1, 0),
                                                    photometric="rgb", planarconfig="separate"),
    "tiff_rgba8": lambda p: tifffile.imwrite(p, _alpha(_rgb(CELL, np.uint8), 255), photometric="rgb",
                                             extrasamples=["unassalpha"]),
    "tiff_palette": lambda p: tifffile.imwrite(p, CELL, photometric="palette",
                                               colormap=np.zeros((3, 256), np.uint16)),
}


def _decode(tmp_path: Path, write, suffix: str, n_classes: int = 2) -> np.ndarray:
    path = tmp_path / f"m{suffix}"
    write(path)
    return decode_mask(path, path.read_bytes(), n_classes)


@pytest.mark.parametrize("variant", sorted(PNG_VARIANTS))
def test_png_mask_variants_decode_to_class_indices(tmp_path, variant):
    got = _decode(tmp_path, PNG_VARIANTS[variant], ".png")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, CELL)


@pytest.mark.parametrize("variant", sorted(TIFF_VARIANTS))
def test_tiff_mask_variants_decode_to_class_indices(tmp_path, variant):
    np.testing.assert_array_equal(_decode(tmp_path, TIFF_VARIANTS[variant], ".tif"), CELL)


def test_16bit_colour_png_keeps_every_bit(tmp_path):
    """Three classes, written as 16-bit gray-valued RGB: values survive exactly (not just their high byte)."""
    mask = CELL.copy()
    mask[0, :] = 2
    got = _decode(tmp_path, lambda p: write_png(p, _rgb(mask, np.uint16)), ".png", n_classes=3)
    np.testing.assert_array_equal(got, mask)


REFUSED = {
    "several_colours": (lambda p: write_png(p, np.dstack([CELL * 255, CELL[::-1] * 255, CELL * 0])), ".png",
                        "colour mask with 3 colours besides black; expected gray or palette class indices"),
    "gray16_alpha": (lambda p: write_png(p, _alpha(CELL.astype(np.uint16), 65535)), ".png",
                     "16-bit gray+alpha PNG"),
    "float_tiff": (lambda p: tifffile.imwrite(p, CELL.astype(np.float32)), ".tif",
                   "mask pixels are float32; expected integer class indices"),
    "two_page_tiff": (lambda p: tifffile.imwrite(p, np.stack([CELL, CELL])), ".tif",
                      "mask has shape (2, 12, 10) (axes QYX); expected one image"),
    "rgb16_values_not_in_codes": (lambda p: write_png(p, _rgb(CELL, np.uint16, (7, 7, 7))), ".png",
                                  "mask values 7 not covered by codes.txt (2 classes: 0..1)"),
    "tiff_values_not_in_codes": (lambda p: tifffile.imwrite(p, CELL * 3), ".tif",
                                 "mask values 3 not covered by codes.txt"),
    "corrupt_tiff": (lambda p: p.write_bytes(b"II*\x00garbage"), ".tif", "truncated or corrupt mask"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_undecodable_masks_are_refused_in_one_line(tmp_path, case):
    write, suffix, reason = REFUSED[case]
    with pytest.raises(BadInputError) as caught:
        _decode(tmp_path, write, suffix)
    assert reason in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / f"m{suffix}"))


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "FullImage").mkdir(parents=True)
    (root / "Mask_Norm").mkdir()
    (root / "codes.txt").write_text("Background\nCell\n")
    for sid in ("a", "b"):
        tifffile.imwrite(root / "FullImage" / f"{sid}.ome.tif", np.ones((3, H, W), np.uint16))
    return root


def test_ingest_reads_16bit_rgb_png_and_tiff_masks_as_cells(tmp_path):
    root = _root(tmp_path)
    write_png(root / "Mask_Norm" / "a.png", _rgb(CELL, np.uint16))
    tifffile.imwrite(root / "Mask_Norm" / "b.tif", CELL * 255)
    report = ingest(root, "s.zarr")
    assert report.negatives == 0
    store = open_store("s.zarr")
    for i in range(2):
        np.testing.assert_array_equal(store.read_mask(i), CELL)


def test_two_masks_for_one_stack_are_one_line(tmp_path):
    root = _root(tmp_path)
    write_png(root / "Mask_Norm" / "a.png", CELL)
    tifffile.imwrite(root / "Mask_Norm" / "a.tif", CELL)
    write_png(root / "Mask_Norm" / "b.png", CELL)
    result = CliRunner().invoke(app, ["data", "ingest", str(root), "--out", "s.zarr"])
    assert result.exit_code == 1
    assert "error: Mask_Norm/a.tif: same stack id 'a' as Mask_Norm/a.png" in result.output
    assert not Path("s.zarr").exists()
