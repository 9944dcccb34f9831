"""Data-parallel training: `torchrun --nproc-per-node 2 cellseg train` on two CPU processes (gloo)
equals one process trained with the global batch, resumes after rank 0 is killed mid-run, and
writes one run folder and one MLflow run (rank 0 only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellseg.config import load_config
from cellseg.data.batches import make_batch_source
from cellseg.data.geometry import Geometry
from cellseg.data.codes import resolve_codes
from cellseg.data.store import open_store
from cellseg.engine.checkpoint import load_checkpoint
from cellseg.engine.distributed import World
from cellseg.engine.loop import fit
from cellseg.errors import ConfigError

FAULTS = Path(__file__).with_name("faults.py")
CELLSEG = Path(sys.executable).with_name("cellseg")
# 4 training + 2 validation stacks: with 2 ranks × 2 per rank, every global batch holds all 4
# training stacks, as the one-process batch of 4 does (see engine/distributed.py for why that is
# what "equal" can mean); augmentation off, as its draws are per rank.
SETTINGS = "model:\n  encoder: test_resnet\ndata:\n  val_fraction: 0.34\naugment:\n  enabled: false\n"
ARGS = ["--size", "64", "--epochs-frozen", "2", "--epochs", "2", "--device", "cpu", "--seed", "3"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


def test_ranks_read_disjoint_shards_in_step(trainer_store):
    store = open_store(trainer_store)
    plan = resolve_codes("fluorescence", store.layout)
    indices = list(range(len(store)))  # 6 stacks over 4 ranks: shards of 2, 2, 1, 1
    shards = [World(rank, 4).shard(indices) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == indices
    sources = [make_batch_source(store, shard, plan, Geometry("stack", 32), 1, "cpu", residency="ram", per_epoch=len(indices) // 4,
                                 stream=rank, drop_last=True) for rank, shard in enumerate(shards)]
    assert [len(s) for s in sources] == [1, 1, 1, 1]  # every rank takes as many steps
    assert [len(s.images) for s in sources] == [2, 2, 1, 1]  # each holds only its shard
    orders = [[s._order(e).tolist() for e in range(8)] for s in sources[:2]]
    assert orders[0] != orders[1]  # ranks shuffle independently


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch_and_resume(trainer_store, mlflow_db, tmp_path):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    Path("settings.yaml").write_text(SETTINGS)
    common = ["--data", str(trainer_store), "--config", "settings.yaml", "--run-dir", "runs/ddp", "--no-register"]
    # rank 0 is killed half-way through writing the epoch-4 checkpoint; torchrun stops rank 1
    killed = torchrun(str(FAULTS), "kill-writing", "checkpoint_last.pt", "4", "--", "train", *common,
                      "--batch-size", "2", *ARGS)
    assert killed.returncode != 0, killed.stderr
    saved = load_checkpoint("runs/ddp")
    assert saved["epoch"] == 3 and saved["world_size"] == 2 and len(saved["rng_ranks"]) == 1
    with pytest.raises(ConfigError, match="middle of a one-cycle trained by 2 process"):
        fit(load_config(["runs/ddp/config.yaml"]), "runs/ddp", resume=True)  # one process can't finish it

    resumed = torchrun(str(CELLSEG), "train", "--run-dir", "runs/ddp", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("final:") == 1  # rank 0 alone reports
    ddp = load_checkpoint("runs/ddp")
    assert ddp["epoch"] == 4 and sorted(p.name for p in Path("runs/ddp").iterdir()) == [
        "checkpoint_last.pt", "config.yaml", "metrics.json", "split.json"]

    config = load_config(["settings.yaml"], overrides={"data.store": str(trainer_store), "data.size": 64,
                                                       "train.batch_size": 4, "train.epochs_frozen": 2,
                                                       "train.epochs": 2, "train.device": "cpu", "seed": 3})
    start = {}

    class Start:
        def on_fit_start(self, session):
            start.update({k: v.clone() for k, v in session.model.state_dict().items()})

    single = fit(config, tmp_path / "single", callbacks=[Start()])
    one, two, init = flat(single.model.state_dict()), flat(ddp["model"]), flat(start)
    # Adam turns rounding noise in near-zero gradients into steps of the learning rate's size, so
    # compare the whole update: one process on 1 vs 2 threads differs by 0.4-1.0% of it on this CPU
    # (measured 1.0013% with the current synthetic stacks).
    assert ((two - one).norm() / (one - init).norm()).item() < 0.02
    for a, b in zip(single.history, ddp["history"], strict=True):
        assert a["epoch"] == b["epoch"] and a["lr"] == pytest.approx(b["lr"])
        for key in ("train_loss", "val_loss", "accuracy", "cell_accuracy", "dice"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-3), (a["epoch"], key)

    client = MlflowClient(resolve_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]
