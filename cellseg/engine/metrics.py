"""Validation metrics, accumulated over all validation pixels of an epoch.

Definitions follow the seed: pixel accuracy = correct / all pixels; background and cell accuracy
= the recall of that class (correct pixels of the class / pixels of the class); Dice and IoU are
for the cell class (index 1). A class absent from the validation set gives NaN, not a made-up
number. The loss is the class-weighted mean over all pixels (not a mean of batch means).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

METRIC_NAMES = ("val_loss", "accuracy", "background_accuracy", "cell_accuracy", "dice", "iou")


class SegmentationMetrics:
    """Feed ``update(logits, target)`` per batch, read ``compute()`` once per epoch."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss, num_classes: int, device: torch.device):
        self.loss_fn = loss_fn
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.weight_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        per_pixel = nn.functional.cross_entropy(logits, target, reduction="none")
        weight = self.loss_fn.weight[target] if self.loss_fn.weight is not None else torch.ones_like(per_pixel)
        self.loss_sum += (per_pixel * weight).sum(dtype=torch.float64)
        self.weight_sum += weight.sum(dtype=torch.float64)
        self.confusion.update(logits.argmax(1), target)

    def compute(self) -> dict[str, float]:
        cm = self.confusion.compute().double().cpu()  # rows: truth, columns: prediction
        tp = cm.diag()
        truth = cm.sum(1)
        cell_tp, cell_fp, cell_fn = tp[1], cm[:, 1].sum() - tp[1], truth[1] - tp[1]
        return {
            "val_loss": _ratio(self.loss_sum.item(), self.weight_sum.item()),
            "accuracy": _ratio(tp.sum(), cm.sum()),
            "background_accuracy": _ratio(tp[0], truth[0]),
            "cell_accuracy": _ratio(tp[1], truth[1]),
            "dice": _ratio(2 * cell_tp, 2 * cell_tp + cell_fp + cell_fn),
            "iou": _ratio(cell_tp, cell_tp + cell_fp + cell_fn),
        }


def _ratio(num, den) -> float:
    num, den = float(num), float(den)
    return num / den if den > 0 else math.nan
