"""The pure parts of benchmarks/real_data.py: the split by source image, Dice/IoU and Otsu (no data, no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data.py"
_SPEC = importlib.util.spec_from_file_location("real_data_benchmark", _PATH)
rd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rd)

TILES = [f"_y{y}_x{x}" for y in (0, 256) for x in (0, 256)]
NAMES = (
    [f"cellpose_style1_{n}{t}" for n in (126, 127, 128, 134) for t in TILES]
    + [f"cellpose_kc167_{n:03d}" for n in (95, 96, 97, 102)]
    + [f"cellpose_style2_144{t}" for t in TILES] + ["cellpose_style2_149", "cellpose_style2_150", "cellpose_style2_151"]
)


def test_source_and_set_names():
    assert rd.source_name("cellpose_style1_126_y0_x256") == "cellpose_style1_126"
    assert rd.source_name("cellpose_kc167_095") == "cellpose_kc167_095"
    assert rd.set_name("cellpose_style1_126") == "style1"
    assert rd.set_name("cellpose_kc167_095") == "kc167"


@pytest.mark.parametrize("seed", [None, 0, 1, 7])
def test_split_holds_out_whole_sources_one_per_set(seed):
    train, heldout = rd.split_sources(NAMES, seed)
    assert sorted(train + heldout) == sorted(NAMES)
    train_sources = {rd.source_name(n) for n in train}
    held_sources = {rd.source_name(n) for n in heldout}
    assert not train_sources & held_sources
    assert sorted(rd.set_name(s) for s in held_sources) == ["kc167", "style1", "style2"]
    assert rd.split_sources(NAMES, seed) == (train, heldout)  # deterministic


def test_split_default_is_last_source_of_each_set():
    _, heldout = rd.split_sources(NAMES)
    assert {rd.source_name(n) for n in heldout} == {"cellpose_style1_134", "cellpose_kc167_102", "cellpose_style2_151"}
    assert len(heldout) == 4 + 1 + 1  # all four tiles of style1_134


def test_seeds_draw_other_sources():
    held = {tuple(rd.split_sources(NAMES, seed)[1]) for seed in range(10)}
    assert len(held) > 1


def test_dice_and_iou():
    truth = np.zeros((4, 4), bool)
    truth[:2] = True  # 8 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3] = True  # 8 pixels, 4 shared
    assert rd.dice(pred, truth) == pytest.approx(0.5)
    assert rd.iou(pred, truth) == pytest.approx(4 / 12)
    assert rd.dice(truth, truth) == rd.iou(truth, truth) == 1.0
    empty = np.zeros((4, 4), bool)
    assert rd.dice(empty, empty) == rd.iou(empty, empty) == 1.0
    assert rd.dice(empty, truth) == rd.iou(empty, truth) == 0.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_otsu_separates_two_populations(dtype):
    rng = np.random.default_rng(0)
    dark = rng.normal(20, 3, (32, 64))
    bright = rng.normal(200, 10, (32, 64))
    image = np.clip(np.concatenate([dark, bright]), 0, 255).astype(dtype)
    truth = np.zeros(image.shape, bool)
    truth[32:] = True
    foreground, _ = rd.otsu_foreground(np.stack([image, np.zeros_like(image)]))  # page 0 only
    assert (foreground == truth).mean() > 0.999  # floats: 256 bins, right to a bin's width


def test_means_weight_sources_equally():
    rows = [{"source": "a", **dict.fromkeys(rd.SCORE_KEYS, 1.0)},
            {"source": "a", **dict.fromkeys(rd.SCORE_KEYS, 1.0)},
            {"source": "b", **dict.fromkeys(rd.SCORE_KEYS, 0.0)}]
    summary = rd.means(rows)
    assert summary["images"]["n"] == 3 and summary["images"]["cellseg_dice"] == pytest.approx(2 / 3)
    assert summary["sources"]["n"] == 2 and summary["sources"]["cellseg_dice"] == pytest.approx(0.5)
