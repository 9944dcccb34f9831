"""The report's own figures: our numbers beside the paper's (matplotlib, Agg, via cellseg.plots)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cellseg.plots import plt

OURS, PAPER, BASELINE = "#3953a4", "#b0b0b0", "#c0392b"


def strategies_figure(table: pd.DataFrame, baseline: float | None) -> plt.Figure:
    """Final validation accuracy per strategy: ours (mean ± sd) beside the paper's, and the
    accuracy of predicting background everywhere on our validation split."""
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(table) + 1.4))
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["accuracy"], 0.4, xerr=table["sd"].fillna(0.0), color=OURS, capsize=3, label="ours")
    ax.barh(y + 0.2, table["paper"].fillna(0.0), 0.4, color=PAPER, label="paper")
    if baseline is not None:
        ax.axvline(baseline, color=BASELINE, ls="--", lw=1.2, label="all background (our split)")
    ax.set_yticks(y, [s.replace("_", " ") for s in table["strategy"]])
    ax.invert_yaxis()
    low = np.nanmin([table["accuracy"].min(), table["paper"].min(), baseline or 1.0])
    ax.set_xlim(max(0.0, math.floor((low - 0.05) * 20) / 20), 1.0)
    ax.set_xlabel("validation pixel accuracy")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def ce_figure(table: pd.DataFrame) -> plt.Figure:
    """Left: peak accuracy vs cell weight, ours and the paper's. Right: our wrong-pixel fractions."""
    fig, (acc, wrong) = plt.subplots(1, 2, figsize=(11, 4))
    acc.plot(table["weight"], table["peak_accuracy"], "o-", color=OURS, label="ours (peak)")
    acc.plot(table["weight"], table["accuracy"], "o:", color=OURS, alpha=0.6, label="ours (final)")
    acc.plot(table["weight"], table["paper"], "s--", color=PAPER, label="paper (peak)")
    acc.set_ylabel("validation pixel accuracy")
    for key, label, style in (("wrong_background", "background", "o-"), ("wrong_cell", "cell", "s-"),
                              ("wrong_overall", "overall", "^--")):
        wrong.plot(table["weight"], table[key], style, label=label)
    wrong.set_ylabel("fraction of pixels wrong (ours)")
    for ax in (acc, wrong):
        ax.set_xscale("log")
        ax.set_xlabel("cell weight relative to background")
        ax.legend(frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def generalisation_figure(table: pd.DataFrame, baselines: dict[str, float | None]) -> plt.Figure:
    """Accuracy of each model on trainer validation, test (as is) and external (channels mapped)."""
    columns = (("trainer_val", "trainer (validation)"), ("test", "test (ER for cytoplasm)"),
               ("external", "external (mapped)"))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(table) + 2), 4.2))
    x = np.arange(len(table))
    width = 0.27
    for k, (key, label) in enumerate(columns):
        ax.bar(x + (k - 1) * width, table[key].fillna(0.0), width, label=label, color=f"C{k}")
        for i in np.flatnonzero(table[key].isna().to_numpy()):
            ax.text(x[i] + (k - 1) * width, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    for k, name in enumerate(("trainer", "test", "external")):
        if baselines.get(name) is not None:
            ax.axhline(baselines[name], color=f"C{k}", ls="--", lw=1, alpha=0.8)
    ax.set_xticks(x, [m.replace("_", " ") for m in table["model"]], rotation=40, ha="right")
    ax.set_ylabel("pixel accuracy (dashed: all background)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig
