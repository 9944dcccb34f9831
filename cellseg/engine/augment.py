"""Data augmentation on whole batches on the training device (kornia), configured by ``config.augment``.

Geometry (flips, 90° turns, rotation/scale/shear, random resized crop) is drawn once per sample and
applied identically to image and mask; the mask is warped with nearest-neighbour sampling so it
stays exact class labels. Intensity changes (brightness, contrast, gamma, noise, blur) touch the
image only. Random draws come from torch's global generator on the batch's device, which the engine
seeds from ``config.seed`` and stores in every checkpoint, so a resumed run sees the same draws.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import nn

from cellseg.config import AugmentConfig


class BatchAugment(nn.Module):
    """``(x float (B,C,H,W), y long (B,H,W)) -> (x', y')`` with ``x'``/``y'`` of side ``size``."""

    def __init__(self, cfg: AugmentConfig, size: int):
        super().__init__()
        self.pipeline = K.AugmentationSequential(*_ops(cfg, size), data_keys=["input", "mask"])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, ya = self.pipeline(x, y[:, None].to(x.dtype))
        return xa, ya[:, 0].round().long()


def _ops(cfg: AugmentConfig, size: int) -> list[nn.Module]:
    """Geometric ops first (shared with the mask), then intensity ops (image only)."""
    blur_kernel = 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1
    ops: list[nn.Module] = [
        K.RandomHorizontalFlip(p=cfg.hflip),
        K.RandomVerticalFlip(p=cfg.vflip),
        K.RandomRotation90(times=(1, 3), p=cfg.rot90),
        K.RandomAffine(degrees=cfg.degrees, scale=cfg.scale, shear=cfg.shear, p=cfg.affine),
        K.RandomResizedCrop((size, size), scale=cfg.crop_scale, p=1.0),
        K.RandomBrightness((1 - cfg.brightness, 1 + cfg.brightness), p=cfg.lighting),
        K.RandomContrast((1 - cfg.contrast, 1 + cfg.contrast), p=cfg.lighting),
        K.RandomGamma(cfg.gamma, p=cfg.lighting),
        K.RandomGaussianNoise(std=cfg.noise_std, p=cfg.noise),
        K.RandomGaussianBlur(blur_kernel, cfg.blur_sigma, p=cfg.blur),
    ]
    return [op for op in ops if op.p > 0]


def build_augment(cfg: AugmentConfig, size: int) -> BatchAugment | None:
    """The training augmentation, or None when ``augment.enabled`` is false."""
    return BatchAugment(cfg, size) if cfg.enabled else None
