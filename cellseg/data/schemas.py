"""Pandera schemas for the tables cellseg reads and writes, one section per table.

Every table that crosses a file boundary is validated here, so a hand-edited or truncated CSV
fails with one line naming the file and the offending column instead of deep in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors
import pandera.pandas as pa

from cellseg.errors import BadInputError

# --- manifest.csv (one row per stack of a Zarr store; written by ingest, read by Store) --------

_SHA256 = r"^[0-9a-f]{64}$"

MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "key": pa.Column(str, pa.Check.str_matches(r"^\d{5,}$"), unique=True),
        "source": pa.Column(str),
        "height": pa.Column(int, pa.Check.gt(0)),
        "width": pa.Column(int, pa.Check.gt(0)),
        "channels": pa.Column(int, pa.Check.gt(0)),
        "layout": pa.Column(str, pa.Check.str_length(min_value=1)),
        "negative": pa.Column(bool),
        "foreground_fraction": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "content_hash": pa.Column(str, pa.Check.str_matches(_SHA256)),
    },
    checks=pa.Check(
        lambda df: df["negative"] == (df["foreground_fraction"] == 0.0),
        error="negative must be true exactly when foreground_fraction is 0",
    ),
    strict=True,
    ordered=True,
    coerce=True,
    name="manifest",
)
MANIFEST_COLUMNS = list(MANIFEST_SCHEMA.columns)


# --- ROI tables (subimage generation) ---------------------------------------------------------
# NAME--labels.txt beside each large stack, written by an ImageJ macro: one box per row, X/Y the
# box centre in pixels. Extra columns (e.g. ImageJ's row numbers) are allowed and ignored.

ROI_SCHEMA = pa.DataFrameSchema(
    {
        "Class": pa.Column(str),
        "X": pa.Column(float),
        "Y": pa.Column(float),
        "W": pa.Column(float, pa.Check.gt(0)),
        "H": pa.Column(float, pa.Check.gt(0)),
    },
    coerce=True,
    name="ROI",
)

# OUT/rois.csv: one row per subimage written (boxes clamped to the image; x1/y1 exclusive).
SUBIMAGE_SCHEMA = pa.DataFrameSchema(
    {
        "source": pa.Column(str, pa.Check.str_length(min_value=1)),
        "roi": pa.Column(int, pa.Check.ge(0)),
        "class": pa.Column(str),
        "x0": pa.Column(int, pa.Check.ge(0)),
        "y0": pa.Column(int, pa.Check.ge(0)),
        "x1": pa.Column(int),
        "y1": pa.Column(int),
        "image": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "preview": pa.Column(str),
        "mask": pa.Column(str, nullable=True),
    },
    checks=[
        pa.Check(lambda df: df["x1"] > df["x0"], error="x1 must be greater than x0"),
        pa.Check(lambda df: df["y1"] > df["y0"], error="y1 must be greater than y0"),
    ],
    strict=True,
    ordered=True,
    coerce=True,
    name="subimage summary",
)
SUBIMAGE_COLUMNS = list(SUBIMAGE_SCHEMA.columns)


# --- evaluation tables (cellseg evaluate: OUT/per_stack.csv|json, OUT/summary.csv|json) -----------
# Metrics as in training validation (engine/metrics.py); NaN where undefined (e.g. cell accuracy of
# a cell-free control).

_FRACTION = pa.Check.in_range(0.0, 1.0)
_EVAL_METRICS = {
    "loss": pa.Column(float, pa.Check.ge(0.0), nullable=True),
    **{name: pa.Column(float, _FRACTION, nullable=True)
       for name in ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou")},
}

# Instance metrics (inference/instance_metrics.py), empty when the model has no cell class. Truth cells are
# connected components of the masks or label images (instance_truth says which). ap_*: cellpose's
# "average precision" TP / (TP + FP + FN) at IoU 0.5 / 0.75 / 0.9 (summary: mean over stacks that have
# cells in truth or prediction); precision/recall/f1/panoptic_quality_50: StarDist's matching at IoU 0.5
# (summary: matching_dataset, pooled over stacks); split/merged cells: see instance_metrics.py.
_COUNT = pa.Column("Int64", pa.Check.ge(0), nullable=True)
EVAL_INSTANCE_METRICS = ["ap_50", "ap_75", "ap_90", "precision_50", "recall_50", "f1_50", "panoptic_quality_50",
                         "split_cells", "merged_cells"]
_EVAL_INSTANCES = {
    "instance_truth": pa.Column(str, nullable=True),
    "true_cells": _COUNT,
    "predicted_cells": _COUNT,
    **{name: _COUNT if name.endswith("_cells") else pa.Column(float, _FRACTION, nullable=True)
       for name in EVAL_INSTANCE_METRICS},
}

EVAL_STACKS_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "height": pa.Column(int, pa.Check.gt(0)),
        "width": pa.Column(int, pa.Check.gt(0)),
        "negative": pa.Column(bool),
        "foreground_fraction": pa.Column(float, _FRACTION),
        "predicted_fraction": pa.Column(float, _FRACTION),
        **_EVAL_METRICS,
        **_EVAL_INSTANCES,
    },
    strict=True,
    ordered=True,
    coerce=True,
    name="evaluation per-stack",
)
EVAL_STACKS_COLUMNS = list(EVAL_STACKS_SCHEMA.columns)

EVAL_SUMMARY_SCHEMA = pa.DataFrameSchema(
    {
        "scope": pa.Column(str, pa.Check.isin(["all", "cells", "negatives"]), unique=True),
        "stacks": pa.Column(int, pa.Check.gt(0)),
        "pixels": pa.Column(int, pa.Check.gt(0)),
        **_EVAL_METRICS,
        **_EVAL_INSTANCES,
    },
    strict=True,
    ordered=True,
    coerce=True,
    name="evaluation summary",
)
EVAL_SUMMARY_COLUMNS = list(EVAL_SUMMARY_SCHEMA.columns)


# --- strategy comparison (cellseg compare: OUT/compare_runs.csv, OUT/compare.csv) ---------------
# compare_runs.csv: one row per run and epoch (the curves); compare.csv: per strategy, mean and
# sample sd (NaN for one replicate) over replicates of the final epoch's validation metrics.

_COMPARE_METRICS = ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "val_loss")


def _metric_check(name: str) -> list[pa.Check]:
    return [pa.Check.ge(0.0)] if name == "val_loss" else [_FRACTION]


COMPARE_RUNS_SCHEMA = pa.DataFrameSchema(
    {
        "strategy": pa.Column(str, pa.Check.str_length(min_value=1)),
        "replicate": pa.Column(int, pa.Check.ge(1)),
        "seed": pa.Column(int),
        "epoch": pa.Column(int, pa.Check.ge(1)),
        "phase": pa.Column(int, pa.Check.ge(1)),
        "lr": pa.Column(float, nullable=True),
        "train_loss": pa.Column(float, nullable=True),
        **{name: pa.Column(float, _metric_check(name), nullable=True) for name in _COMPARE_METRICS},
        "run_dir": pa.Column(str),
        "mlflow_run_id": pa.Column(str, nullable=True),
    },
    unique=["strategy", "replicate", "epoch"],
    strict=True,
    ordered=True,
    coerce=True,
    name="comparison runs",
)
COMPARE_RUNS_COLUMNS = list(COMPARE_RUNS_SCHEMA.columns)

COMPARE_SUMMARY_SCHEMA = pa.DataFrameSchema(
    {
        "strategy": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "n": pa.Column(int, pa.Check.ge(1)),
        "epochs": pa.Column(int, pa.Check.ge(1)),
        **{f"{name}_{stat}": pa.Column(float, _metric_check(name), nullable=True)
           for name in _COMPARE_METRICS for stat in ("mean", "sd")},
    },
    strict=True,
    ordered=True,
    coerce=True,
    name="comparison summary",
)
COMPARE_SUMMARY_COLUMNS = list(COMPARE_SUMMARY_SCHEMA.columns)


# --- CE-weight sweep (cellseg sweep-ce: DIR/sweep_ce.csv) -----------------------------------------
# One row per weight w (ce_weights = [1, w]): final validation metrics of that weight's model and the
# fractions of wrong background / cell / all pixels (1 - the matching accuracy); NaN where a class is
# absent from the validation split.

SWEEP_CE_SCHEMA = pa.DataFrameSchema(
    {
        "weight": pa.Column(float, pa.Check.gt(0.0), unique=True),
        "strategy": pa.Column(str, pa.Check.str_length(min_value=1)),
        **{name: pa.Column(float, _FRACTION, nullable=True)
           for name in ("wrong_background", "wrong_cell", "wrong_overall", "accuracy", "background_accuracy",
                        "cell_accuracy", "dice", "iou")},
        "val_loss": pa.Column(float, pa.Check.ge(0.0), nullable=True),
        "peak_accuracy": pa.Column(float, _FRACTION, nullable=True),
        "epochs": pa.Column(int, pa.Check.ge(0)),
        "run_id": pa.Column(str, nullable=True),  # the child MLflow run (empty when not tracked)
        "run_dir": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=True,
    ordered=True,
    coerce=True,
    name="CE-weight sweep",
)
SWEEP_CE_COLUMNS = list(SWEEP_CE_SCHEMA.columns)


# --- per-cell measurements (cellseg predict --instances: OUT/cells/NAME.csv) ----------------------
# One row per label of OUT/labels/NAME.ome.tif: area (µm² empty unless the pixel size is given), centroid,
# bounding box (y1/x1 exclusive), eccentricity, and the mean/max raw intensity of each channel the model
# reads, as mean_<channel name> / max_<channel name>.

CELLS_SCHEMA = pa.DataFrameSchema(
    {
        "label": pa.Column(int, pa.Check.gt(0), unique=True),
        "area_px": pa.Column(int, pa.Check.gt(0)),
        "area_um2": pa.Column(float, pa.Check.gt(0.0), nullable=True),
        "centroid_y": pa.Column(float, pa.Check.ge(0.0)),
        "centroid_x": pa.Column(float, pa.Check.ge(0.0)),
        **{name: pa.Column(int, pa.Check.ge(0)) for name in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")},
        "eccentricity": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        r"^(mean|max)_.+$": pa.Column(float, pa.Check.ge(0.0), regex=True),
    },
    checks=[
        pa.Check(lambda df: df["bbox_y1"] > df["bbox_y0"], error="bbox_y1 must be greater than bbox_y0"),
        pa.Check(lambda df: df["bbox_x1"] > df["bbox_x0"], error="bbox_x1 must be greater than bbox_x0"),
    ],
    strict=True,
    coerce=True,
    name="cells",
)


# --- qc.csv (`cellseg data qc`): one row per store and channel, the medians over its stacks with cells
# (definitions in cellseg/data/qc.py). A constant channel has no statistic but saturation (NaN elsewhere).

QC_SCHEMA = pa.DataFrameSchema(
    {
        "store": pa.Column(str, pa.Check.str_length(min_value=1)),
        "channel": pa.Column(str, pa.Check.str_length(min_value=1)),
        "interior_contrast": pa.Column(float, pa.Check.ge(0.0), nullable=True),
        "edge_contrast": pa.Column(float, pa.Check.ge(0.0), nullable=True),
        "otsu_dice": pa.Column(float, pa.Check.in_range(0.0, 1.0), nullable=True),
        "snr": pa.Column(float, pa.Check.ge(0.0), nullable=True),
        "floor": pa.Column(float, pa.Check.in_range(0.0, 1.0), nullable=True),
        "saturated": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "stacks": pa.Column(int, pa.Check.gt(0)),
        "constant": pa.Column(bool),
    },
    unique=["store", "channel"],
    strict=True,
    ordered=True,
    coerce=True,
    name="qc",
)


# --- helpers ----------------------------------------------------------------------------------


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, where: str | Path) -> pd.DataFrame:
    """Validate ``df``; a failure becomes a one-line BadInputError naming ``where``."""
    try:
        return schema.validate(df, lazy=False)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        if isinstance(exc, pandera.errors.SchemaErrors) and exc.schema_errors:
            exc = exc.schema_errors[0]  # coercion failures come wrapped, as a JSON report
        first = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{where}: invalid {schema.name} table ({first}{_first_failure(exc)})") from None


def _first_failure(exc: Exception) -> str:
    """' e.g. 'abc' in row 3' when the first line of pandera's message does not show the value."""
    cases = getattr(exc, "failure_cases", None)
    if "failure cases:" in str(exc) or not isinstance(cases, pd.DataFrame) or cases.empty:
        return ""
    case = cases.iloc[0]
    row = case.get("index")
    where = f" in row {int(row) + 1}" if isinstance(row, (int, np.integer)) else ""
    return f" e.g. {case.get('failure_case')!r}{where}"


def _text_columns(schema: pa.DataFrameSchema) -> dict[str, type]:
    """Columns to read as text, so ids like "00012" keep their zeros."""
    return {name: str for name, col in schema.columns.items() if str(col.dtype).startswith("str")}


def read_csv(path: str | Path, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Read and validate a CSV table; missing or unparsable files are BadInputError."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: {schema.name} table not found")
    try:
        df = pd.read_csv(path, dtype=_text_columns(schema), keep_default_na=False, na_values=[""])
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise BadInputError(f"{path}: cannot read {schema.name} table ({exc})") from None
    return validate(df, schema, path)
