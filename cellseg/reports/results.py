"""The reproduction pipeline's results folder, read into one object for the report.

``dvc.yaml`` writes the folder; each part is optional (``None`` when its stage has not run), so a
report can be made from whatever exists::

    RESULTS/qc/qc.csv                                   cellseg data qc (the trainer store)
    RESULTS/lr_find/lr_find.json                       cellseg lr-find
    RESULTS/compare/compare.csv, compare_runs.csv       cellseg compare
    RESULTS/sweep_ce/sweep_ce.csv                       cellseg sweep-ce
    RESULTS/tune/best.yaml, tune/runs/trials.csv        cellseg tune
    RESULTS/best/run/metrics.json                       cellseg train --config best.yaml
    RESULTS/generalisation/MODEL/test/summary.json      cellseg evaluate (as is)
    RESULTS/generalisation/MODEL/external/transfer.json cellseg transfer (+ summary.json when applicable)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellseg.errors import BadInputError
from cellseg.fileio import read_json
from cellseg.inference.transfer import read_record
from cellseg.run_folder import METRICS_NAME
from cellseg.yamlio import read_yaml

FIGURES = {  # pipeline figures copied next to the report: name in reports/figures -> path in RESULTS
    "qc.png": "qc/qc.png",
    "lr_find.png": "lr_find/lr_find.png",
    "compare.png": "compare/compare.png",
    "sweep_ce.png": "sweep_ce/sweep_ce.png",
    "sweep_ce_predictions.png": "sweep_ce/sweep_ce_predictions.png",
    "tune_history.png": "tune/runs/history.png",
}


@dataclass
class Scored:
    """One model on one dataset: the pooled 'all stacks' summary row, and the channel mapping if any."""

    summary: dict[str, Any] | None
    transfer: dict[str, Any] | None = None

    @property
    def accuracy(self) -> float:
        return _number(self.summary, "accuracy")


@dataclass
class Results:
    root: Path
    qc: pd.DataFrame | None = None
    lr_find: dict[str, Any] | None = None
    compare: pd.DataFrame | None = None
    compare_runs: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    tune_best: dict[str, Any] | None = None
    tune_trials: pd.DataFrame | None = None
    best_history: list[dict[str, Any]] | None = None
    generalisation: dict[str, dict[str, Scored]] = field(default_factory=dict)

    def figure(self, name: str) -> Path | None:
        path = self.root / FIGURES[name]
        return path if path.is_file() else None


def load_results(root: str | Path) -> Results:
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"--results {root}: no such folder (run the pipeline first: dvc repro)")
    return Results(
        root=root,
        qc=_csv(root / "qc" / "qc.csv"),
        lr_find=read_json(root / "lr_find" / "lr_find.json"),
        compare=_csv(root / "compare" / "compare.csv"),
        compare_runs=_csv(root / "compare" / "compare_runs.csv"),
        sweep=_csv(root / "sweep_ce" / "sweep_ce.csv"),
        tune_best=_yaml(root / "tune" / "best.yaml"),
        tune_trials=_csv(root / "tune" / "runs" / "trials.csv"),
        best_history=read_json(root / "best" / "run" / METRICS_NAME),
        generalisation=_generalisation(root / "generalisation"),
    )


def _generalisation(folder: Path) -> dict[str, dict[str, Scored]]:
    found: dict[str, dict[str, Scored]] = {}
    if not folder.is_dir():
        return found
    for model in sorted(p for p in folder.iterdir() if p.is_dir()):
        for dataset in sorted(p for p in model.iterdir() if p.is_dir()):
            rows = read_json(dataset / "summary.json") or []
            summary = next((r for r in rows if r.get("scope") == "all"), None)
            transfer = read_record(dataset)
            if summary is not None or transfer is not None:
                found.setdefault(model.name, {})[dataset.name] = Scored(summary, transfer)
    return found


def majority_baseline(store_path: str | Path, ids: list[str] | None = None) -> float | None:
    """Accuracy of predicting background everywhere: the background share of the pixels (of ``ids``)."""
    from cellseg.data.store import open_store

    path = Path(store_path)
    if not path.is_dir():
        return None
    manifest = open_store(path).manifest
    if ids is not None:
        manifest = manifest[manifest["id"].isin(ids)]
    pixels = (manifest["height"] * manifest["width"]).astype(float)
    if pixels.sum() == 0:
        return None
    return float(1.0 - (manifest["foreground_fraction"] * pixels).sum() / pixels.sum())


def _number(row: dict[str, Any] | None, key: str) -> float:
    value = None if row is None else row.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _yaml(path: Path) -> dict[str, Any] | None:
    return read_yaml(path) if path.is_file() else None
