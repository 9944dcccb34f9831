"""Crash recovery on real processes: SIGKILL in the middle of an epoch, of a checkpoint write and
of an ingest, then resume or re-run; a full disk and an unwritable output folder give one clear
line. Faults are injected by tests/faults.py around the unchanged command."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.config import load_config
from cellseg.data.layouts import load_layout
from cellseg.data.store import open_store
from cellseg.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from cellseg.engine.loop import fit
from cellseg.errors import BadInputError
from cellseg.model import build_model

FAULTS = Path(__file__).with_name("faults.py")
CELLSEG = Path(sys.executable).with_name("cellseg")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_FILES = ["checkpoint_last.pt", "config.yaml", "metrics.json", "split.json"]  # and no leftovers
runner = CliRunner()


def train_args(store: Path, run_dir: str, epochs: int) -> list[str]:
    Path("settings.yaml").write_text("model:\n  encoder: test_resnet\n")
    return ["train", "--data", str(store), "--config", "settings.yaml", "--size", "64", "--batch-size", "2",
            "--epochs-frozen", "1", "--epochs", str(epochs), "--device", "cpu", "--run-dir", run_dir, "--no-register"]


def with_fault(*fault: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(FAULTS), *fault, "--", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)


def mlflow_run():
    """The one run of the default experiment (fails if there are more), and its val_loss steps."""
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    return run, [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]


def wait_for_line(process: subprocess.Popen, lines: queue.Queue, prefix: str, timeout: float = 240) -> None:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            assert process.poll() is None, f"exited ({process.returncode}) before {prefix!r}: {''.join(seen)}"
            continue
        if seen[-1].startswith(prefix):
            return
    raise AssertionError(f"no {prefix!r} within {timeout} s: {''.join(seen)}")


def drain(lines: queue.Queue[str]) -> str:
    """The rest of a process's lines, up to its end."""
    return "".join(iter(lambda: lines.get(timeout=30), ""))


def same_history(got: list[dict], expected: list[dict]) -> None:
    assert [h.keys() for h in got] == [h.keys() for h in expected]
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, nan_ok=True), a["epoch"]


def one_line_error(output: str, *needles: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], errors[0]


def start_training(store: Path, run_dir: str, epochs: int) -> tuple[subprocess.Popen, queue.Queue[str]]:
    """`cellseg train` in a process of its own, and a queue of its stderr lines ("" at the end)."""
    process = subprocess.Popen([str(CELLSEG), *train_args(store, run_dir, epochs=epochs)],
                               stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put("")], daemon=True).start()
    return process, lines


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_the_same_run(trainer_store, mlflow_db):
    process, lines = start_training(trainer_store, "runs/a", epochs=2)
    wait_for_line(process, lines, "epoch 1/3")  # epoch 1 is checkpointed and logged …
    process.send_signal(signal.SIGKILL)  # … kill the process while it trains epoch 2
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert load_checkpoint("runs/a")["epoch"] == 1
    run, steps = mlflow_run()
    assert run.info.status == "RUNNING" and steps == [1]  # the epoch in flight was never logged

    resumed = runner.invoke(app, ["train", "--run-dir", "runs/a", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 2/3" in resumed.output and "epoch 3/3" in resumed.output
    run, steps = mlflow_run()
    assert run.info.status == "FINISHED" and steps == [1, 2, 3]  # one run, every epoch once
    assert sorted(p.name for p in Path("runs/a").iterdir()) == RUN_FILES

    uninterrupted = fit(load_config(["runs/a/config.yaml"]), "runs/whole")
    same_history(load_checkpoint("runs/a")["history"], uninterrupted.history)


@pytest.mark.slow
def test_sigterm_mid_epoch_ends_the_run_as_killed_and_resume_continues_it(trainer_store, mlflow_db):
    """What schedulers, `timeout` and `docker stop` send: handled as Ctrl-C is."""
    process, lines = start_training(trainer_store, "runs/t", epochs=2)
    wait_for_line(process, lines, "epoch 1/3")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    output = drain(lines)
    assert output.rstrip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in output, output
    assert load_checkpoint("runs/t")["epoch"] >= 1
    run, steps = mlflow_run()
    assert run.info.status == "KILLED" and steps[0] == 1

    resumed = runner.invoke(app, ["train", "--run-dir", "runs/t", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    run, steps = mlflow_run()
    assert run.info.status == "FINISHED" and steps == [1, 2, 3]  # the same run, every epoch once


@pytest.mark.slow
def test_a_second_training_into_a_busy_run_folder_is_refused_or_waits(trainer_store, mlflow_db):
    process, lines = start_training(trainer_store, "runs/a", epochs=10)
    wait_for_line(process, lines, "epoch 1/11")
    second = runner.invoke(app, train_args(trainer_store, "runs/a", epochs=1))
    assert second.exit_code == 1
    one_line_error(second.output, f"runs/a: another cellseg process (pid {process.pid} on host", "is training in it")
    with pytest.raises(BadInputError, match=f"pid {process.pid}"):  # the engine's fit, as tune and compare call it
        fit(load_config(["runs/a/config.yaml"]), "runs/a", resume=True)

    extended = runner.invoke(app, ["train", "--run-dir", "runs/a", "--resume", "--epochs", "11", "--wait"])
    assert extended.exit_code == 0, extended.output
    assert process.wait(timeout=60) == 0  # the first ran to its end …
    assert "waiting for it" in extended.output and "epoch 12/12" in extended.output  # … then the second went on
    run, steps = mlflow_run()
    assert run.info.status == "FINISHED" and steps == list(range(1, 13))  # one run, every epoch once


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(trainer_store, mlflow_db):
    killed = with_fault("kill-writing", CHECKPOINT_NAME, "2", args=train_args(trainer_store, "runs/b", epochs=1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (torn,) = Path("runs/b").glob(f".{CHECKPOINT_NAME}.*.tmp")  # the half-written epoch-2 checkpoint
    assert load_checkpoint("runs/b")["epoch"] == 1  # the name still holds the complete epoch-1 file

    resumed = runner.invoke(app, ["train", "--run-dir", "runs/b", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint("runs/b")["epoch"] == 2 and not torn.exists()
    assert sorted(p.name for p in Path("runs/b").iterdir()) == RUN_FILES
    run, steps = mlflow_run()
    assert run.info.status == "FINISHED" and steps == [1, 2]


def test_sigkill_mid_ingest_keeps_the_old_store_and_a_rerun_completes(synth_trainer, trainer_store):
    fewer = Path(shutil.copytree(synth_trainer, "fewer"))
    (fewer / "FullImage" / "cell_0000.ome.tif").unlink()
    (fewer / "Mask_Norm" / "cell_0000.png").unlink()
    first = runner.invoke(app, ["data", "ingest", str(fewer), "--out", "store.zarr", "--layout", "trainer"])
    assert first.exit_code == 0, first.output
    old_hash = open_store("store.zarr").content_hash

    args = ["data", "ingest", str(synth_trainer), "--out", "store.zarr", "--layout", "trainer"]
    killed = with_fault("kill-writing", "stacks/00003", "1", args=args)  # while writing the 4th stack
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(Path().glob(".store.zarr.*.tmp"))  # the interrupted store, never under the real name
    assert open_store("store.zarr").content_hash == old_hash  # the previous store is untouched

    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "removed leftover of an interrupted ingest" in rerun.output
    assert open_store("store.zarr").content_hash == open_store(trainer_store).content_hash
    assert sorted(p.name for p in Path().iterdir() if "store" in p.name and p.suffix != ".lock") == ["store.zarr"]


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A run folder with an untrained test_resnet checkpoint: enough for predict."""
    folder = tmp_path_factory.mktemp("model-run")
    metadata = {"codes": [0, 3, 6], "strategy": "fluorescence", "classes": ["Background", "Cell"], "size": 64,
                "layout": load_layout("trainer").model_dump(mode="json"), "in_channels": 3, "num_classes": 2,
                "channel_dropout": 0.5, "merge_dropout": 0.5, "encoder": "test_resnet"}
    torch.manual_seed(0)
    save_checkpoint(folder / CHECKPOINT_NAME, {"metadata": metadata, "model": build_model("test_resnet").state_dict()})
    return folder


def command(kind: str, out: str, synth: Path, store: Path, model: Path) -> list[str]:
    if kind == "train":
        return train_args(store, out, epochs=1)
    if kind == "ingest":
        return ["data", "ingest", str(synth), "--out", out, "--layout", "trainer"]
    return ["predict", str(model), str(store), "--out", out, "--device", "cpu"]


@pytest.mark.parametrize("kind", [pytest.param("train", marks=pytest.mark.slow), "ingest", "predict"])
def test_full_disk_is_one_clear_line(kind, synth_trainer, trainer_store, model_run, request):
    if kind == "train":
        request.getfixturevalue("mlflow_db")
    out = {"train": "runs/full", "ingest": "full.zarr", "predict": "preds"}[kind]
    # every file written under OUT fails with ENOSPC (for train: the checkpoint after epoch 1)
    pattern = CHECKPOINT_NAME if kind == "train" else out
    result = with_fault("disk-full", pattern, args=command(kind, out, synth_trainer, trainer_store, model_run))
    assert result.returncode == 1
    one_line_error(result.stderr, "No space left on device")
    assert not list(Path().rglob("*.tmp"))  # nothing half-written left behind
    if kind == "train":
        assert sorted(p.name for p in Path(out).iterdir()) == ["config.yaml", "metrics.json", "split.json"]
        assert mlflow_run()[0].info.status == "FAILED"


@pytest.mark.parametrize("blocked", ["under-a-file", "read-only-folder"])
def test_unwritable_output_folder_is_one_clear_line(blocked, synth_trainer, trainer_store, model_run):
    parent = Path(blocked)
    if blocked == "under-a-file":  # what root (for whom permissions do not block) also hits
        parent.write_text("")
    elif os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    else:
        parent.mkdir(mode=0o500)
    for kind in ("train", "ingest", "predict"):
        result = runner.invoke(app, command(kind, str(parent / kind), synth_trainer, trainer_store, model_run))
        assert result.exit_code == 1, result.output
        one_line_error(result.output, str(parent))
        if blocked == "under-a-file":
            assert "under-a-file is a file, not a folder" in result.output
