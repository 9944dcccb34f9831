"""Subimage generation (the seed's "Subimage Generation" notebook).

Large microscope stacks in a folder, each with an ImageJ ROI table ``NAME--labels.txt`` beside
it, become one cropped stack per box (``Segmented_Image/``), an RGB preview from three chosen
channels (``Segmented_JPEGs/``), optionally a cropped ground-truth or all-black mask
(``Segmented_Masks/``), and a summary ``rois.csv``. A source whose ROI table or pixels are unusable
is reported with one line and skipped as a whole, so the other sources still go through; every
file appears complete under its final name or not at all.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from cellseg.data.readers import BadFileError, decode_stack, read_stack_header
from cellseg.data.schemas import ROI_SCHEMA, SUBIMAGE_COLUMNS, SUBIMAGE_SCHEMA, read_csv, validate
from cellseg.errors import BadInputError, CellsegError, ConfigError
from cellseg.fileio import atomic_path, write_text
from cellseg.visualize import display_rgb

ROI_SUFFIX = "--labels.txt"
IMAGE_DIR, PREVIEW_DIR, MASK_DIR = "Segmented_Image", "Segmented_JPEGs", "Segmented_Masks"
SUMMARY_NAME = "rois.csv"
_STACK_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


@dataclass(frozen=True)
class Box:
    """One ROI clamped to its image: pixel rows y0:y1, columns x0:x1 (end exclusive)."""

    index: int
    cls: str
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass
class SubimageReport:
    """What a run wrote (summary rows) and which sources it skipped (file, one-line reason)."""

    out: Path
    rows: list[dict] = field(default_factory=list)
    bad: list[BadFileError] = field(default_factory=list)
    sources: int = 0

    def line(self) -> str:
        done = self.sources - len(self.bad)
        return (
            f"{len(self.rows)} subimage(s) from {done} of {self.sources} source file(s) written to {self.out}"
            + (f"; {len(self.bad)} skipped" if self.bad else "")
        )


def parse_channels(text: str, option: str = "--preview-channels") -> list[int]:
    """'0,3,6' -> [0, 3, 6]: exactly three non-negative channel indices."""
    try:
        channels = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option}: expected three comma-separated channel indices like 0,3,6, got {text!r}") from None
    if len(channels) != 3 or min(channels) < 0:
        raise ConfigError(f"{option}: expected three non-negative channel indices like 0,3,6, got {text!r}")
    return channels


def stack_name(path: Path) -> str | None:
    """NAME of a stack file (``NAME.ome.tif``, ``NAME.tif`` …), or None if it is not a TIFF."""
    lower = path.name.lower()
    for suffix in _STACK_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def roi_boxes(rois: pd.DataFrame, height: int, width: int, where: Path) -> list[Box]:
    """Boxes from a validated ROI table (X/Y centre, W/H size), clamped to an (height, width) image.

    A box reaching past the border keeps only its inside part; one entirely outside is an error.
    """
    boxes = []
    for i, row in enumerate(rois.itertuples(index=False)):
        w, h = max(1, _round(row.W)), max(1, _round(row.H))
        x0, y0 = _round(row.X - row.W / 2), _round(row.Y - row.H / 2)
        box = Box(i, str(row.Class), max(0, x0), max(0, y0), min(width, x0 + w), min(height, y0 + h))
        if box.x1 <= box.x0 or box.y1 <= box.y0:
            raise BadFileError(
                where,
                f"row {i + 1}: box X={row.X:g} Y={row.Y:g} W={row.W:g} H={row.H:g} lies entirely outside "
                f"the {width}x{height} image",
            )
        boxes.append(box)
    return boxes


def channel_order(n_channels: int, front: Sequence[int]) -> list[int]:
    """``front`` first (duplicates once), then the other channels in their original order."""
    first = list(dict.fromkeys(front))
    return first + [c for c in range(n_channels) if c not in first]


def generate_subimages(
    src: str | Path,
    out: str | Path,
    preview_channels: Sequence[int],
    gt_suffix: str | None = None,
    black_masks: bool = False,
    move_to_front: bool = False,
) -> SubimageReport:
    """Cut every ROI box of every stack in ``src`` into ``out`` (see the module docstring).

    ``preview_channels`` index the source stack (also with ``move_to_front``, which reorders the
    written stacks so those channels come first). Bad sources land in ``report.bad``; the caller
    decides how to exit. ``rois.csv`` keeps earlier rows of sources not processed this time.
    """
    src, out = Path(src), Path(out)
    if gt_suffix and black_masks:
        raise ConfigError("--ground-truth-suffix and --black-masks both write Segmented_Masks/: choose one")
    if not src.is_dir():
        raise BadInputError(f"{src}: source folder not found")
    stacks, orphans = _find_sources(src, gt_suffix)
    if not stacks and not orphans:
        raise BadInputError(f"{src}: no TIFF stacks found (expected NAME.ome.tif or NAME.tif with NAME{ROI_SUFFIX})")
    summary = out / SUMMARY_NAME
    earlier = read_csv(summary, SUBIMAGE_SCHEMA) if summary.is_file() else None

    report = SubimageReport(out=out, sources=len(stacks) + len(orphans))
    report.bad.extend(BadFileError(p, f"ROI file without a stack {p.name[: -len(ROI_SUFFIX)]}.ome.tif/.tif beside it") for p in orphans)
    done: list[str] = []
    try:
        for name, path in stacks:
            try:
                rows = _cut_stack(src, path, name, out, list(preview_channels), gt_suffix, black_masks, move_to_front)
            except BadFileError as exc:
                report.bad.append(exc)
                continue
            report.rows.extend(rows)
            done.append(path.name)
        report.bad.sort(key=lambda exc: exc.path.name)
    finally:
        if done:  # also after an interruption: the summary lists what is on disk
            _write_summary(summary, earlier, done, report.rows)
    return report


def _find_sources(src: Path, gt_suffix: str | None) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(NAME, stack path) pairs and ROI files without a stack, in name order (top level only)."""
    stacks: dict[str, Path] = {}
    rois: list[Path] = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(ROI_SUFFIX):
            rois.append(path)
        elif gt_suffix and path.name.endswith(gt_suffix):
            continue  # a ground-truth mask, not a stack
        elif (name := stack_name(path)) is not None and name not in stacks:
            stacks[name] = path
    orphans = [p for p in rois if p.name[: -len(ROI_SUFFIX)] not in stacks]
    return sorted(stacks.items()), orphans


def _cut_stack(
    src: Path,
    path: Path,
    name: str,
    out: Path,
    preview: list[int],
    gt_suffix: str | None,
    black_masks: bool,
    move_to_front: bool,
) -> list[dict]:
    """Check everything about one source first, then write its subimages; returns summary rows."""
    roi_path = src / f"{name}{ROI_SUFFIX}"
    if not roi_path.is_file():
        raise BadFileError(path, f"no ROI file {roi_path.name} beside it")
    rois = _read_rois(roi_path)
    header = read_stack_header(path)
    if max(preview) >= header.channels:
        raise BadFileError(
            path, f"--preview-channels {','.join(map(str, preview))}: the stack has only {header.channels} channel(s)"
        )
    boxes = roi_boxes(rois, header.height, header.width, roi_path)
    gt = _read_truth(src / f"{name}{gt_suffix}", (header.height, header.width)) if gt_suffix else None
    image = decode_stack(path, path.read_bytes(), header)
    names = _channel_names(path, header.channels)
    order = channel_order(header.channels, preview) if move_to_front else list(range(header.channels))
    if names is not None:
        names = [names[c] for c in order]

    rows = []
    for box in boxes:
        crop = image[:, box.y0 : box.y1, box.x0 : box.x1]
        stem = f"{name}_{box.index}"
        files = {"image": f"{IMAGE_DIR}/{stem}.ome.tif", "preview": f"{PREVIEW_DIR}/{stem}.jpg", "mask": ""}
        _write_stack(out / files["image"], crop[order], names)
        _write_picture(out / files["preview"], display_rgb(crop[preview]), "JPEG")
        if gt is not None or black_masks:
            files["mask"] = f"{MASK_DIR}/{stem}.png"
            mask = gt[box.y0 : box.y1, box.x0 : box.x1] if gt is not None else np.zeros(crop.shape[1:], np.uint8)
            _write_picture(out / files["mask"], mask, "PNG")
        rows.append(
            {"source": path.name, "roi": box.index, "class": box.cls}
            | {"x0": box.x0, "y0": box.y0, "x1": box.x1, "y1": box.y1}
            | files
        )
    return rows


def _read_rois(path: Path) -> pd.DataFrame:
    try:
        rois = read_csv(path, ROI_SCHEMA)
    except BadFileError:
        raise
    except CellsegError as exc:  # validation messages already name the file
        raise BadFileError(path, str(exc).removeprefix(f"{path}: ")) from None
    if not isinstance(rois.index, pd.RangeIndex):
        raise BadFileError(path, "some rows have more fields than the header Class,X,Y,W,H")
    if rois.empty:
        raise BadFileError(path, "no ROI rows under the header Class,X,Y,W,H")
    return rois


def _read_truth(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask beside a stack, pixel values as stored; it must match the stack's size."""
    if not path.is_file():
        raise BadFileError(path, "ground-truth mask not found")
    try:
        with Image.open(path) as im:
            mask = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise BadFileError(path, f"not a readable mask image ({type(exc).__name__}: {exc})") from None
    if mask.shape[:2] != shape:
        raise BadFileError(path, f"mask is {mask.shape[1]}x{mask.shape[0]}, its stack is {shape[1]}x{shape[0]}")
    return mask


def _channel_names(path: Path, n_channels: int) -> list[str] | None:
    """Channel names from OME-XML or ImageJ ``Labels``, when the file has one per channel."""
    try:
        with tifffile.TiffFile(path) as tif:
            candidates = []
            if tif.ome_metadata:
                root = ET.fromstring(tif.ome_metadata)
                pixels = root.find(".//{*}Image/{*}Pixels")
                if pixels is not None:
                    candidates.append([ch.get("Name") for ch in pixels.findall("{*}Channel")])
            if tif.imagej_metadata:
                candidates.append(tif.imagej_metadata.get("Labels"))
    except (OSError, ValueError, ET.ParseError):
        return None
    for names in candidates:
        if isinstance(names, list) and len(names) == n_channels and all(isinstance(n, str) and n for n in names):
            return names
    return None


def _write_stack(path: Path, pixels: np.ndarray, names: list[str] | None) -> None:
    """OME-TIFF, one page per channel, channel names kept when known."""
    metadata: dict = {"axes": "CYX"}
    if names is not None:
        metadata["Channel"] = {"Name": names}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, pixels, ome=True, photometric="minisblack", metadata=metadata)


def _write_picture(path: Path, pixels: np.ndarray, fmt: str) -> None:
    with atomic_path(path) as tmp:
        options = {"quality": 95} if fmt == "JPEG" else {}
        Image.fromarray(pixels).save(tmp, format=fmt, **options)


def _write_summary(path: Path, earlier: pd.DataFrame | None, done: list[str], rows: list[dict]) -> None:
    """rois.csv: this run's rows replace earlier rows of the same sources; others are kept."""
    table = pd.DataFrame(rows, columns=SUBIMAGE_COLUMNS)
    if earlier is not None:
        kept = earlier[~earlier["source"].isin(done)]
        table = pd.concat([kept, table], ignore_index=True).sort_values(["source", "roi"], kind="stable")
    table = validate(table.reset_index(drop=True), SUBIMAGE_SCHEMA, path)
    write_text(path, table.to_csv(index=False))


def _round(value: float) -> int:
    """Half-up rounding (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)
