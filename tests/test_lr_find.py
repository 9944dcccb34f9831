"""`cellseg lr-find`: the sweep's arithmetic, the model and random state left exactly as found, and the
command end to end (two strategies overlaid, JSON, MLflow run) with one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.errors import ConfigError
from cellseg.experiments.lr_find import find_lr, lr_schedule, smooth, suggest
from experiments_support import TINY, one_line_error, small_encoder_file, tiny_config

runner = CliRunner()


def test_schedule_is_geometric_from_start_to_end():
    lrs = lr_schedule(1e-7, 10, 9)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10)
    assert np.allclose(lrs[1:] / lrs[:-1], 10.0)
    with pytest.raises(ConfigError, match="--start-lr"):
        lr_schedule(1.0, 0.1, 10)
    with pytest.raises(ConfigError, match="--steps"):
        lr_schedule(1e-7, 10, 1)


def test_smoothing_is_debiased():
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards zero at the start
    assert smooth([1.0, 3.0], beta=0.5)[1] == pytest.approx((0.25 + 1.5) / 0.75)


def test_suggestions_follow_the_stated_rules():
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    loss = 2 - np.tanh(2 * (x + 3)) + np.where(x > -1, 20 * (x + 1) ** 2, 0)  # falls fastest at 1e-3, min near 1e-1
    got = suggest(lrs, loss)
    assert got["steepest"] == pytest.approx(1e-3, rel=0.3)
    assert got["minimum"] == pytest.approx(lrs[np.argmin(loss)] / 10)
    assert 1e-5 < got["valley"] < 1e-2  # the middle of the long fall, well before the minimum
    bumpy = loss + np.where(np.arange(61) % 7 == 3, 0.05, 0)  # bumps do not cut the valley short
    assert suggest(lrs, bumpy)["valley"] == pytest.approx(got["valley"], rel=0.5)
    assert set(suggest(lrs[:2], loss[:2]).values()) == {None}


@pytest.mark.slow
def test_finder_leaves_the_model_and_random_state_unchanged(trainer_store, tmp_path):
    from cellseg.engine.session import TrainingSession

    from cellseg.engine.schedule import set_encoder_frozen

    session = TrainingSession(tiny_config(trainer_store), tmp_path)
    session.model.eval()
    set_encoder_frozen(session.model, True)  # as in phase 1: the unfrozen sweep must put this back
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    trainable = [p.requires_grad for p in session.model.parameters()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    curve = find_lr(session, 1e-5, 1.0, steps=4)
    unfrozen = find_lr(session, 1e-5, 1.0, steps=3, unfrozen=True)

    assert len(curve.lrs) == len(curve.smoothed) >= 2 and curve.stopped in ("end of sweep", "diverged")
    assert unfrozen.lrs[0] == curve.lrs[0] and unfrozen.losses[0] == pytest.approx(curve.losses[0])  # same start
    after = session.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert [p.requires_grad for p in session.model.parameters()] == trainable
    assert not session.model.training and all(p.grad is None for p in session.model.parameters())
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream continues as if nothing ran


@pytest.mark.slow
def test_lr_find_overlays_strategies_and_logs_a_run(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    result = runner.invoke(app, ["lr-find", "--data", str(trainer_store), "--strategy", "fluorescence,brightfield",
                                 "--out", "lr", "--steps", "5", "--start-lr", "1e-5", "--end-lr", "1",
                                 "--config", small_encoder_file(), *TINY])
    assert result.exit_code == 0, result.output
    assert "fluorescence: suggested lr" in result.output and "brightfield: suggested lr" in result.output
    assert Path("lr/lr_find.png").stat().st_size > 0
    document = json.loads(Path("lr/lr_find.json").read_text())
    assert document["phase"] == "frozen" and document["rule"] == "valley" and "longest valley" in document["rule_text"]
    assert set(document["curves"]) == {"fluorescence", "brightfield"}
    for curve in document["curves"].values():
        assert {"suggestion", "suggestions", "lrs", "losses", "smoothed", "stopped"} <= set(curve)
        assert len(curve["lrs"]) == len(curve["losses"]) <= 5

    client = MlflowClient(resolve_tracking_uri())  # absolute: MLflow caches stores by URI
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cellseg.kind"] == "lr-find"
    assert run.data.params["lr_find.steps"] == "5" and run.data.params["data.size"] == "64"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"lr_find.png", "lr_find.json"}


def test_bad_sweep_options_are_one_line(trainer_store, mlflow_db):
    store = str(trainer_store)
    one_line_error(runner.invoke(app, ["lr-find", "--data", store, "--start-lr", "1", "--end-lr", "0.1", *TINY]),
                   "--start-lr")
    one_line_error(runner.invoke(app, ["lr-find", "--data", store, "--rule", "guess", *TINY]), "--rule guess")
    one_line_error(runner.invoke(app, ["lr-find", "--data", store, "--strategy", "fluorescence,telepathy", *TINY]),
                   "telepathy")
    one_line_error(runner.invoke(app, ["lr-find", "--data", "nowhere.zarr", *TINY]), "nowhere.zarr")
    assert not Path("lr_find").exists()
