"""Evaluate a trained model on an ingested store: per-stack and pooled metrics, as files and in MLflow.

Each stack is segmented whole, exactly as ``cellseg predict`` does it (the model's pixel scale,
normalisation and recorded input recipe, blended windows, probabilities at native pixels), and scored with the training engine's own metrics (``SegmentationMetrics``), so the numbers
mean the same as the validation curves. The summary pools pixels over all stacks, over stacks with
cells and over cell-free controls (where only background accuracy is defined). For a model with a Cell
class the predicted cells (instances.py) are also matched to true cells (instance_metrics.py): the
connected components of the masks, or label images given by stack id (``instances_from``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn

from cellseg.data.codes import CodePlan
from cellseg.data.schemas import (
    EVAL_INSTANCE_METRICS,
    EVAL_STACKS_COLUMNS,
    EVAL_STACKS_SCHEMA,
    EVAL_SUMMARY_COLUMNS,
    EVAL_SUMMARY_SCHEMA,
    validate,
)
from cellseg.data.readers import read_label_image
from cellseg.data.store import open_store
from cellseg.engine.metrics import SegmentationMetrics
from cellseg.errors import BadInputError
from cellseg.errors import tracking_errors as mlflow_errors
from cellseg.fileio import write_text
from cellseg.inference.instance_metrics import Matching, match, scores
from cellseg.inference.instances import boundary_class, cell_class, cell_diameter, instances_from_probabilities
from cellseg.inference.predict import (
    model_input,
    model_layout,
    model_normalisation,
    segment,
    store_stacks,
    write_png,
)
from cellseg.model.loading import TrainedModel
from cellseg.tracking.models import use_tracking_uri
from cellseg.tracking.runs import source_tags
from cellseg.visualize import overlay

STACKS_NAME = "per_stack"
SUMMARY_NAME = "summary"
SCOPES = ("all", "cells", "negatives")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass
class Evaluation:
    per_stack: pd.DataFrame
    summary: pd.DataFrame
    files: list[Path]
    store: Path
    content_hash: str


def _scores(metrics: SegmentationMetrics) -> dict[str, float]:
    values = metrics.compute()
    values["loss"] = values.pop("val_loss")
    return values


def evaluate(
    trained: TrainedModel,
    store_path: str | Path,
    out: str | Path,
    plan: CodePlan,
    tile: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    seed: int = 0,
    overlays: bool = False,
    factor: float = 1.0,
    instances_from: str | Path | None = None,
    diameter: float | None = None,
) -> Evaluation:
    """Score every stack of ``store_path``; write per_stack/summary tables (CSV + JSON) to ``out``.

    ``instances_from``: folder of true label images named by stack id (else the masks' connected
    components); ``diameter``: cell diameter in the stacks' pixels, for the predicted instances.
    """
    out = Path(out)
    store = open_store(store_path)
    num_classes = int(trained.metadata["num_classes"])
    if len(store.classes) != num_classes:
        raise BadInputError(
            f"{store_path}: {len(store.classes)} classes ({', '.join(store.classes)}), model {trained.uri} "
            f"predicts {num_classes}"
        )
    device = next(trained.model.parameters()).device
    loss = nn.CrossEntropyLoss()
    pooled = {scope: SegmentationMetrics(loss, num_classes, device) for scope in SCOPES}
    counts = dict.fromkeys(SCOPES, 0)
    cell = cell_class(trained, "--instances-from" if instances_from is not None else None)
    cell_size = cell_diameter(trained, diameter)
    if instances_from is not None and not Path(instances_from).is_dir():
        raise BadInputError(f"--instances-from {instances_from}: no such folder")
    truth = {"instance_truth": "label images" if instances_from is not None else "connected components"}
    matchings: dict[str, list[Matching]] = {scope: [] for scope in SCOPES}
    rows = []
    for i, stack in enumerate(store_stacks(Path(store_path), model_layout(trained), plan)):
        probs = segment(trained, stack, plan, tile, overlap, batch_size, seed, factor)
        mask = store.read_mask(i)
        target = torch.from_numpy(mask.astype("int64")).to(device)
        # blended probabilities sum to one per pixel, so their log is a valid logit for the metrics
        logits = probs.clamp_min(1e-8).log()[None]
        own = SegmentationMetrics(loss, num_classes, device)
        negative = bool(store.manifest["negative"].iloc[i])
        for metrics in (own, pooled["all"], pooled["negatives" if negative else "cells"]):
            metrics.update(logits, target[None])
        instance_scores = {}
        if cell is not None:
            true_cells = (_label_image(Path(instances_from), stack.name, mask.shape) if instances_from is not None
                          else ndimage.label(mask == cell)[0])
            labels = instances_from_probabilities(probs, cell, cell_size, boundary_class(trained))
            matching = match(true_cells, labels)
            for scope in ("all", "negatives" if negative else "cells"):
                matchings[scope].append(matching)
            instance_scores = {**truth, **scores([matching])}
        counts["all"] += 1
        counts["negatives" if negative else "cells"] += 1
        labels = probs.argmax(0)
        rows.append({
            "id": stack.name,
            "height": int(labels.shape[0]),
            "width": int(labels.shape[1]),
            "negative": negative,
            "foreground_fraction": float(store.manifest["foreground_fraction"].iloc[i]),
            "predicted_fraction": float((labels > 0).float().mean()),
            **_scores(own),
            **instance_scores,
        })
        if overlays:
            x = model_input(stack, plan, model_normalisation(trained), seed=seed)
            write_png(out / "overlays" / f"{stack.name}.png", overlay(x, labels.to(torch.uint8).cpu().numpy(), mask))
    summary_rows = [
        {"scope": scope, "stacks": counts[scope],
         "pixels": pooled[scope].pixels, **_scores(pooled[scope]),
         **({**truth, **scores(matchings[scope])} if cell is not None else {})}
        for scope in SCOPES if counts[scope]
    ]
    per_stack = validate(pd.DataFrame(rows, columns=EVAL_STACKS_COLUMNS), EVAL_STACKS_SCHEMA,
                         out / f"{STACKS_NAME}.csv")
    summary = validate(pd.DataFrame(summary_rows, columns=EVAL_SUMMARY_COLUMNS), EVAL_SUMMARY_SCHEMA,
                       out / f"{SUMMARY_NAME}.csv")
    files = [*_write_table(per_stack, out, STACKS_NAME), *_write_table(summary, out, SUMMARY_NAME)]
    return Evaluation(per_stack, summary, files, Path(store_path), store.content_hash)


def _label_image(folder: Path, stack_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The true label image of ``stack_id`` in ``folder``; missing or of another shape: one line."""
    path = next((p for p in (folder / f"{stack_id}{s}" for s in LABEL_SUFFIXES) if p.is_file()), None)
    if path is None:
        raise BadInputError(f"{folder}: no label image for stack {stack_id} ({stack_id}.tif, .tiff or .png)")
    labels = read_label_image(path)
    if labels.shape != shape:
        raise BadInputError(f"{path}: label image is {labels.shape[0]}x{labels.shape[1]}, "
                            f"stack {stack_id} is {shape[0]}x{shape[1]}")
    return labels


def _write_table(df: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """CSV (for people and DVC) and JSON records (NaN as null, for scripts)."""
    records = [{k: (None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
               for row in df.to_dict(orient="records")]
    return [
        write_text(out / f"{name}.csv", df.to_csv(index=False)),
        write_text(out / f"{name}.json", json.dumps(records, indent=2) + "\n"),
    ]


def log_evaluation(evaluation: Evaluation, trained: TrainedModel, settings: dict,
                   tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Log the evaluation as its own MLflow run, in the experiment of the run that trained the model
    (else ``experiment``), tagged with the model URI; returns the run id.

    Summary metrics are named ``eval_<metric>`` (all stacks) and ``eval_<scope>_<metric>``, instance
    metrics included (``eval_ap_50``, ...); when the model came from MLflow they are also linked to its
    LoggedModel.
    """
    import mlflow

    uri = use_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        experiment_id = _experiment_id(trained, experiment or "cellseg")
        tags = {**source_tags(),  # the command line as typed (MLflow's own names only the script's path)
                "cellseg.kind": "evaluation", "cellseg.model_uri": trained.uri,
                "cellseg.data_hash": evaluation.content_hash}
        if trained.run_id:
            tags["cellseg.model_run_id"] = trained.run_id
        if trained.model_id:  # immutable, unlike an alias in the URI
            tags["cellseg.model_id"] = trained.model_id
        metrics = {}
        for row in evaluation.summary.to_dict(orient="records"):
            prefix = "eval" if row["scope"] == "all" else f"eval_{row['scope']}"
            metrics.update({f"{prefix}_{k}": float(row[k]) for k in ("loss", "accuracy", "background_accuracy",
                                                                      "cell_accuracy", "dice", "iou",
                                                                      *EVAL_INSTANCE_METRICS)
                            if not pd.isna(row[k])})
        name = f"evaluate {trained.uri} on {evaluation.store.name}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
            mlflow.log_params({"data.store": str(evaluation.store), **settings})
            mlflow.log_metrics(metrics, model_id=trained.model_id)
            for path in evaluation.files:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
        return run.info.run_id


def _experiment_id(trained: TrainedModel, fallback: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    if trained.run_id:
        try:
            return mlflow.get_run(trained.run_id).info.experiment_id
        except MlflowException:
            pass  # a checkpoint from another tracking store: use the fallback experiment
    found = mlflow.get_experiment_by_name(fallback)
    return found.experiment_id if found else mlflow.create_experiment(fallback)
