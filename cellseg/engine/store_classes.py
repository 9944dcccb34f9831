"""The model's classes follow the training store's: a store ingested with a third class trains a 3-class model.

``cellseg data ingest --classes background,cell,boundary`` records Background, Cell, Boundary as the
store's classes. A config that leaves ``model.num_classes`` at its default (2) then trains with as many
classes as the store has, and the model records their names (``TrainingSession.metadata``), which is
how ``predict --instances`` and ``evaluate`` find its Boundary class. Cross-entropy weights given for
background and cell (the default ``[1, 1]`` or ``--ce-weights``) get weight 1 for each further class. A
config that sets another class count explicitly is left alone: the session then stops with one line
naming both counts.
"""

from __future__ import annotations

from cellseg.config import Config
from cellseg.errors import BadInputError

DEFAULT_CLASSES = 2


def adopt_store_classes(config: Config) -> Config:
    """``config`` with ``model.num_classes`` (and ``train.ce_weights``) set from its store's classes,
    when it leaves the class count at the default and the store has more classes; else unchanged."""
    if config.data.store is None or config.model.num_classes != DEFAULT_CLASSES:
        return config
    from cellseg.data.store import open_store

    try:
        classes = open_store(config.data.store).classes
    except BadInputError:
        return config  # the session reports a missing or damaged store in its own words
    if len(classes) <= DEFAULT_CLASSES:
        return config
    weights = list(config.train.ce_weights)
    if len(weights) == DEFAULT_CLASSES:
        weights += [1.0] * (len(classes) - DEFAULT_CLASSES)
    return config.with_overrides({"model.num_classes": len(classes), "train.ce_weights": weights})
