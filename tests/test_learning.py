"""The suite's safety net for "does training still work": on a small synthetic store (CPU, seconds)
training learns (the loss falls, validation beats predicting background everywhere), and precise BN
does what docs/training.md says: after a short run the same weights predict background almost
everywhere in eval mode with BatchNorm's running averages, and segment cells with the re-estimated
statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments_support import synthetic_store, tiny_config

from cellseg.data.store import open_store
from cellseg.engine.loop import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learn_store(tmp_path_factory):
    """16 cells + 2 controls at 64 px: ~14 training stacks, 7 steps per epoch at batch 2."""
    return synthetic_store(tmp_path_factory.mktemp("learn"), "trainer", cells=16, negatives=2)


class BatchLosses:
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, session, step, loss):
        self.losses.append(float(loss))


def config(store, epochs: int, precise_bn: bool, frozen: int = 1):
    return tiny_config(store, **{"train.epochs_frozen": frozen, "train.epochs": epochs, "train.lr": 0.002,
                                 "train.precise_bn": precise_bn, "augment.enabled": False})


def all_black_accuracy(store_path, run_dir) -> float:
    """Pixel accuracy of predicting background everywhere on the run's validation stacks, from their masks
    at native pixels (~64 px; validation fits them into 64 × 64, which moves this by far less than the
    margin the trained model must beat it by)."""
    store = open_store(store_path)
    val = json.loads((run_dir / "split.json").read_text())["val"]
    masks = [store.read_mask(store.ids.index(stack_id)) for stack_id in val]
    return sum(int((m == 0).sum()) for m in masks) / sum(m.size for m in masks)


def test_training_learns(learn_store, tmp_path):
    recorded = BatchLosses()
    result = fit(config(learn_store, 6, precise_bn=False), tmp_path / "run", callbacks=[recorded])
    steps = len(recorded.losses) // len(result.history)
    first, last = np.mean(recorded.losses[:steps]), np.mean(recorded.losses[-steps:])
    assert steps >= 5 and last < 0.7 * first, recorded.losses  # the training loss falls
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    final = result.history[-1]
    black = all_black_accuracy(learn_store, tmp_path / "run")
    assert 0.5 < black < 0.95  # the validation set has cells, and not almost only background
    assert final["accuracy"] > black + 0.03, (final, black)  # beats all-black
    assert final["cell_accuracy"] > 0.2 and final["dice"] > 0.3, final


def test_precise_bn_rescues_eval_mode_after_a_short_run(learn_store, tmp_path):
    """Two runs of 2 unfrozen epochs (14 steps) that train the same weights (precise BN touches only the running statistics,
    which training-mode BatchNorm does not use) and validate them differently."""
    runs = {}
    for precise in (False, True):
        recorded = BatchLosses()
        result = fit(config(learn_store, 2, precise, frozen=0), tmp_path / f"precise-{precise}", callbacks=[recorded])
        runs[precise] = (recorded.losses, result.history[-1])
    assert runs[False][0] == runs[True][0]  # same batches, same losses: the same weights
    ema, precise = runs[False][1], runs[True][1]
    # running averages: background almost everywhere (measured: 0.998-0.999 of background and 0.01-0.04 of
    # cell pixels right, as the synthetic data changed)
    assert ema["background_accuracy"] > 0.99 and ema["cell_accuracy"] < 0.1, ema
    # re-estimated statistics, same weights: accuracy +0.03 to +0.05, cell Dice 0.03-0.07 -> 0.29-0.52
    assert precise["accuracy"] > ema["accuracy"] + 0.01, (ema, precise)
    assert precise["dice"] > ema["dice"] + 0.15 and precise["cell_accuracy"] > 3 * ema["cell_accuracy"], (ema, precise)
