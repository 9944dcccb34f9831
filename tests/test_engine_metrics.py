"""Validation metrics against hand computation (seed definitions: accuracy over all pixels,
per-class accuracy = recall of that class)."""

from __future__ import annotations

import math

import pytest
import torch

from cellseg.engine.losses import weighted_cross_entropy
from cellseg.engine.metrics import SegmentationMetrics
from cellseg.errors import ConfigError


def logits_for(labels: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is ``labels`` (B, H, W) with 2 classes."""
    return torch.stack([(labels == 0).float(), (labels == 1).float()], 1) * 4 - 2


def test_accuracies_dice_iou_by_hand():
    truth = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])  # 4 background, 4 cell
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 1]]])  # bg: 3/4 right, cell: 3/4 right
    second_truth = torch.zeros(1, 2, 4, dtype=torch.long)  # a negative control, all predicted right
    metrics = SegmentationMetrics(weighted_cross_entropy([1.0, 1.0], 2), 2, torch.device("cpu"))
    metrics.update(logits_for(pred), truth)
    metrics.update(logits_for(second_truth), second_truth)
    got = metrics.compute()
    tp, fp, fn = 3, 1, 1
    assert got["accuracy"] == pytest.approx(14 / 16)  # over all pixels, not a mean of batch means
    assert got["background_accuracy"] == pytest.approx(11 / 12)
    assert got["cell_accuracy"] == pytest.approx(3 / 4)
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["iou"] == pytest.approx(tp / (tp + fp + fn))


def test_val_loss_is_the_weighted_pixel_mean():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 5)
    target = torch.randint(0, 2, (3, 5, 5))
    loss_fn = weighted_cross_entropy([0.2, 3.0], 2)
    metrics = SegmentationMetrics(loss_fn, 2, torch.device("cpu"))
    for i in range(3):  # batches of one: the sum over batches must equal the whole-set mean
        metrics.update(logits[i : i + 1], target[i : i + 1])
    assert metrics.compute()["val_loss"] == pytest.approx(loss_fn(logits, target).item(), rel=1e-6)


def test_absent_class_gives_nan_not_a_number():
    truth = torch.zeros(1, 3, 3, dtype=torch.long)
    metrics = SegmentationMetrics(weighted_cross_entropy([1, 1], 2), 2, torch.device("cpu"))
    metrics.update(logits_for(truth), truth)
    got = metrics.compute()
    assert got["accuracy"] == 1.0 and math.isnan(got["cell_accuracy"]) and math.isnan(got["dice"])


def test_one_weight_per_class():
    with pytest.raises(ConfigError, match="train.ce_weights"):
        weighted_cross_entropy([1.0, 2.0, 3.0], 2)
