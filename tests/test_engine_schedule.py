"""The training schedule: one-cycle LR curves, discriminative rates, freezing, extension rule."""

from __future__ import annotations

import math

import pytest
import torch

from cellseg.config import TrainConfig
from cellseg.engine.schedule import (
    DIV_FACTOR,
    FINAL_DIV_FACTOR,
    Cycle,
    cycle_at,
    make_optimizer,
    make_scheduler,
    peak_lrs,
    plan_cycles,
    set_encoder_frozen,
)
from cellseg.errors import ConfigError
from cellseg.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("resnet18", in_channels=3, num_classes=2)


def lr_curve(model, lrs, steps):
    optimizer = make_optimizer(model, lrs, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, lrs, steps)
    curve = []
    for _ in range(steps):
        curve.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return torch.tensor(curve)


def test_one_cycle_shape(model):
    curve = lr_curve(model, [1e-3] * 3, 100)[:, -1]
    peak = int(curve.argmax())
    assert curve[0] == pytest.approx(1e-3 / DIV_FACTOR)
    assert curve.max() == pytest.approx(1e-3)
    assert 25 <= peak <= 31  # warm-up over 30% of the steps
    assert torch.all(curve[1 : peak + 1] >= curve[:peak]) and torch.all(curve[peak + 1 :] <= curve[peak:-1])
    assert curve[-1] < 1e-3 / DIV_FACTOR / FINAL_DIV_FACTOR * 10


def test_phase_two_discriminative_rates():
    train = TrainConfig(lr=1e-3, lr_div_first=100, lr_div_head=2)
    first, middle, head = peak_lrs(Cycle(2, 10), train, 3)
    assert first == pytest.approx(1e-5) and head == pytest.approx(5e-4)
    assert middle == pytest.approx(math.sqrt(first * head))  # geometric spacing, as fastai's slice
    assert peak_lrs(Cycle(1, 5), train, 3) == [1e-3] * 3


def test_discriminative_curves_keep_their_ratio(model):
    lrs = peak_lrs(Cycle(2, 1), TrainConfig(lr=1e-3), 3)
    curve = lr_curve(model, lrs, 20)
    assert torch.allclose(curve[:, 2] / curve[:, 0], torch.full((20,), 50.0, dtype=curve.dtype))


def test_freezing_keeps_batch_norm_trainable(model):
    set_encoder_frozen(model, True)
    bn = model.encoder.bn1.weight
    conv = model.encoder.conv1.weight
    assert not conv.requires_grad and bn.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())
    set_encoder_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_plan_fresh_and_without_frozen_phase():
    assert plan_cycles(TrainConfig(epochs_frozen=2, epochs=3)) == [Cycle(1, 2), Cycle(2, 3)]
    assert plan_cycles(TrainConfig(epochs_frozen=0, epochs=3)) == [Cycle(2, 3)]


def test_plan_extension_keeps_started_cycles():
    started = [Cycle(1, 1), Cycle(2, 2)]
    assert plan_cycles(TrainConfig(epochs_frozen=1, epochs=2), started) == started
    extended = plan_cycles(TrainConfig(epochs_frozen=1, epochs=5), started)
    assert extended == [Cycle(1, 1), Cycle(2, 2), Cycle(3, 3)]
    assert plan_cycles(TrainConfig(epochs_frozen=1, epochs=6), extended)[-1] == Cycle(4, 1)
    assert plan_cycles(TrainConfig(epochs_frozen=1, epochs=1), [Cycle(1, 1)]) == [Cycle(1, 1), Cycle(2, 1)]


def test_plan_refuses_shortening_and_changed_frozen_epochs():
    started = [Cycle(1, 1), Cycle(2, 4)]
    with pytest.raises(ConfigError, match="--epochs 2"):
        plan_cycles(TrainConfig(epochs_frozen=1, epochs=2), started)
    with pytest.raises(ConfigError, match="--epochs-frozen 3"):
        plan_cycles(TrainConfig(epochs_frozen=3, epochs=4), started)


def test_cycle_at():
    cycles = [Cycle(1, 2), Cycle(2, 3)]
    assert [cycle_at(cycles, e) for e in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(IndexError):
        cycle_at(cycles, 5)
