"""The pixel scale a model sees: one declared geometry for training and inference alike.

A network learns cells at the size it was shown them; shown them 4x larger at inference, it fails
(the real-data check of issue 10: mean Dice 0.29 when a model trained on 512 px images squashed to
128 px was applied to native-resolution tiles, 0.55 when the same images were resized like in
training). So the model records how its inputs were made and inference repeats exactly that:

- ``resize: stack`` (the paper's single-cell subimages): the whole stack is resized to fit
  ``size`` x ``size`` (aspect kept, the rest zero-padded, unless ``keep_aspect`` is false) and at
  inference the whole input is resized the same way and the probabilities are mapped back.
- ``resize: none`` (nnU-Net's and cellpose's way): native pixels times ``scale``; training takes
  random ``size`` crops (stacks smaller than a crop are zero-padded), inference slides windows of
  ``size`` over the rescaled image. ``--diameter D`` at inference additionally rescales an image
  whose cells are ``D`` px across to the median cell diameter of the training masks.

Padding is background in the mask: the model learns that an empty border holds no cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cellseg.errors import ConfigError

# torch and scipy are imported where used: the config (and so every CLI start) imports this module.

Resize = Literal["stack", "none"]


@dataclass(frozen=True)
class Geometry:
    """How a stack of native H x W pixels becomes the network's input plane."""

    resize: Resize
    size: int
    scale: float = 1.0
    keep_aspect: bool = True

    def shape(self, height: int, width: int, factor: float = 1.0) -> tuple[int, int]:
        """The (h, w) a native (height, width) plane is resized to before padding/cropping;
        ``factor`` is an extra inference rescale (``--diameter``), for ``resize: none`` only."""
        if self.resize == "stack":
            if not self.keep_aspect:
                return self.size, self.size
            fit = self.size / max(height, width)
            return max(1, round(height * fit)), max(1, round(width * fit))
        f = self.scale * factor
        return max(1, round(height * f)), max(1, round(width * f))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "size": self.size, "scale": self.scale, "keep_aspect": self.keep_aspect}

    def describe(self) -> str:
        if self.resize == "stack":
            how = "aspect kept, padded" if self.keep_aspect else "squashed"
            return f"whole stacks resized to {self.size} px ({how})"
        scale = "native pixels" if self.scale == 1 else f"native pixels x {self.scale:g}"
        return f"{scale}, {self.size} px crops / sliding windows"


def resize_planes(planes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, H, W) -> (K, h, w): bilinear, antialiased when shrinking. uint16 stays uint16 (rounded),
    floats stay float32 — the same filter in training (stored uint16) and inference (floats)."""
    if planes.shape[-2:] == tuple(shape):
        return planes
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(planes.astype(np.float32, copy=False))[None]
    x = F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False, antialias=True)[0]
    if planes.dtype == np.uint16:
        return x.round().clamp(0, 65535).numpy().astype(np.uint16)
    return x.numpy()


def resize_labels(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Class indices (H, W) -> (h, w), nearest neighbour (no new classes)."""
    if mask.shape == tuple(shape):
        return mask
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=tuple(shape), mode="nearest-exact")[0, 0].numpy().astype(mask.dtype)


def pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes (bottom/right) to at least ``size``; content stays at the origin."""
    h, w = array.shape[-2:]
    if h >= size and w >= size:
        return array
    pad = [(0, 0)] * (array.ndim - 2) + [(0, max(0, size - h)), (0, max(0, size - w))]
    return np.pad(array, pad)


def training_view(raw: np.ndarray, mask: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A stored stack (uint16 (K, H, W), mask (H, W)) at the network's pixel scale, padded to at
    least ``size`` on each side; random crops of ``size`` are cut from it (``crop_origin``)."""
    shape = geometry.shape(*mask.shape)
    return pad_to(resize_planes(raw, shape), geometry.size), pad_to(resize_labels(mask, shape), geometry.size)


def crop_origin(height: int, width: int, size: int, generator) -> tuple[int, int]:
    """A uniformly random top-left corner of a ``size`` crop inside a (height, width) view, drawn
    from a ``torch.Generator``."""
    import torch

    y, x = torch.randint(2**31 - 1, (2,), generator=generator).tolist()
    return y % (height - size + 1), x % (width - size + 1)


def median_cell_diameter(masks: list[np.ndarray]) -> float | None:
    """Median equivalent diameter (2·sqrt(area/π), px) of the cells in class-index masks: each
    connected region of non-background pixels is one cell (touching cells count as one object).
    None when the masks hold no cell."""
    from scipy import ndimage

    diameters = []
    for mask in masks:
        labels, n = ndimage.label(mask > 0)
        if n:
            areas = np.bincount(labels.ravel())[1:]
            diameters.append(2.0 * np.sqrt(areas / np.pi))
    return float(np.median(np.concatenate(diameters))) if diameters else None


def diameter_factor(geometry: Geometry, train_diameter: float | None, diameter: float | None) -> float:
    """Extra inference rescale that brings cells ``diameter`` px across to the training diameter."""
    if diameter is None:
        return 1.0
    if diameter <= 0:
        raise ConfigError(f"--diameter {diameter:g}: must be a positive number of pixels")
    if geometry.resize == "stack":
        raise ConfigError(f"--diameter {diameter:g}: the model was trained with resize: stack ("
                          f"{geometry.describe()}), where the whole input is resized; --diameter needs resize: none")
    if train_diameter is None:
        raise ConfigError(f"--diameter {diameter:g}: the model records no training cell diameter "
                          "(its training masks held no cells, or it predates diameter records)")
    return train_diameter / diameter
