"""On-device batch augmentation: identical geometry for image and mask, masks stay exact labels."""

from __future__ import annotations

import pytest
import torch

from cellseg.config import AugmentConfig
from cellseg.engine.augment import build_augment

NO_INTENSITY = dict(lighting=0.0, noise=0.0, blur=0.0)


def blobs(batch: int = 6, size: int = 48) -> torch.Tensor:
    """Class masks with large regions of classes 0, 1 and 2 (so labels other than 0/1 are checked too)."""
    y = torch.zeros(batch, size, size, dtype=torch.long)
    y[:, 8:30, 10:40] = 1
    y[:, 30:44, 5:20] = 2
    return y


def image_equal_to_mask(y: torch.Tensor) -> torch.Tensor:
    """A 3-channel image whose channel 0 IS the mask, the others random texture."""
    return torch.cat([y[:, None].float(), torch.rand(y.shape[0], 2, *y.shape[1:])], 1)


def test_exact_geometry_ops_move_image_and_mask_together():
    aug = build_augment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, affine=0.0, crop_scale=(1.0, 1.0),
                                      **NO_INTENSITY), size=48)
    torch.manual_seed(1)
    y = blobs()
    x, y_aug = aug(image_equal_to_mask(y), y)
    assert torch.equal(x[:, 0].round().long(), y_aug)
    assert not torch.equal(y_aug, y)  # something actually moved


def test_affine_and_crop_keep_labels_exact_and_aligned():
    aug = build_augment(AugmentConfig(affine=1.0, degrees=30, **NO_INTENSITY), size=40)
    torch.manual_seed(2)
    y = blobs()
    x, y_aug = aug(image_equal_to_mask(y), y)
    assert x.shape == (6, 3, 40, 40) and y_aug.shape == (6, 40, 40) and y_aug.dtype == torch.long
    assert set(y_aug.unique().tolist()) <= {0, 1, 2}  # nearest: no in-between labels at edges
    agree = (x[:, 0].round().long() == y_aug).float().mean()
    assert agree > 0.97  # same warp; the bilinear image differs only along region edges


def test_intensity_ops_touch_the_image_only():
    aug = build_augment(AugmentConfig(hflip=0, vflip=0, rot90=0, affine=0, crop_scale=(1.0, 1.0),
                                      lighting=1.0, noise=1.0, blur=1.0), size=48)
    torch.manual_seed(3)
    y = blobs()
    x = image_equal_to_mask(y) * 0.5
    x_aug, y_aug = aug(x, y)
    assert torch.equal(y_aug, y)
    assert not torch.allclose(x_aug, x)


def test_seeded_and_on_the_input_device():
    aug = build_augment(AugmentConfig(), size=32)
    y = blobs(4, 32)
    x = image_equal_to_mask(y)
    torch.manual_seed(7)
    first = aug(x, y)
    torch.manual_seed(7)
    second = aug(x, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].device == x.device


def test_disabled_gives_none():
    assert build_augment(AugmentConfig(enabled=False), size=32) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_gpu():
    aug = build_augment(AugmentConfig(), size=32).cuda()
    y = blobs(4, 32).cuda()
    x, y_aug = aug(image_equal_to_mask(y).cuda(), y)
    assert x.is_cuda and y_aug.is_cuda
