"""Cross-entropy class-weight sweep (as in the paper): one model per weight, the trade-off between wrong
background and wrong cell pixels, and the same validation stacks predicted by every model.

The **weight** ``w`` is the cross-entropy weight of the cell class relative to background:
``train.ce_weights = [1, w]``. ``w > 1`` makes a missed cell pixel cost more than a false one, so
the model grows its cells (fewer wrong cell pixels, more wrong background pixels); ``w < 1`` the
reverse. Every model is trained by the engine's ``fit`` with the same config otherwise — same
seed, so the same initial weights and draws — on one identical split (``DIR/split.json``), each
in its own run folder ``DIR/weight-<w>``, as a child of one MLflow parent run tagged with its
weight and strategy. Metrics are the final epoch's validation metrics (``peak_accuracy`` is the
best epoch's): wrong background = 1 - background accuracy (background pixels predicted as cell,
over background pixels), wrong cell = 1 - cell accuracy, wrong overall = 1 - pixel accuracy.

``resume=True`` continues a sweep in ``DIR``: finished weights are only re-read, an interrupted
one continues from its checkpoint, and the parent run (``DIR/sweep_ce_run.json``) is reopened.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellseg.config import Config
from cellseg.data.schemas import SWEEP_CE_SCHEMA, validate
from cellseg.data.split import Split, make_split
from cellseg.engine.checkpoint import checkpoint_path
from cellseg.engine.loop import fit
from cellseg.errors import BadInputError, ConfigError
from cellseg.experiments.inputs import check_inputs
from cellseg.experiments.progress import RunsProgress
from cellseg.fileio import write_text

CSV_NAME, PNG_NAME, PREDICTIONS_NAME = "sweep_ce.csv", "sweep_ce.png", "sweep_ce_predictions.png"
RUN_NAME, SPLIT_NAME = "sweep_ce_run.json", "split.json"
WEIGHT_LABEL = "cell weight relative to background (ce_weights = [1, w])"


@dataclass
class SweepResult:
    table: pd.DataFrame
    csv: Path
    png: Path
    predictions: Path
    run_id: str | None = None


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
    resume: bool = False,
    track: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Train one model per weight (see module doc); write ``DIR/sweep_ce.csv``, ``sweep_ce.png`` and
    ``sweep_ce_predictions.png`` and log them to the parent run."""
    from cellseg.plots import error_fractions, save_figure

    out = Path(out)
    weights = check_weights(weights)
    if config.model.num_classes != 2:
        raise ConfigError(f"model.num_classes {config.model.num_classes}: the CE-weight sweep is for background/cell")
    _check_fresh(out, weights, resume)
    split = _split(config, out, resume)
    strategy = (config.data.codes is None and config.data.strategy) or "custom"
    rows, predictions = [], []
    with _parent(track, config, out, strategy, weights, resume) as parent, \
            RunsProgress(len(weights), "weights", enabled=progress) as bar:
        for weight in weights:
            folder = weight_folder(out, weight)
            examples_cb = _Predictions(examples)
            callbacks: list[Any] = [examples_cb, bar.epochs()]
            child = None
            if parent is not None:
                child = parent.child_callback(
                    tags={"weight": f"{weight:g}", "strategy": strategy, "cellseg.kind": "sweep-ce"},
                    run_name=f"ce-w{weight:g}", register=False, log_model=False)
                callbacks.append(child)
            cfg = config.with_overrides({"train.ce_weights": [1.0, weight]})
            result = fit(cfg, folder, resume=checkpoint_path(folder).is_file(), split=split, callbacks=callbacks)
            rows.append(_row(weight, strategy, result, child.run_id if child is not None else None))
            predictions.append(examples_cb)
            row = rows[-1]
            bar.done(f"w = {weight:g}: wrong background {row['wrong_background']:.3f} · wrong cell "
                     f"{row['wrong_cell']:.3f} · accuracy {row['accuracy']:.4f} ({folder})")
        table = validate(pd.DataFrame(rows, columns=list(SWEEP_CE_SCHEMA.columns)), SWEEP_CE_SCHEMA, out / CSV_NAME)
        csv = write_text(out / CSV_NAME, table.to_csv(index=False))
        png = save_figure(error_fractions(table.to_dict("records"), WEIGHT_LABEL), out / PNG_NAME)
        grid = save_figure(_predictions_figure(weights, predictions, split.val), out / PREDICTIONS_NAME)
        if parent is not None:
            best = table.loc[table["accuracy"].idxmax()] if table["accuracy"].notna().any() else None
            if best is not None:
                parent.log_metrics({"best_weight": best["weight"], "best_accuracy": best["accuracy"]})
            parent.log_artifacts([csv, png, grid])
    return SweepResult(table, csv, png, grid, parent.run_id if parent is not None else None)


def _check_fresh(out: Path, weights: list[float], resume: bool) -> None:
    if resume:
        return
    taken = [weight_folder(out, w).name for w in weights if checkpoint_path(weight_folder(out, w)).is_file()]
    if taken or (out / RUN_NAME).is_file():
        raise BadInputError(f"{out}: already holds a CE-weight sweep ({', '.join(taken) or RUN_NAME}); "
                            "pass --resume to continue it or choose another --out")


def _split(config: Config, out: Path, resume: bool) -> Split:
    """The one split every weight trains on: the sweep's own on resume, else a new seeded one (bad
    data or codes fail here, before any run is opened)."""
    store = check_inputs([config])
    if resume and (out / SPLIT_NAME).is_file():
        split = Split.load(out / SPLIT_NAME)
    else:
        split = make_split(store, config.data.val_fraction, config.seed)
    if not split.val:
        raise ConfigError(f"data.val_fraction {config.data.val_fraction}: the sweep compares the models on "
                          "the validation split, which is empty")
    split.save(out / SPLIT_NAME)
    return split


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


@contextlib.contextmanager
def _parent(track: bool, config: Config, out: Path, strategy: str, weights: list[float],
            resume: bool) -> Iterator[Any]:
    """The sweep's MLflow parent run (reopened on resume), its id kept in ``DIR/sweep_ce_run.json``."""
    if not track:
        yield None
        return
    from cellseg.tracking.studies import tracked_run

    state = out / RUN_NAME
    run_id = json.loads(state.read_text())["run_id"] if resume and state.is_file() else None
    with tracked_run(f"sweep-ce {out.name}", "sweep-ce", config.tracking.uri, config.tracking.experiment,
                     tags={"strategy": strategy}, run_id=run_id) as run:
        write_text(state, json.dumps({"run_id": run.run_id, "tracking_uri": run.uri}) + "\n")
        params = {k: v for k, v in config.flat().items() if k != "train.ce_weights"}
        run.log_params({**params, "sweep.weights": ",".join(f"{w:g}" for w in weights)})
        yield run

