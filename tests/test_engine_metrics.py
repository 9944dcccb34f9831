"""Validation metrics against hand computation (seed definitions: accuracy over all pixels,
per-class accuracy = recall of that class)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellseg.engine.losses import weighted_cross_entropy
from cellseg.engine.metrics import METRIC_NAMES, SegmentationMetrics
from cellseg.errors import ConfigError


def logits_for(labels: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is ``labels`` (B, H, W) with 2 classes."""
    return torch.stack([(labels == 0).float(), (labels == 1).float()], 1) * 4 - 2


def test_accuracies_dice_iou_by_hand():
    truth = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])  # 4 background, 4 cell
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 1]]])  # bg: 3/4 right, cell: 3/4 right
    second_truth = torch.zeros(1, 2, 4, dtype=torch.long)  # a negative control, all predicted right
    metrics = SegmentationMetrics(weighted_cross_entropy([1.0, 1.0], 2), 2, torch.device("cpu"))
    metrics.update(logits_for(pred), truth)
    metrics.update(logits_for(second_truth), second_truth)
    got = metrics.compute()
    tp, fp, fn = 3, 1, 1
    assert got["accuracy"] == pytest.approx(14 / 16)  # over all pixels, not a mean of batch means
    assert got["background_accuracy"] == pytest.approx(11 / 12)
    assert got["cell_accuracy"] == pytest.approx(3 / 4)
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["iou"] == pytest.approx(tp / (tp + fp + fn))


def test_val_loss_is_the_weighted_pixel_mean():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 5)
    target = torch.randint(0, 2, (3, 5, 5))
    loss_fn = weighted_cross_entropy([0.2, 3.0], 2)
    metrics = SegmentationMetrics(loss_fn, 2, torch.device("cpu"))
    for i in range(3):  # batches of one: the sum over batches must equal the whole-set mean
        metrics.update(logits[i : i + 1], target[i : i + 1])
    assert metrics.compute()["val_loss"] == pytest.approx(loss_fn(logits, target).item(), rel=1e-6)


def test_absent_class_gives_nan_not_a_number():
    truth = torch.zeros(1, 3, 3, dtype=torch.long)
    metrics = SegmentationMetrics(weighted_cross_entropy([1, 1], 2), 2, torch.device("cpu"))
    metrics.update(logits_for(truth), truth)
    got = metrics.compute()
    assert got["accuracy"] == 1.0 and math.isnan(got["cell_accuracy"]) and math.isnan(got["dice"])


def test_one_weight_per_class():
    with pytest.raises(ConfigError, match="train.ce_weights"):
        weighted_cross_entropy([1.0, 2.0, 3.0], 2)


# --- pinned values on a fixed batch, computed independently with numpy ------------------------------

# Two batches (sizes 2 and 1) of 3×4 images, 3 classes; the prediction is ``PRED`` wherever the
# logits were built from it. Counts by hand (truth rows × prediction columns) over all 36 pixels:
TRUTH = np.array([
    [[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 0, 0]],
    [[1, 1, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 2, 2, 0], [1, 1, 1, 0]],
])
PRED = np.array([
    [[0, 1, 0, 1], [0, 1, 0, 1], [2, 1, 0, 0]],
    [[1, 0, 0, 0], [1, 1, 2, 2], [0, 0, 0, 1]],
    [[0, 0, 0, 0], [0, 2, 1, 0], [1, 1, 0, 0]],
])
CONFUSION = np.array([  # by hand from TRUTH/PRED above
    [17, 2, 1],  # 20 background pixels: 17 right, 2 called cell, 1 called boundary
    [3, 8, 0],  # 11 cell pixels: 8 right, 3 called background
    [0, 2, 3],  # 5 boundary pixels: 3 right, 2 called cell
])
WEIGHTS = [0.3, 2.0, 5.0]


def fixed_logits() -> torch.Tensor:
    """Random logits (seeded) with +6 on the ``PRED`` class, so argmax == PRED and the loss is not trivial."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 3, 3, 4, generator=generator)
    return logits + 6.0 * torch.nn.functional.one_hot(torch.from_numpy(PRED), 3).permute(0, 3, 1, 2)


def numpy_expected(logits: np.ndarray, truth: np.ndarray, weights) -> dict[str, float]:
    """The metrics by their definitions, from numpy arrays, with no code shared with the implementation."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    cm = np.zeros((k, k), np.int64)
    for t, p in zip(truth.ravel(), pred.ravel(), strict=True):
        cm[t, p] += 1
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    nll = -np.take_along_axis(log_softmax, truth[:, None], 1)[:, 0]
    w = np.asarray(weights, np.float64)[truth]
    tp, fp, fn = cm[1, 1], cm[:, 1].sum() - cm[1, 1], cm[1].sum() - cm[1, 1]
    return {
        "val_loss": float((nll * w).sum() / w.sum()),
        "accuracy": np.trace(cm) / cm.sum(),
        "background_accuracy": cm[0, 0] / cm[0].sum(),
        "cell_accuracy": cm[1, 1] / cm[1].sum(),
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
    }


def test_fixed_batch_pins_every_logged_metric():
    logits = fixed_logits()
    assert (logits.argmax(1).numpy() == PRED).all()
    expected = numpy_expected(logits.double().numpy(), TRUTH, WEIGHTS)
    # the confusion counts by hand agree with the numpy count the expectations use
    tp, fp, fn = CONFUSION[1, 1], CONFUSION[:, 1].sum() - CONFUSION[1, 1], CONFUSION[1].sum() - CONFUSION[1, 1]
    assert (tp, fp, fn) == (8, 4, 3)
    assert expected["accuracy"] == pytest.approx(28 / 36) and expected["dice"] == pytest.approx(16 / 23)
    assert expected["background_accuracy"] == pytest.approx(17 / 20)
    assert expected["cell_accuracy"] == pytest.approx(8 / 11) and expected["iou"] == pytest.approx(8 / 15)
    metrics = SegmentationMetrics(weighted_cross_entropy(WEIGHTS, 3), 3, torch.device("cpu"))
    target = torch.from_numpy(TRUTH)
    metrics.update(logits[:2], target[:2])
    metrics.update(logits[2:], target[2:])
    assert metrics.pixels == 36
    got = metrics.compute()
    assert list(got) == list(METRIC_NAMES)  # the names logged to MLflow and metrics.json, in order
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-6), name
    assert all(type(v) is float for v in got.values())
    # compute() leaves the sums alone: more batches keep accumulating
    metrics.update(logits[2:], target[2:])
    assert metrics.pixels == 48
    assert metrics.compute()["accuracy"] == pytest.approx((28 + 10) / 48)


def test_a_nan_loss_is_reported_not_dropped():
    """A diverged model's NaN logits must show as a NaN loss, not vanish from the mean."""
    logits = fixed_logits()
    logits[0, :, 0, 0] = math.nan
    metrics = SegmentationMetrics(weighted_cross_entropy(WEIGHTS, 3), 3, torch.device("cpu"))
    metrics.update(logits, torch.from_numpy(TRUTH))
    assert math.isnan(metrics.compute()["val_loss"]) and metrics.pixels == 36


def test_nothing_seen_gives_nan_everywhere():
    got = SegmentationMetrics(weighted_cross_entropy([1, 1], 2), 2, torch.device("cpu")).compute()
    assert list(got) == list(METRIC_NAMES) and all(math.isnan(v) for v in got.values())


# --- two processes (gloo): each validates a shard, both get the metrics of the whole set ---------------


SHARDINGS = {"uneven": [[0, 2], [1]], "empty-rank": [[0, 1, 2], []]}  # batch indices per rank


def _rank_metrics(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        logits, target = fixed_logits(), torch.from_numpy(TRUTH)
        for name, shards in SHARDINGS.items():
            metrics = SegmentationMetrics(weighted_cross_entropy(WEIGHTS, 3), 3, torch.device("cpu"))
            for i in shards[rank]:
                metrics.update(logits[i : i + 1], target[i : i + 1])
            torch.save({"pixels": metrics.pixels, "metrics": metrics.compute()}, f"{out}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_their_shards(tmp_path):
    """Each rank's compute() gives the whole set's metrics, also where one rank validated nothing."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_metrics, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    expected = numpy_expected(fixed_logits().double().numpy(), TRUTH, WEIGHTS)
    for name, shards in SHARDINGS.items():
        for rank in range(2):
            saved = torch.load(tmp_path / f"{name}-rank{rank}.pt")
            assert saved["pixels"] == 12 * len(shards[rank])  # this process's own pixels
            for metric in METRIC_NAMES:
                assert saved["metrics"][metric] == pytest.approx(expected[metric], rel=1e-6), (name, rank, metric)
