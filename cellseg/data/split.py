"""The train/validation split: random, by stack id, reproducible from a seed, saved with each run.

As in nnU-Net, the split is a small JSON file of stack ids (not positions), so it stays valid when
a store is re-ingested and can be edited by hand or reused to compare models on the same cells.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from cellseg.data.store import Store
from cellseg.errors import BadInputError, ConfigError, validation_message
from cellseg.fileio import write_text


class Split(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: list[str]
    val: list[str]
    seed: int | None = None
    val_fraction: float | None = None
    content_hash: str | None = None

    @model_validator(mode="after")
    def _disjoint(self) -> Split:
        both = sorted(set(self.train) & set(self.val))
        if both:
            raise ValueError(f"stacks in both train and val: {both[:3]}")
        return self

    def indices(self, store: Store) -> tuple[list[int], list[int]]:
        """Store positions of the train and val stacks; BadInputError names an id the store lacks."""
        return [store.index(i) for i in self.train], [store.index(i) for i in self.val]

    def save(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"{path}: split file not found") from None
        except ValidationError as exc:
            raise BadInputError(f"{path}: invalid split ({validation_message(exc)})") from None


def make_split(store: Store, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """A seeded random split of the store's stack ids; ``round(n × val_fraction)`` go to val.

    At least one stack is kept for validation when ``val_fraction > 0`` and one for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(store.ids)
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return Split(train=train, val=val, seed=seed, val_fraction=val_fraction, content_hash=store.content_hash)
