"""Cross-entropy class-weight sweep (as in the paper): one model per weight, the trade-off between wrong
background and wrong cell pixels, and the same validation stacks predicted by every model.

The **weight** ``w`` is the cross-entropy weight of the cell class relative to background:
``train.ce_weights = [1, w]``. ``w > 1`` makes a missed cell pixel cost more than a false one, so
the model grows its cells (fewer wrong cell pixels, more wrong background pixels); ``w < 1`` the
reverse. Every model is trained by the engine's ``fit`` with the same config otherwise — same
seed, so the same initial weights and draws — on one identical split (``DIR/split.json``), each
in its own run folder ``DIR/weight-<w>``, as a child run tagged with its weight and strategy. Metrics are the final epoch's validation metrics (``peak_accuracy`` is the
best epoch's): wrong background = 1 - background accuracy (background pixels predicted as cell,
over background pixels), wrong cell = 1 - cell accuracy, wrong overall = 1 - pixel accuracy.

Split, parent run (tagged ``sweep``: ``default_name(DIR)``) and resume are the runner's
(cellseg.experiments.runner): re-running a sweep into ``DIR`` continues it — finished weights are
only re-read, an interrupted one continues from its checkpoint, under the same parent run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellseg.config import Config
from cellseg.data.schemas import SWEEP_CE_SCHEMA, validate
from cellseg.errors import ConfigError
from cellseg.experiments.runner import default_name, experiment, plan
from cellseg.fileio import write_text

CSV_NAME, PNG_NAME, PREDICTIONS_NAME = "sweep_ce.csv", "sweep_ce.png", "sweep_ce_predictions.png"
KIND = "sweep-ce"
WEIGHT_LABEL = "cell weight relative to background (ce_weights = [1, w])"


@dataclass
class SweepResult:
    table: pd.DataFrame
    csv: Path
    png: Path
    predictions: Path
    run_id: str  # the parent MLflow run


def weight_folder(out: str | Path, weight: float) -> Path:
    return Path(out) / f"weight-{weight:g}"


def check_weights(weights: Sequence[float]) -> list[float]:
    weights = [float(w) for w in weights]
    if not weights:
        raise ConfigError("--weights: give at least one weight, e.g. 0.01,0.1,1,10,100")
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"--weights {','.join(f'{w:g}' for w in weights)}: weights must be positive numbers")
    if len({f"{w:g}" for w in weights}) != len(weights):
        raise ConfigError(f"--weights {','.join(f'{w:g}' for w in weights)}: a weight is given twice")
    return weights


def sweep_ce(
    config: Config,
    out: str | Path,
    weights: Sequence[float] = (0.01, 0.1, 1, 10, 100),
    examples: int = 3,
    progress: bool = True,
) -> SweepResult:
    """Train one model per weight (see module doc); write ``DIR/sweep_ce.csv``, ``sweep_ce.png`` and
    ``sweep_ce_predictions.png`` and log them to the parent run."""
    from cellseg.plots import error_fractions, save_figure

    out = Path(out)
    weights = check_weights(weights)
    if config.model.num_classes != 2:
        raise ConfigError(f"model.num_classes {config.model.num_classes}: the CE-weight sweep is for background/cell")
    planned = plan([config], out, "use a new --out")
    strategy = config.data.label
    params = {**{k: v for k, v in config.flat().items() if k != "train.ce_weights"},
              "sweep.weights": ",".join(f"{w:g}" for w in weights)}
    rows, predictions = [], []
    with experiment(planned, KIND, "sweep", default_name(out), len(weights), "weights", params,
                    tags={"strategy": strategy}, show_progress=progress) as runner:
        for weight in weights:
            folder = weight_folder(out, weight)
            examples_cb = _Predictions(examples)
            child = runner.child(f"ce-w{weight:g}", {"weight": f"{weight:g}", "strategy": strategy})
            cfg = config.with_overrides({"train.ce_weights": [1.0, weight]})
            result = runner.fit(cfg, folder, child, [examples_cb])
            rows.append(_row(weight, strategy, result, child.run_id))
            predictions.append(examples_cb)
            row = rows[-1]
            runner.done(f"w = {weight:g}: wrong background {row['wrong_background']:.3f} · wrong cell "
                        f"{row['wrong_cell']:.3f} · accuracy {row['accuracy']:.4f} ({folder})")
        table = validate(pd.DataFrame(rows, columns=list(SWEEP_CE_SCHEMA.columns)), SWEEP_CE_SCHEMA, out / CSV_NAME)
        csv = write_text(out / CSV_NAME, table.to_csv(index=False))
        png = save_figure(error_fractions(table.to_dict("records"), WEIGHT_LABEL), out / PNG_NAME)
        grid = save_figure(_predictions_figure(weights, predictions, planned.split.val), out / PREDICTIONS_NAME)
        if table["accuracy"].notna().any():
            best = table.loc[table["accuracy"].idxmax()]
            runner.parent.log_metrics({"best_weight": best["weight"], "best_accuracy": best["accuracy"]})
        runner.parent.log_artifacts([csv, png, grid])
    return SweepResult(table, csv, png, grid, runner.parent.run_id)


def _row(weight: float, strategy: str, result, run_id: str | None) -> dict[str, Any]:
    final = result.final
    accuracies = [h["accuracy"] for h in result.history if h.get("accuracy") is not None]
    return {
        "weight": weight,
        "strategy": strategy,
        "wrong_background": 1 - final["background_accuracy"],
        "wrong_cell": 1 - final["cell_accuracy"],
        "wrong_overall": 1 - final["accuracy"],
        **{k: final[k] for k in ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "val_loss")},
        "peak_accuracy": float(np.nanmax(accuracies)) if accuracies else np.nan,
        "epochs": len(result.history),
        "run_id": run_id or "",
        "run_dir": str(result.run_dir),
    }


class _Predictions:
    """Engine callback: at the end of a fit, the trained model's predictions on the first validation stacks."""

    def __init__(self, n: int):
        self.n = n
        self.images: list[np.ndarray] = []  # input as RGB with the truth outline
        self.overlays: list[np.ndarray] = []  # … and the prediction's outline
        self.accuracy: list[float] = []

    def on_fit_end(self, session, result) -> None:
        from cellseg.visualize import overlay

        for x, y in session.val_source.epoch(0):  # the same draws for every weight (same seed and split)
            prediction = session.predict(x)
            for i in range(len(x)):
                if len(self.images) == self.n:
                    return
                self.images.append(overlay(x[i], None, y[i]))
                self.overlays.append(overlay(x[i], prediction[i], y[i], fill=0.35))
                self.accuracy.append(float((prediction[i] == y[i]).float().mean()))


def _predictions_figure(weights: list[float], runs: list[_Predictions], ids: list[str]):
    from cellseg.plots import image_table

    first = runs[0]
    rows = [[first.images[r], *(run.overlays[r] for run in runs)] for r in range(len(first.images))]
    captions = [["ground truth", *(f"accuracy {100 * run.accuracy[r]:.1f}%" for run in runs)] for r in range(len(rows))]
    return image_table(rows, ["", *(f"w = {w:g}" for w in weights)], captions, ids,
                       heading=f"{WEIGHT_LABEL} — truth outlined green, prediction tinted magenta")
