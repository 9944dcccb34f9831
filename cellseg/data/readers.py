"""Reading the files users bring: stack TIFFs in every arrangement, PNG or TIFF masks, codes.txt.

Each reader raises ``BadFileError`` (a ``BadInputError``): the file and a one-line reason; the
ingest decides whether that stops the run or skips the stack. Third-party decoders raise many
exception types on damaged files, so their failures are caught broadly at this boundary only.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cellseg.errors import BadInputError

_UINT16_MAX = np.iinfo(np.uint16).max


class BadFileError(BadInputError):
    """One input file is unusable; ``path`` and ``reason`` are kept apart for skip lists."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- codes.txt ----------------------------------------------------------------------------------


def read_codes(path: Path) -> list[str]:
    """Class names, one per line (index = class value in the masks)."""
    if not path.is_file():
        raise BadFileError(path, "file not found (codes.txt: one class name per line, e.g. Background, Cell)")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFileError(path, f"cannot read codes.txt ({_reason(exc)})") from None
    if len(names) < 2:
        raise BadFileError(path, f"codes.txt needs at least 2 class names, found {len(names)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadFileError(path, f"duplicate class names {dupes} in codes.txt")
    return names


# --- stack TIFFs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackHeader:
    """What a TIFF's header says about its image, before reading any pixel data."""

    channels: int
    height: int
    width: int
    squeezed: tuple[int, ...]  # series shape without its singleton axes (Y and X always kept)
    order: tuple[int, ...]  # transpose of the squeezed array to (page axes..., samples, Y, X)
    hwc_pages: bool  # pages of shape (W, C): an (H, W, C) array written page-wise by tifffile


def _looks_hwc(n: int, y: int, x: int, expected: int | None) -> bool:
    """Whether pages (N, Y, X) are really an (H, W, C) array (tifffile writes C > 4 that way)."""
    if expected is not None and expected in (n, x):
        return x == expected and n != expected
    return x <= 32 and 2 * x <= min(n, y)


def stack_header(tif: tifffile.TiffFile, expected_channels: int | None = None) -> StackHeader:
    """Channel/height/width of the main series, for every arrangement below.

    Multi-page (one page per channel, incl. ImageJ/OME hyperstacks: all non-YX axes flattened in
    page order), a single page with C samples (C, H, W) or (H, W, C), and single-page images.
    """
    if not tif.series:
        raise ValueError("no image data")
    series = tif.series[0]
    kept = [(i, ax, n) for i, (ax, n) in enumerate(zip(series.axes, series.shape)) if n > 1 or ax in "YX"]
    axes = "".join(ax for _, ax, _ in kept)
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"unsupported image axes '{series.axes}' {series.shape}")
    spatial = [i for i, ax, _ in kept if ax in "YX"]
    samples = [i for i, ax, _ in kept if ax == "S"]
    others = [i for i, ax, _ in kept if ax not in "YXS"]
    shape = {i: n for i, _, n in kept}
    h, w = shape[spatial[0]], shape[spatial[1]]
    channels = int(np.prod([shape[i] for i in others + samples], dtype=np.int64))
    hwc = len(others) == 1 and not samples and _looks_hwc(channels, h, w, expected_channels)
    if hwc:
        channels, h, w = w, channels, h
    position = {i: k for k, (i, _, _) in enumerate(kept)}
    order = tuple(position[i] for i in others + samples + spatial)
    squeezed = tuple(n for _, _, n in kept)
    return StackHeader(channels, h, w, squeezed, order, hwc)


def arrange(data: np.ndarray, header: StackHeader) -> np.ndarray:
    """The series array (any singleton axes) as (C, H, W) in page order."""
    arr = np.transpose(data.reshape(header.squeezed), header.order)
    if header.hwc_pages:
        arr = np.moveaxis(arr, 2, 0)
    return arr.reshape(header.channels, header.height, header.width)


def to_uint16(arr: np.ndarray) -> np.ndarray:
    """Convert pixel data to uint16 without losing what normalisation by the channel maximum keeps.

    Integer data in 0..65535 is cast; float data must be finite and non-negative, and is cast
    when it already holds integers in range, otherwise each channel is scaled to a maximum of
    65535 (training divides by the per-channel maximum, so only quantisation changes).
    Raises ValueError with the reason.
    """
    if arr.dtype == np.uint16:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint16)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            nan = int(np.isnan(arr).sum())
            raise ValueError(f"{nan} NaN and {int((~finite).sum()) - nan} infinite pixels")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"negative pixel values (min {arr.min()})")
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(arr == np.round(arr)))
    if integral and (arr.size == 0 or arr.max() <= _UINT16_MAX):
        return arr.astype(np.uint16)
    peak = arr.reshape(arr.shape[0], -1).max(axis=1).astype(np.float64)
    scale = np.divide(_UINT16_MAX, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.round(arr * scale[:, None, None]).astype(np.uint16)


class _LoggedErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect what tifffile logs instead of raising (e.g. page offsets past a truncated end)."""
    logger = logging.getLogger("tifffile")
    handler, propagate = _LoggedErrors(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.errors
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def read_stack_header(path: Path, expected_channels: int | None = None) -> StackHeader:
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
            header = stack_header(tif, expected_channels)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise BadFileError(path, f"not a readable TIFF ({_reason(exc)})") from None
    if errors:
        raise BadFileError(path, f"truncated or corrupt TIFF ({errors[0].strip().splitlines()[0]})")
    return header


def decode_stack(path: Path, data: bytes, header: StackHeader) -> np.ndarray:
    """Pixel data of a stack file already read into ``data``, as uint16 (C, H, W)."""
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(io.BytesIO(data), name=path.name) as tif:
            raw = tif.series[0].asarray()
        if errors:
            raise ValueError(errors[0].strip().splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt pixel data
        raise BadFileError(path, f"truncated or corrupt TIFF ({_reason(exc)})") from None
    try:
        return to_uint16(arrange(raw, header))
    except ValueError as exc:
        raise BadFileError(path, str(exc)) from None


# --- masks ----------------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def read_mask_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header."""
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                return tif.pages[0].imagelength, tif.pages[0].imagewidth
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise BadFileError(path, f"not a readable mask image ({_reason(exc)})") from None


def decode_mask(path: Path, data: bytes, n_classes: int) -> np.ndarray:
    """Class indices (uint8 H×W) from a PNG or TIFF mask with integer pixels (8 or 16 bits).

    Gray: the values. Palette: the indices (the palette only colours them for display, as in
    VOC-style label images). RGB: the gray value when the colour channels are equal; one colour on
    black is a two-class mask (black 0, the colour 1); more colours are refused. An alpha channel
    only makes fully transparent pixels background. The values are codes.txt line numbers, except
    that a two-class mask may use 0 and 255 or the type's maximum (65535) for 0 and 1.
    Anything else is refused with one line: a mask is never silently read as empty.
    """
    pixels = _tiff_pixels(path, data) if _is_tiff(path) else _png_pixels(path, data)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise BadFileError(path, f"mask pixels are {pixels.dtype}; expected integer class indices")
    arr = _gray(path, pixels) if pixels.ndim == 3 else pixels
    values = np.unique(arr)
    if values.size and values.min() >= 0 and values.max() < n_classes:
        return arr.astype(np.uint8)
    if n_classes == 2 and set(values.tolist()) <= {0, 255, np.iinfo(arr.dtype).max}:
        return (arr > 0).astype(np.uint8)
    extra = [v for v in values.tolist() if not 0 <= v < n_classes]
    shown = ", ".join(str(v) for v in extra[:5]) + (", …" if len(extra) > 5 else "")
    raise BadFileError(path, f"mask values {shown} not covered by codes.txt ({n_classes} classes: 0..{n_classes - 1})")


def read_label_image(path: Path) -> np.ndarray:
    """Instance labels (H×W integer ids, 0 = background) from a TIFF or PNG label image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadFileError(path, f"cannot read label image ({_reason(exc)})") from None
    pixels = _tiff_pixels(path, data) if _is_tiff(path) else _png_pixels(path, data)
    if pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer) or (pixels.size and pixels.min() < 0):
        raise BadFileError(path, f"label image of {pixels.dtype} {pixels.shape}; expected one plane of "
                                 "non-negative integer ids")
    return pixels


def _corrupt(path: Path, exc: Exception) -> BadFileError:
    return BadFileError(path, f"truncated or corrupt mask ({_reason(exc)})")


def _tiff_pixels(path: Path, data: bytes) -> np.ndarray:
    """(H, W) or (H, W, samples), as stored (a palette TIFF gives its indices)."""
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(io.BytesIO(data), name=path.name) as tif:
            series = tif.series[0]
            arr = series.asarray()
        if errors:
            raise ValueError(errors[0].strip().splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt image
        raise _corrupt(path, exc) from None
    if series.axes == "SYX":  # planar RGB
        return np.moveaxis(arr, 0, -1)
    if series.axes not in ("YX", "YXS"):
        raise BadFileError(path, f"mask has shape {series.shape} (axes {series.axes}); expected one image")
    return arr


def _png_pixels(path: Path, data: bytes) -> np.ndarray:
    """(H, W) or (H, W, channels), as stored (a palette image gives its indices).

    Pillow keeps only the high byte of each sample of a 16-bit RGB(A) PNG, which turned 0/1 and
    0/255 masks into all background; such files are decoded a second time with the little-endian
    raw mode, which on PNG's big-endian samples yields the low bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            codec, extents, offset, rawmode = im.tile[0] if im.format == "PNG" else (None,) * 4
            arr = np.asarray(im)
        if rawmode in ("RGB;16B", "RGBA;16B"):
            with Image.open(io.BytesIO(data)) as im:
                im.tile = [(codec, extents, offset, rawmode.replace(";16B", ";16L"))]
                arr = arr.astype(np.uint16) << 8 | np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt image
        raise _corrupt(path, exc) from None
    if rawmode == "LA;16B":
        raise BadFileError(path, "16-bit gray+alpha PNG (its low bytes cannot be read); save it without alpha")
    return arr


def _gray(path: Path, pixels: np.ndarray) -> np.ndarray:
    """One value per pixel from gray+alpha, RGB or RGBA pixels (see ``decode_mask``)."""
    channels = pixels.shape[2]
    if channels not in (2, 3, 4):
        raise BadFileError(path, f"{channels} samples per pixel; expected gray, RGB or RGBA")
    colour = pixels[..., : 3 if channels >= 3 else 1]
    if channels in (2, 4):
        colour = np.where(pixels[..., -1:] == 0, 0, colour)  # fully transparent: background
    if (colour == colour[..., :1]).all():
        return colour[..., 0]
    fg = colour.any(axis=-1)
    if (colour[fg] == colour[fg][0]).all():
        return fg.astype(np.uint8)
    n = len(np.unique(colour[fg], axis=0))
    raise BadFileError(path, f"colour mask with {n} colours besides black; expected gray or palette class "
                             "indices, or one colour on black")
