"""Figures (matplotlib, Agg backend): written as PNG files and logged to MLflow as artifacts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cellseg.fileio import atomic_path  # noqa: E402

ACCURACY_CURVES = (("accuracy", "pixel accuracy"), ("background_accuracy", "background accuracy"),
                   ("cell_accuracy", "cell accuracy"), ("dice", "cell Dice"))


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def learning_curves(history: Sequence[dict[str, Any]]) -> plt.Figure:
    """Train/val loss and validation accuracies vs epoch, phase changes marked by dotted lines."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss", ms=3)
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss", ms=3)
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    for key, label in ACCURACY_CURVES:
        right.plot(epochs, [h[key] for h in history], "o-", label=label, ms=3)
    right.set_xlabel("epoch")
    right.set_ylabel("validation")
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        for before, after in zip(history, history[1:]):
            if before["phase"] != after["phase"]:
                ax.axvline(before["epoch"] + 0.5, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] = (), columns: int = 4) -> plt.Figure:
    """RGB images (H, W, 3) in a grid, e.g. prediction overlays from ``cellseg.visualize.overlay``."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, list(titles) + [""] * len(images)):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
