"""Class-weighted cross-entropy (the paper's loss): raising one class's weight trades over- against
under-segmentation of that class."""

from __future__ import annotations

import torch
from torch import nn

from cellseg.errors import ConfigError


def weighted_cross_entropy(weights: list[float], num_classes: int) -> nn.CrossEntropyLoss:
    """Pixel-wise cross-entropy whose mean is weighted per class (``weights[k]`` for class k)."""
    if len(weights) != num_classes:
        raise ConfigError(
            f"train.ce_weights: {len(weights)} weights given for {num_classes} classes (one per class)"
        )
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
