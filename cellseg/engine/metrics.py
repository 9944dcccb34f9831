"""Validation metrics, accumulated over all validation pixels of an epoch.

Definitions follow the seed: pixel accuracy = correct / all pixels; background and cell accuracy
= the recall of that class (correct pixels of the class / pixels of the class); Dice and IoU are
for the cell class (index 1). A class absent from the validation set gives NaN, not a made-up
number. The loss is the class-weighted mean over all pixels (not a mean of batch means).

The sums are torchmetrics states: the confusion counts (``MulticlassConfusionMatrix``) and the
weighted loss and the weight (two ``SumMetric``, in float64). In a distributed run torchmetrics
gathers and adds every process's states when ``compute`` is called (on every rank, as the loop
does), so processes that each validate a shard of the stacks get the metrics of the whole set.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix

METRIC_NAMES = ("val_loss", "accuracy", "background_accuracy", "cell_accuracy", "dice", "iou")


class SegmentationMetrics:
    """Feed ``update(logits, target)`` per batch, read ``compute()`` once per epoch."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss, num_classes: int, device: torch.device):
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        # rows: truth, columns: prediction; the inputs are the engine's own (no per-batch value check)
        self.confusion = MulticlassConfusionMatrix(num_classes, validate_args=False).to(device)
        # sum of weight × per-pixel loss, and of the weights; a NaN loss stays NaN ("disable"). Not
        # MeanMetric(value, weight): with nan_strategy="disable" (torchmetrics 1.9) it drops the weights.
        self.loss_sum = SumMetric(nan_strategy="disable").set_dtype(torch.float64).to(device)
        self.weight_sum = SumMetric(nan_strategy="disable").set_dtype(torch.float64).to(device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        per_pixel = nn.functional.cross_entropy(logits, target, reduction="none")
        weight = self.loss_fn.weight[target] if self.loss_fn.weight is not None else torch.ones_like(per_pixel)
        self.confusion.update(logits.argmax(1), target)
        self.loss_sum.update(per_pixel * weight)
        self.weight_sum.update(weight)

    @property
    def pixels(self) -> int:
        """Validation pixels seen by this process."""
        return int(self.confusion.confmat.sum())

    def compute(self) -> dict[str, float]:
        """The metrics of everything seen, by all processes of a distributed run."""
        with warnings.catch_warnings():  # a rank without validation stacks still joins the sum
            warnings.filterwarnings("ignore", message=r".*compute.* was called before the ``update``")
            cm = self.confusion.compute().double().cpu()
            loss_sum, weight_sum = self.loss_sum.compute(), self.weight_sum.compute()
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
