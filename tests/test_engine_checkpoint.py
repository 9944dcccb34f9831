"""Checkpoints: atomic writes, readable with weights_only, RNG states restored exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cellseg.engine import checkpoint as ckpt
from cellseg.errors import BadInputError


def test_round_trip_and_rng_restore(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "rng": ckpt.rng_state(), "history": [{"a": 1.0}]}
    expected = (random.random(), np.random.rand(), torch.rand(2))
    path = ckpt.save_checkpoint(tmp_path / ckpt.CHECKPOINT_NAME, state)
    loaded = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert loaded["epoch"] == 2 and loaded["format"] == ckpt.FORMAT
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path)["rng"])  # a run folder works as well as the file
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"epoch": 1})
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial")  # save_checkpoint hands torch.save an open file
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary left behind


def test_unreadable_or_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(BadInputError, match="no checkpoint there"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / ckpt.CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="not a readable cellseg checkpoint"):
        ckpt.load_checkpoint(tmp_path)
