"""Whole-image prediction: stacks in (TIFF files or a Zarr store), label masks and previews out.

The model input is built exactly as in training, from the model's own record: the stack channels
its input recipe needs (each loading code as resolved at training, see codes.py: no codes file is
read), each normalised by its intensity range over the native image (intensity.py),
brought to the pixel scale the model was trained at (geometry.py: the whole stack resized, or native
pixels x scale in sliding windows), combined by the code plan; the class probabilities are mapped
back to the native pixels. A model saved before those records existed is used as it was then
(input schema 1: native-pixel tiles, per-channel maximum) with its codes as defined today
(schemas 1 and 2), and ``legacy_note`` says so in one line. Inference rule for codes
with randomness: the run-level channel and merge dropout are switched off (dropout is a training
augmentation: at inference every channel a code can load is loaded); draws that remain (``random``
codes, codes with their own fixed dropout probability) come from a generator seeded with ``seed``,
one draw per image, so the same command always gives the same masks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cellseg.data.codes import (
    CodePlan,
    CodeRecord,
    load_records,
    parse_codes,
    plan_from_records,
    record_codes,
    resolve_codes,
)
from cellseg.data.geometry import Geometry, diameter_factor, pad_to, resize_planes
from cellseg.data.intensity import Normalisation
from cellseg.data.layouts import Layout
from cellseg.data.readers import decode_stack, read_stack_header
from cellseg.errors import BadInputError, ConfigError
from cellseg.fileio import atomic_path, write_text
from cellseg.inference.instances import (
    boundary_class,
    cell_class,
    cell_diameter,
    instances_from_probabilities,
    write_labels,
)
from cellseg.inference.measurements import cell_table
from cellseg.inference.tiling import predict_tiled
from cellseg.model.loading import TrainedModel
from cellseg.visualize import overlay

TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")


@dataclass(frozen=True)
class Stack:
    """One image to segment: the channels the plan needs (K×H×W, native pixels)."""

    name: str  # output name: file stem or store id ('/' keeps subfolders)
    source: str
    channels: np.ndarray
    in_store: bool = False  # from an ingested Zarr store: instances also go to OUT/labels.zarr


@dataclass(frozen=True)
class Prediction:
    name: str
    source: str
    height: int
    width: int
    foreground_fraction: float
    seconds: float
    mask_path: Path
    overlay_path: Path
    cells: int | None = None  # with instances: the number of cells labelled


def model_layout(trained: TrainedModel) -> Layout:
    return Layout.model_validate(trained.metadata["layout"])


def recorded_inputs(metadata: dict, layout: Layout, source: str) -> tuple[CodeRecord, ...]:
    """A model's input recipe (its ``metadata``); a model saved before recipes: its codes as defined today."""
    if "recipe" in metadata:
        return load_records(metadata["recipe"], layout, source)
    return record_codes([int(c) for c in metadata["codes"]], layout)


def input_plan(
    trained: TrainedModel, codes: str | Sequence[int] | None = None, strategy: str | None = None
) -> CodePlan:
    """The model's recorded inputs (or ``codes``/``strategy``, resolved today, instead), run-level dropout off.

    A plan that does not give the model's number of input channels is a one-line ConfigError.
    """
    if codes is not None and strategy is not None:
        raise ConfigError(f"--codes {codes} and --strategy {strategy}: give one of them")
    layout = model_layout(trained)
    if codes is None and strategy is None:
        what = "its recorded inputs"
        plan = plan_from_records(recorded_inputs(trained.metadata, layout, trained.uri), layout, 0.0, 0.0)
    else:
        option, given = ("--codes", codes) if codes is not None else ("--strategy", strategy)
        what = f"{option} {given}"
        # text given to --codes must be codes: resolve_codes would take other text for a strategy name
        chosen = parse_codes(codes) if isinstance(codes, str) else given
        plan = resolve_codes(chosen, layout, channel_dropout=0.0, merge_dropout=0.0)
    if plan.in_channels != trained.in_channels:
        raise ConfigError(
            f"{what}: gives {plan.in_channels} input channels, model {trained.uri} takes {trained.in_channels}"
        )
    return plan


def legacy_note(trained: TrainedModel) -> str | None:
    """One line for a model saved before cellseg recorded its whole input: what it is given instead."""
    metadata = trained.metadata
    codes = ",".join(str(c) for c in metadata["codes"])
    if "geometry" not in metadata:
        return (f"note: {trained.uri} records no input geometry, normalisation or recipe (saved before cellseg "
                f"recorded them): using native-pixel tiles of {trained.size} px and per-channel maximum "
                f"normalisation, as then, and today's definitions of its codes {codes}")
    if "recipe" not in metadata:
        return (f"note: {trained.uri} records no input recipe (saved before cellseg recorded it): "
                f"using today's definitions of its codes {codes}")
    return None


def model_geometry(trained: TrainedModel) -> Geometry:
    """The pixel scale the model was trained at (legacy models: native-pixel tiles of their size)."""
    record = trained.metadata.get("geometry") or {"resize": "none", "size": trained.size}
    return Geometry(**{k: v for k, v in record.items() if k != "cell_diameter"})


def model_normalisation(trained: TrainedModel) -> Normalisation:
    return Normalisation(**(trained.metadata.get("normalisation") or {"method": "max"}))


def inference_factor(trained: TrainedModel, tile: int | None = None, diameter: float | None = None) -> float:
    """The extra rescale ``--diameter`` asks for (1 without it); options that contradict the model's
    geometry are a one-line ConfigError naming both."""
    geometry = model_geometry(trained)
    if tile is not None and geometry.resize == "stack" and tile != geometry.size:
        raise ConfigError(f"--tile {tile}: model {trained.uri} was trained with resize: stack "
                          f"({geometry.describe()}); it sees each whole input at that size, not in tiles")
    train_diameter = (trained.metadata.get("geometry") or {}).get("cell_diameter")
    return diameter_factor(geometry, train_diameter, diameter)


def model_input(stack: Stack, plan: CodePlan, normalisation: Normalisation, shape: tuple[int, int] | None = None,
                seed: int = 0) -> torch.Tensor:
    """float32 (in_channels, h, w) on the CPU: channels normalised by their native ranges, resized to
    ``shape`` (default: native), combined by ``plan`` (one draw seeded by ``seed``)."""
    ranges = torch.from_numpy(normalisation.ranges(stack.channels))[None]
    raw = stack.channels if shape is None else resize_planes(stack.channels.astype(np.float32), shape)
    draw = plan.draw(1, torch.Generator().manual_seed(seed))
    return plan.combine(torch.from_numpy(np.ascontiguousarray(raw))[None], *draw, ranges, normalisation.clips)[0]


def segment(trained: TrainedModel, stack: Stack, plan: CodePlan, tile: int | None = None, overlap: float = 0.25,
            batch_size: int = 4, seed: int = 0, factor: float = 1.0) -> torch.Tensor:
    """Class probabilities (num_classes, H, W) at the stack's native pixels, on the model's device:
    the input at the model's pixel scale (``factor``: extra rescale, see ``inference_factor``),
    zero-padded to at least the model's size, blended sliding windows, mapped back."""
    geometry = model_geometry(trained)
    height, width = stack.channels.shape[-2:]
    shape = geometry.shape(height, width, factor)
    x = torch.from_numpy(pad_to(model_input(stack, plan, model_normalisation(trained), shape, seed).numpy(),
                                geometry.size))
    device = next(trained.model.parameters()).device
    probs = predict_tiled(trained.model, x, tile or geometry.size, overlap, batch_size, device)
    probs = probs[:, : shape[0], : shape[1]]
    if shape != (height, width):
        probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return probs


# --- inputs ---------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for suffix in TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_tiff_stack(path: Path, layout: Layout, plan: CodePlan) -> Stack:
    """The plan's channels of a stack TIFF in any arrangement ingest reads (multi-page, (C,H,W), (H,W,C)); its channel count must match."""
    header = read_stack_header(path, layout.n_channels)
    if header.channels != layout.n_channels:
        raise BadInputError(
            f"{path}: {header.channels} channels, but the model was trained on {layout.n_channels}-channel "
            f"stacks (layout '{layout.name}')"
        )
    image = decode_stack(path, path.read_bytes(), header)[plan.needed_channels]
    return Stack(_stem(path), str(path), image)


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def store_stacks(path: Path, layout: Layout, plan: CodePlan) -> Iterator[Stack]:
    """Every stack of an ingested Zarr store, reading only the plan's channels."""
    from cellseg.data.store import open_store

    store = open_store(path)
    if store.layout.n_channels != layout.n_channels:
        raise BadInputError(
            f"{path}: store has {store.layout.n_channels}-channel stacks (layout '{store.layout.name}'), but the "
            f"model was trained on {layout.n_channels} (layout '{layout.name}')"
        )
    for i, stack_id in enumerate(store.ids):
        yield Stack(stack_id, f"{path}#{stack_id}", store.read_image(i, plan.needed_channels), in_store=True)


def iter_stacks(inputs: Sequence[str | Path], layout: Layout, plan: CodePlan) -> Iterator[Stack]:
    """Stacks from TIFF files, folders of TIFFs and Zarr stores, in the order given."""
    for item in inputs:
        path = Path(item)
        if _is_store(path):
            yield from store_stacks(path, layout, plan)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))
            if not files:
                raise BadInputError(f"{path}: folder holds no TIFF stacks")
            for file in files:
                yield read_tiff_stack(file, layout, plan)
        elif path.is_file():
            yield read_tiff_stack(path, layout, plan)
        else:
            raise BadInputError(f"{path}: no such image file, folder or Zarr store")


# --- outputs --------------------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (creating its folder)."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def predict_stacks(
    trained: TrainedModel,
    stacks: Iterator[Stack],
    out: str | Path,
    plan: CodePlan,
    tile: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    seed: int = 0,
    factor: float = 1.0,
    instances: bool = False,
    diameter: float | None = None,
    pixel_size: float | None = None,
) -> Iterator[Prediction]:
    """Segment each stack; write ``OUT/masks/NAME.png`` (class indices, as Mask_Norm) and
    ``OUT/overlays/NAME.png`` (input with prediction outlines); with ``instances`` also
    ``OUT/labels/NAME.ome.tif`` (one id per cell, see instances.py), ``OUT/cells/NAME.csv`` (per-cell
    measurements, ``pixel_size`` in µm for areas in µm²) and, for stacks of a store, the image and its
    cells in ``OUT/labels.zarr/NAME`` (OME-Zarr, see ome.py). Yields one record per stack."""
    out = Path(out)
    if instances:
        cell, cell_size = cell_class(trained, "--instances"), cell_diameter(trained, diameter)
        names = [model_layout(trained).channel_names[c] for c in plan.needed_channels]
    seen: dict[str, str] = {}
    for stack in stacks:
        if stack.name in seen:
            raise BadInputError(f"{stack.source}: output name '{stack.name}' also used by {seen[stack.name]}")
        seen[stack.name] = stack.source
        start = time.perf_counter()
        probs = segment(trained, stack, plan, tile, overlap, batch_size, seed, factor)
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        seconds = time.perf_counter() - start
        x = model_input(stack, plan, model_normalisation(trained), seed=seed)
        mask_path = write_png(out / "masks" / f"{stack.name}.png", labels)
        overlay_path = write_png(out / "overlays" / f"{stack.name}.png", overlay(x, labels))
        cells = None
        if instances:
            label_image = instances_from_probabilities(probs, cell, cell_size, boundary_class(trained))
            write_labels(out / "labels" / f"{stack.name}.ome.tif", label_image, pixel_size)
            if stack.in_store:
                from cellseg.inference.ome import write_ome_zarr  # zarr only when a store is read

                write_ome_zarr(out / "labels.zarr", stack.name, stack.channels, names, label_image, pixel_size)
            table_path = out / "cells" / f"{stack.name}.csv"
            table = cell_table(label_image, stack.channels, names, pixel_size, table_path)
            write_text(table_path, table.to_csv(index=False))
            cells = len(table)
        h, w = labels.shape
        yield Prediction(stack.name, stack.source, h, w, float(np.count_nonzero(labels)) / labels.size, seconds,
                         mask_path, overlay_path, cells)
