"""Instance metrics: how well predicted cells match true cells, in the field's two conventions.

A true and a predicted cell match when their IoU reaches the threshold; the matching is one-to-one and
maximises the number of matches, then their summed IoU (``linear_sum_assignment``, as cellpose and
StarDist do it). Per image: TP matches, FP unmatched predictions, FN unmatched true cells.

- ``ap_50`` / ``ap_75`` / ``ap_90``: cellpose's per-image "average precision" TP / (TP + FP + FN) at IoU
  0.5 / 0.75 / 0.9; over a dataset, the mean over images (images without cells in truth and prediction,
  where it is 0 / 0, are left out).
- ``precision_50``, ``recall_50``, ``f1_50``, ``panoptic_quality_50``: StarDist's ``matching`` at IoU 0.5;
  over a dataset ``matching_dataset`` (TP, FP, FN and matched IoU pooled over images). Panoptic quality is
  the summed IoU of the matches / (TP + FP / 2 + FN / 2).
- ``split_cells``: true cells that hold at least half of each of two or more predicted cells.
  ``merged_cells``: true cells that lie at least half inside a predicted cell which also holds at least
  half of another true cell (two touching cells predicted as one: 2 merged cells).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

THRESHOLDS = (0.5, 0.75, 0.9)


@dataclass(frozen=True)
class Matching:
    """One image's counts: cells, TP per threshold, summed IoU of the IoU-0.5 matches, splits, merges."""

    true_cells: int
    predicted_cells: int
    tp: tuple[int, ...]  # per THRESHOLDS
    matched_iou: float
    split_cells: int
    merged_cells: int


def match(truth: np.ndarray, prediction: np.ndarray) -> Matching:
    """Match two label images of the same shape (0 = background, any other ids)."""
    from skimage.segmentation import relabel_sequential

    t, p = (relabel_sequential(np.asarray(a))[0].ravel() for a in (truth, prediction))
    true_area, pred_area = np.bincount(t)[1:], np.bincount(p)[1:]
    both = (t > 0) & (p > 0)
    table = sparse.coo_array((np.ones(int(both.sum()), np.int64), (t[both] - 1, p[both] - 1)),
                             shape=(len(true_area), len(pred_area)))
    table.sum_duplicates()  # contingency table: overlap (pixels) of each overlapping pair
    rows, cols, overlap = table.row, table.col, table.data
    iou = overlap / (true_area[rows] + pred_area[cols] - overlap)
    tp, sums = zip(*(_assign(rows, cols, iou, threshold) for threshold in THRESHOLDS))
    return Matching(len(true_area), len(pred_area), tp, sums[0],
                    _split(rows, overlap / pred_area[cols]), _merged(cols, overlap / true_area[rows]))


def _assign(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, threshold: float) -> tuple[int, float]:
    """(matches, their summed IoU) at ``threshold``: cellpose's and StarDist's cost, on the pairs that
    can match (the others would not count anyway)."""
    ok = iou >= threshold
    if not ok.any():
        return 0, 0.0
    rows, cols = (np.unique(ids[ok], return_inverse=True)[1] for ids in (rows, cols))
    pairs = np.zeros((rows.max() + 1, cols.max() + 1))
    pairs[rows, cols] = iou[ok]
    i, j = linear_sum_assignment(-(pairs >= threshold).astype(float) - pairs / (2 * min(pairs.shape)))
    matched = pairs[i, j] >= threshold
    return int(matched.sum()), float(pairs[i, j][matched].sum())


def _split(rows: np.ndarray, share_of_prediction: np.ndarray) -> int:
    holders = np.bincount(rows[share_of_prediction >= 0.5])  # per true cell: predictions at least half inside
    return int((holders >= 2).sum())


def _merged(cols: np.ndarray, share_of_truth: np.ndarray) -> int:
    held = np.bincount(cols[share_of_truth >= 0.5])  # per prediction: true cells at least half inside it
    return int(held[held >= 2].sum())


def scores(matchings: Sequence[Matching]) -> dict[str, float | int]:
    """The metrics of the module docstring over ``matchings`` (one image or a dataset; NaN where 0 / 0)."""
    n_true = sum(m.true_cells for m in matchings)
    n_pred = sum(m.predicted_cells for m in matchings)
    ap = {}
    for k, threshold in enumerate(THRESHOLDS):
        per_image = [_ratio(m.tp[k], m.true_cells + m.predicted_cells - m.tp[k]) for m in matchings]
        defined = [v for v in per_image if not np.isnan(v)]
        ap[f"ap_{round(100 * threshold)}"] = float(np.mean(defined)) if defined else np.nan
    tp = sum(m.tp[0] for m in matchings)
    fp, fn = n_pred - tp, n_true - tp
    return {
        "true_cells": n_true, "predicted_cells": n_pred, **ap,
        "precision_50": _ratio(tp, tp + fp), "recall_50": _ratio(tp, tp + fn),
        "f1_50": _ratio(2 * tp, 2 * tp + fp + fn),
        "panoptic_quality_50": _ratio(sum(m.matched_iou for m in matchings), tp + fp / 2 + fn / 2),
        "split_cells": sum(m.split_cells for m in matchings), "merged_cells": sum(m.merged_cells for m in matchings),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else np.nan
