"""Sliding-window inference with overlap blending, for images of any size.

The model sees tiles of its training size (a network's statistics are tuned to the field of view
it was trained on: nnU-Net#2510), overlapping by a fraction; each tile's class probabilities are
weighted by a separable Gaussian window (high in the middle, low but positive at the edges, where
zero padding makes predictions least reliable) and the weighted sum is divided by the summed
weights. Every pixel is covered, and the weights sum to one per pixel, so there are no seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SIGMA_FRACTION = 1 / 8  # window sigma as a fraction of the tile side (nnU-Net's choice)
MIN_WEIGHT = 1e-3  # per-axis floor of the window: edge pixels of the image still count


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis: tiles of ``tile`` pixels, at least ``overlap`` of a tile shared.

    The first tile starts at 0 and the last ends at ``length``; the others are spread evenly between,
    so every pixel is covered. A ``length`` not larger than ``tile`` gives one tile.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def gaussian_window(height: int, width: int, device=None) -> torch.Tensor:
    """(height, width) float32 weights: separable Gaussian, ~1 in the centre.

    Each axis is floored at MIN_WEIGHT before the product, so along an image border (where every
    tile is at its own edge in one axis) tiles are still weighted by the other axis.
    """

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(n * SIGMA_FRACTION, 1e-6)) ** 2).clamp_min(MIN_WEIGHT)

    return axis(height)[:, None] * axis(width)[None, :]


def tiles(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(y, x, tile_height, tile_width) of every window; tiles shrink to the image if it is smaller."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


@torch.inference_mode()
def predict_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class probabilities (num_classes, H, W), float32 on ``device``, for a (C, H, W) image.

    Tiles are cut from ``image`` (wherever it lives), run in batches of ``batch_size`` on ``device``
    (channels-last; bf16 autocast on CUDA) and blended there.
    """
    device = torch.device(device)
    _, height, width = image.shape
    windows = tiles(height, width, tile, overlap)
    th, tw = windows[0][2], windows[0][3]
    weight = gaussian_window(th, tw, device)
    total = torch.zeros((height, width), dtype=torch.float32, device=device)
    probs = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        x = torch.stack([image[:, y : y + th, x0 : x0 + tw] for y, x0, _, _ in batch]).to(device, torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        p = torch.softmax(logits.float(), dim=1) * weight
        if probs is None:
            probs = torch.zeros((p.shape[1], height, width), dtype=torch.float32, device=device)
        for (y, x0, _, _), tile_probs in zip(batch, p):
            probs[:, y : y + th, x0 : x0 + tw] += tile_probs
            total[y : y + th, x0 : x0 + tw] += weight
    return probs / total
