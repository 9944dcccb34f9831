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
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

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


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] = (), columns: int = 4,
               legend: Sequence[tuple[str, Sequence[int]]] = ()) -> plt.Figure:
    """RGB images (H, W, 3) in a grid, e.g. prediction overlays from ``cellseg.visualize.overlay``.
    ``legend``: (label, RGB 0-255) pairs shown as lines under the grid, e.g. what each outline colour is."""
    from matplotlib.lines import Line2D

    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, list(titles) + [""] * len(images)):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    if legend:  # proxy artists: the outlines are pixels of the images, not artists of their own
        handles = [Line2D([], [], color=np.asarray(rgb, float) / 255, lw=2, label=label) for label, rgb in legend]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                   fontsize=8, frameon=False)
    return fig


def lr_finder(curves: Sequence[dict[str, Any]], rule: str = "") -> plt.Figure:
    """Smoothed loss relative to its minimum vs learning rate (log axis), one line per strategy, the
    suggested learning rate marked — the seed's "Learning Rate Finder" figure. Each curve is drawn
    over its ``window`` (``[start, stop)``, default all points)."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    top = 1.0
    for curve in curves:
        shown = slice(*curve.get("window", (0, len(curve["smoothed"]))))  # the part the rules read
        lrs, loss = np.asarray(curve["lrs"], float)[shown], np.asarray(curve["smoothed"], float)[shown]
        if not len(loss):
            continue
        relative = loss / np.nanmin(loss)
        top = max(top, float(np.nanmax(relative)))
        suggestion = curve.get("suggestion")
        label = curve["strategy"] + (f" (suggested {suggestion:.1e})" if suggestion else " (no suggestion)")
        (line,) = ax.plot(lrs, relative, label=label, lw=1.4)
        if suggestion:
            at = int(np.argmin(np.abs(np.log(lrs) - np.log(suggestion))))
            ax.plot(lrs[at], relative[at], "o", color=line.get_color(), ms=7, mfc="none", mew=1.6)
    ax.set_xscale("log")
    ax.set_ylim(0.95, min(top * 1.05, 4.0) if top > 1.0 else 1.5)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("relative loss (smoothed / minimum)")
    ax.set_title("Learning rate finder")
    if rule:
        ax.text(0.01, -0.16, f"o suggestion: {rule}", transform=ax.transAxes, fontsize=7, color="dimgrey")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.5)
    fig.tight_layout()
    return fig


ERROR_CURVES = (("wrong_background", "background", "o-", "#9b0d4f"), ("wrong_cell", "cell", "s-", "#0b1b7f"),
                ("wrong_overall", "overall", "^--", "grey"))


def error_fractions(rows: Sequence[dict[str, Any]], xlabel: str) -> plt.Figure:
    """Fraction of wrongly classified background, cell and all pixels vs a weight on a log axis —
    the seed's cross-entropy penalty trade-off figure."""
    rows = sorted(rows, key=lambda r: r["weight"])
    weights = [r["weight"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style, colour in ERROR_CURVES:
        ax.plot(weights, [r[key] for r in rows], style, label=label, color=colour, ms=7, lw=1.6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of incorrect pixels")
    ax.set_title("Cross-entropy class weight")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3, which="major")
    fig.tight_layout()
    return fig


def image_table(images: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str],
                captions: Sequence[Sequence[str]] = (), row_titles: Sequence[str] = (),
                heading: str = "") -> plt.Figure:
    """RGB images in rows (e.g. one stack each) and columns (e.g. one model each), titled per column,
    with a caption under each image — the layout of the seed's cross-entropy penalty figure."""
    rows, columns = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for r, row in enumerate(images):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            ax.imshow(row[c])
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=10)
            caption = captions[r][c] if r < len(captions) and c < len(captions[r]) else ""
            ax.set_xlabel(caption, fontsize=9)
        if r < len(row_titles):
            axes[r][0].set_ylabel(row_titles[r], fontsize=8)
    if heading:
        fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return fig
