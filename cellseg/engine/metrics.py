"""Validation metrics, accumulated over all validation pixels of an epoch.

Definitions follow the seed: pixel accuracy = correct / all pixels; background and cell accuracy
= the recall of that class (correct pixels of the class / pixels of the class); Dice and IoU are
for the cell class (index 1). A class absent from the validation set gives NaN, not a made-up
number. The loss is the class-weighted mean over all pixels (not a mean of batch means).
Everything is kept as sums (confusion counts, weighted loss and weight), so processes that each
validate a shard of the stacks add them up and get the metrics of the whole set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cellseg.engine.distributed import all_reduce_sum

METRIC_NAMES = ("val_loss", "accuracy", "background_accuracy", "cell_accuracy", "dice", "iou")


class SegmentationMetrics:
    """Feed ``update(logits, target)`` per batch, read ``compute()`` once per epoch."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss, num_classes: int, device: torch.device):
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        # confusion counts (truth-major), then the weighted loss sum and the weight sum
        self.sums = torch.zeros(num_classes * num_classes + 2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        per_pixel = nn.functional.cross_entropy(logits, target, reduction="none")
        weight = self.loss_fn.weight[target] if self.loss_fn.weight is not None else torch.ones_like(per_pixel)
        k = self.num_classes
        pairs = target.flatten() * k + logits.argmax(1).flatten()
        self.sums[: k * k] += torch.bincount(pairs, minlength=k * k)
        self.sums[k * k] += (per_pixel * weight).sum(dtype=torch.float64)
        self.sums[k * k + 1] += weight.sum(dtype=torch.float64)

    @property
    def pixels(self) -> int:
        """Validation pixels seen by this process."""
        k = self.num_classes
        return int(self.sums[: k * k].sum())

    def compute(self) -> dict[str, float]:
        """The metrics of everything seen, by all processes of a distributed run."""
        k = self.num_classes
        sums = all_reduce_sum(self.sums.clone()).cpu()
        cm = sums[: k * k].view(k, k)  # rows: truth, columns: prediction
        loss_sum, weight_sum = sums[k * k], sums[k * k + 1]
        tp = cm.diag()
        truth = cm.sum(1)
        cell_tp, cell_fp, cell_fn = tp[1], cm[:, 1].sum() - tp[1], truth[1] - tp[1]
        return {
            "val_loss": _ratio(loss_sum, weight_sum),
            "accuracy": _ratio(tp.sum(), cm.sum()),
            "background_accuracy": _ratio(tp[0], truth[0]),
            "cell_accuracy": _ratio(tp[1], truth[1]),
            "dice": _ratio(2 * cell_tp, 2 * cell_tp + cell_fp + cell_fn),
            "iou": _ratio(cell_tp, cell_tp + cell_fp + cell_fn),
        }


def _ratio(num, den) -> float:
    num, den = float(num), float(den)
    return num / den if den > 0 else math.nan
