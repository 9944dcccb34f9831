"""Whole-image prediction: stacks in (TIFF files or a Zarr store), label masks and previews out.

The model input is built exactly as in training: the stack channels the loading codes need, each
divided by its own maximum over the image, combined by the code plan. Inference rule for codes
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
from PIL import Image

from cellseg.data.codes import CodePlan, normalise, resolve_codes
from cellseg.data.layouts import Layout
from cellseg.data.readers import decode_stack, read_stack_header
from cellseg.errors import BadInputError, ConfigError
from cellseg.fileio import atomic_path
from cellseg.inference.tiling import predict_tiled
from cellseg.tracking.models import TrainedModel
from cellseg.visualize import overlay

TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")


@dataclass(frozen=True)
class Stack:
    """One image to segment: the channels the plan needs (uint16, K×H×W) and their maxima."""

    name: str  # output name: file stem or store id ('/' keeps subfolders)
    source: str
    channels: np.ndarray
    maxima: np.ndarray


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


def model_layout(trained: TrainedModel) -> Layout:
    return Layout.model_validate(trained.metadata["layout"])


def input_plan(
    trained: TrainedModel, codes: str | Sequence[int] | None = None, strategy: str | None = None
) -> CodePlan:
    """The model's loading codes (or ``codes``/``strategy`` instead), run-level dropout off.

    A plan that does not give the model's number of input channels is a one-line ConfigError.
    """
    if codes is not None and strategy is not None:
        raise ConfigError("give --codes or --strategy, not both")
    chosen = codes if codes is not None else strategy if strategy is not None else trained.metadata["codes"]
    plan = resolve_codes(chosen, model_layout(trained), channel_dropout=0.0, merge_dropout=0.0)
    if plan.in_channels != trained.in_channels:
        option = "--codes" if codes is not None else "--strategy"
        raise ConfigError(
            f"{option} {chosen}: gives {plan.in_channels} input channels, "
            f"model {trained.uri} takes {trained.in_channels}"
        )
    return plan


def model_input(stack: Stack, plan: CodePlan, seed: int = 0) -> torch.Tensor:
    """float32 (in_channels, H, W) on the CPU: channels divided by their maxima, combined by ``plan``."""
    raw = torch.from_numpy(stack.channels.astype(np.int32))[None]
    x = normalise(raw, torch.from_numpy(np.asarray(stack.maxima, dtype=np.float32))[None])
    return plan.apply(x, torch.Generator().manual_seed(seed))[0]


def segment(
    trained: TrainedModel, x: torch.Tensor, tile: int | None = None, overlap: float = 0.25, batch_size: int = 4
) -> torch.Tensor:
    """Class probabilities (num_classes, H, W) on the model's device, by blended sliding windows."""
    device = next(trained.model.parameters()).device
    return predict_tiled(trained.model, x, tile or trained.size, overlap, batch_size, device)


# --- inputs ---------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for suffix in TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_tiff_stack(path: Path, layout: Layout, plan: CodePlan) -> Stack:
    """The plan's channels of a stack TIFF in any SPEC 2.1 arrangement; its channel count must match."""
    header = read_stack_header(path, layout.n_channels)
    if header.channels != layout.n_channels:
        raise BadInputError(
            f"{path}: {header.channels} channels, but the model was trained on {layout.n_channels}-channel "
            f"stacks (layout '{layout.name}')"
        )
    image = decode_stack(path, path.read_bytes(), header)[plan.needed_channels]
    maxima = image.reshape(image.shape[0], -1).max(axis=1).astype(np.float32)
    return Stack(_stem(path), str(path), image, maxima)


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
        maxima = store.channel_max[i][plan.needed_channels]
        yield Stack(stack_id, f"{path}#{stack_id}", store.read_image(i, plan.needed_channels), maxima)


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
) -> Iterator[Prediction]:
    """Segment each stack; write ``OUT/masks/NAME.png`` (class indices, as Mask_Norm) and
    ``OUT/overlays/NAME.png`` (input with prediction outlines). Yields one record per stack."""
    out = Path(out)
    seen: dict[str, str] = {}
    for stack in stacks:
        if stack.name in seen:
            raise BadInputError(f"{stack.source}: output name '{stack.name}' also used by {seen[stack.name]}")
        seen[stack.name] = stack.source
        start = time.perf_counter()
        x = model_input(stack, plan, seed)
        probs = segment(trained, x, tile, overlap, batch_size)
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        seconds = time.perf_counter() - start
        mask_path = write_png(out / "masks" / f"{stack.name}.png", labels)
        overlay_path = write_png(out / "overlays" / f"{stack.name}.png", overlay(x, labels))
        h, w = labels.shape
        yield Prediction(stack.name, stack.source, h, w, float(np.count_nonzero(labels)) / labels.size, seconds,
                         mask_path, overlay_path)
