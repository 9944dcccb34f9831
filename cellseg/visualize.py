"""Preview images: the input as RGB (or grey) with prediction and truth outlines drawn on top.

Used by predict (overlay PNG beside each mask), training (example predictions logged to MLflow)
and the augmentation grid. Numpy/scipy only, so it runs anywhere the rest of cellseg does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PREDICTION_COLOUR = (255, 0, 255)  # magenta
TRUTH_COLOUR = (0, 255, 0)  # green


def _numpy(array) -> np.ndarray:
    """Accept numpy arrays and torch tensors (any device) alike."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def display_rgb(image) -> np.ndarray:
    """uint8 (H, W, 3) from (C, H, W) or (H, W): the first 3 channels as RGB, else the first as grey.

    Each channel is scaled by its own maximum, as the model's input is; an all-zero channel stays black.
    """
    arr = _numpy(image).astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {arr.shape}")
    chans = arr[:3] if arr.shape[0] >= 3 else arr[:1].repeat(3, axis=0)
    peak = chans.reshape(3, -1).max(axis=1)
    scale = np.divide(255.0, peak, out=np.zeros_like(peak), where=peak > 0)
    rgb = np.clip(chans * scale[:, None, None], 0, 255)
    return np.ascontiguousarray(np.moveaxis(rgb, 0, -1).astype(np.uint8))


def outlines(labels) -> np.ndarray:
    """Boolean (H, W): non-background pixels with a 4-neighbour of a different value.

    Works for class-index masks and instance labels alike (touching objects get a border).
    """
    lab = _numpy(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    cross = ndimage.generate_binary_structure(2, 1)
    hi = ndimage.maximum_filter(lab, footprint=cross, mode="nearest")
    lo = ndimage.minimum_filter(lab, footprint=cross, mode="nearest")
    return (lab != 0) & (hi != lo)


def overlay(image, prediction, truth=None, fill: float = 0.0) -> np.ndarray:
    """uint8 RGB (H, W, 3): ``image`` for display, truth outlines in green, prediction in magenta.

    ``fill`` > 0 also tints the predicted (non-background) area with that opacity, so a prediction
    covering the whole image, which has no outline, still shows.
    """
    rgb = display_rgb(image)
    if fill > 0 and prediction is not None:
        area = _numpy(prediction) != 0
        tinted = (1 - fill) * rgb[area] + fill * np.asarray(PREDICTION_COLOUR, dtype=np.float32)
        rgb[area] = np.clip(tinted, 0, 255).astype(np.uint8)
    for labels, colour in ((truth, TRUTH_COLOUR), (prediction, PREDICTION_COLOUR)):
        if labels is None:
            continue
        edge = outlines(labels)
        if edge.shape != rgb.shape[:2]:
            raise ValueError(f"labels {edge.shape} do not match image {rgb.shape[:2]}")
        rgb[edge] = colour
    return rgb
