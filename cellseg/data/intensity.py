"""Intensity normalisation: each channel of each stack mapped to [0, 1] by its own range.

- ``max`` (the paper's): divide by the channel's maximum. One hot pixel or a saturated speck of
  debris sets that maximum, and the cells then sit near zero.
- ``percentile`` (the field's convention: cellpose, StarDist/CSBDeep): the ``low``–``high``
  percentiles of the channel map to 0 and 1, values outside are clipped. A handful of extreme
  pixels moves neither percentile, so it changes no prediction.

The range is computed per stack and channel over the whole native image — the same pixels in
training (before any resize or crop) and at inference — and recorded with the model.
A channel whose range is empty (constant, or all zero) becomes all zero, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Method = Literal["max", "percentile"]


@dataclass(frozen=True)
class Normalisation:
    method: Method = "percentile"
    low: float = 1.0
    high: float = 99.8

    def ranges(self, planes: np.ndarray) -> np.ndarray:
        """float32 (K, 2): the (low, high) intensity of each plane of (K, H, W)."""
        flat = planes.reshape(planes.shape[0], -1)
        top = flat.max(axis=1).astype(np.float32)
        if self.method == "max":
            return np.stack([np.zeros_like(top), top], axis=1)
        lo, hi = np.percentile(flat, [self.low, self.high], axis=1).astype(np.float32)
        # a sparse stain can have its high percentile at the background level: fall back to the max
        hi = np.where(hi > lo, hi, top)
        return np.stack([lo, hi], axis=1)

    @property
    def clips(self) -> bool:
        """Whether values can fall outside the range (percentiles) and must be clipped."""
        return self.method == "percentile"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "low": self.low, "high": self.high}

    def describe(self) -> str:
        if self.method == "max":
            return "per-channel maximum"
        return f"per-channel {self.low:g}th–{self.high:g}th percentile, clipped"


def range_scale(ranges: torch.Tensor) -> torch.Tensor:
    """1 / (high - low) of (…, 2) ranges; 0 where a range is empty (the channel becomes all zero)."""
    import torch  # here, not at the top: the config (every CLI start) imports this module

    span = ranges[..., 1] - ranges[..., 0]
    return torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), 0.0)


def apply_ranges(planes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """(…, H, W) intensities with (…, 2) ranges -> float32 in [0, 1]; zero where a range is empty."""
    import torch

    ranges = ranges.float()
    out = planes.to(torch.float32, copy=True)
    return out.sub_(ranges[..., 0, None, None]).mul_(range_scale(ranges)[..., None, None]).clamp_(0.0, 1.0)
