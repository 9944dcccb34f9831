"""Per-epoch instance metrics on the validation stacks, for stores that keep their true cells.

A store "has instances" when ingest kept a label image per stack (``Store.instances``: from the input's
``Instances/`` label images, or the connected components a ``--classes background,cell,boundary``
ingest derived its Boundary class from; see data/store.py). Then, after a validation (every
``train.instance_metrics_every`` epochs and at the end of each phase), every
validation stack of this process is segmented whole exactly as ``cellseg predict --instances`` does it
(the model's own pixel scale, normalisation and codes: ``inference.predict.segment``; cells from the
Cell, and Boundary when the model has one, classes: ``inference.instances``) and matched to its true
cells (``inference.instance_metrics``). cellpose's AP@0.5 — TP / (TP + FP + FN) per image at IoU 0.5,
averaged over the images where it is defined — joins the epoch's metrics as ``val_ap_50`` (history,
metrics.json, MLflow), the same number ``cellseg evaluate`` reports as ``ap_50``.

Stores without instances, and models without a Cell class, add nothing. The cost is one whole-image
inference per validation stack per epoch (validation stacks are few and small); in a distributed run
each process scores its shard of them and the sums are added up.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cellseg.engine import distributed

METRIC = "val_ap_50"


@torch.no_grad()
def instance_metrics(session: Any) -> dict[str, float]:
    """``{"val_ap_50": ...}`` for a ``TrainingSession`` whose store has instances, else ``{}``."""
    store = session.store
    if not store.instances:
        return {}
    from cellseg.inference.instance_metrics import match, scores
    from cellseg.inference.instances import boundary_class, cell_class, cell_diameter, instances_from_probabilities
    from cellseg.inference.predict import Stack, input_plan, segment
    from cellseg.model.loading import TrainedModel

    trained = TrainedModel(session.model, session.metadata(), uri=f"{session.run_dir} (training)")
    cell = cell_class(trained)
    if cell is None:
        return {}
    plan = input_plan(trained)  # the model's codes with the run's dropout off, as at inference
    boundary, diameter = boundary_class(trained), cell_diameter(trained)
    sums = torch.zeros(2, dtype=torch.float64, device=session.device)  # summed AP, images where it is defined
    session.model.eval()
    for i in session.world.shard(session.split.indices(store)[1]):
        stack = Stack(store.ids[i], f"{store.path}#{store.ids[i]}", store.read_image(i, plan.needed_channels))
        probs = segment(trained, stack, plan, batch_size=session.config.train.batch_size, seed=session.config.seed)
        cells = instances_from_probabilities(probs, cell, diameter, boundary)
        ap = scores([match(store.read_instances(i), cells)])["ap_50"]
        if not math.isnan(ap):
            sums += torch.tensor([ap, 1.0], dtype=torch.float64, device=session.device)
    total, images = distributed.all_reduce_sum(sums).tolist()
    return {METRIC: total / images if images else math.nan}
