"""Training inputs that cannot give a judged model, and options that contradict each other: one line
before any work (no MLflow run, no checkpoint, no study journal); torchrun without --run-dir agrees on
one folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from experiments_support import TINY, TINY_FIT, one_line_error, small_encoder_file
from test_crash_recovery import model_run  # noqa: F401 — an untrained model's run folder (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def one_stack_store(tmp_path_factory):
    from cellseg.data.ingest import ingest
    from cellseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("one") / "raw"
    synthesize(root, layout="trainer", cells=1, negatives=0, size=64, seed=0)
    store = root.parent / "one.zarr"
    ingest(root, store, layout="trainer")
    return store


def nothing_started() -> None:
    """No run folder, study journal or MLflow run exists (the MLflow store itself may)."""
    assert not Path("runs").exists() or not any(Path("runs").rglob("checkpoint_last.pt"))
    assert not Path("optuna.journal").exists()
    assert not Path("cmp").exists() or not any(Path("cmp").rglob("*.json"))  # compare: no split, no runs
    if Path("mlflow.db").exists():
        from mlflow import MlflowClient

        from cellseg.tracking.runs import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri())
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def train_tune_compare(store, *extra: str, config: str | None = None) -> list:
    common = ["--data", str(store), "--config", config or small_encoder_file(), *TINY, *extra]
    return [runner.invoke(app, ["train", *common, "--run-dir", "runs/r"]),
            runner.invoke(app, ["tune", *common, "--trials", "1"]),
            runner.invoke(app, ["compare", *common, "--strategies", "fluorescence", "--replicates", "1",
                                "--out", "cmp"])]


def test_zero_epochs_is_refused_before_any_work(trainer_store, mlflow_db):
    for result in train_tune_compare(trainer_store, "--epochs-frozen", "0", "--epochs", "0"):
        one_line_error(result, "--epochs-frozen 0 --epochs 0: nothing to train")
    nothing_started()
    assert not Path("runs").exists()


def test_a_store_too_small_for_a_split_is_refused_before_training(one_stack_store, mlflow_db):
    for result in train_tune_compare(one_stack_store, "--epochs-frozen", "1", "--epochs", "0"):
        one_line_error(result, "one.zarr: 1 stack(s); training needs at least 2")
    nothing_started()


def test_an_empty_validation_split_is_refused_before_training(trainer_store, mlflow_db):
    Path("no-val.yaml").write_text(Path(small_encoder_file()).read_text() + "data:\n  val_fraction: 0.0\n")
    for result in train_tune_compare(trainer_store, "--epochs-frozen", "1", config="no-val.yaml"):
        one_line_error(result, "the split leaves no stack for validation (data.val_fraction 0.0)")
    nothing_started()


@pytest.mark.parametrize(("args", "needles"), [
    (["train", "--register-as", "x", "--no-register"], ["--register-as x and --no-register"]),
    (["train", "--strategy", "fluorescence", "--codes", "0,3"], ["--strategy fluorescence and --codes 0,3"]),
    (["tune", "--lr", "0.01", "--lr-range", "1e-4,1e-2"], ["--lr 0.01 and --lr-range", "ignored"]),
    (["tune", "--ce-weights", "1,9"], ["--ce-weights 1,9 and --ratio-range"]),
    (["tune", "--tune-dropout", "--channel-dropout", "0.2"], ["--channel-dropout 0.2 and --tune-dropout"]),
    (["tune", "--tune-dropout", "--merge-dropout", "0.2"], ["--merge-dropout 0.2 and --tune-dropout"]),
    (["compare", "--strategies", "fluorescence", "--out", "c", "--codes", "0,3"],
     ["--strategies fluorescence and --codes 0,3"]),
], ids=["train-register", "train-codes", "tune-lr", "tune-ce", "tune-channel-dropout", "tune-merge-dropout",
        "compare-codes"])
def test_contradicting_options_are_one_line_naming_both(args, needles, trainer_store):
    one_line_error(runner.invoke(app, [*args, "--data", str(trainer_store)]), *needles)
    nothing_started()
    assert not Path("mlflow.db").exists()


def test_evaluate_blames_the_option_given(model_run, trainer_store):  # noqa: F811
    args = ["evaluate", str(model_run), "--data", str(trainer_store), "--out", "ev", "--device", "cpu", "--no-log"]
    line = one_line_error(runner.invoke(app, [*args, "--codes", "a,b"]), "codes 'a,b': expected integers")
    assert "strategy" not in line
    one_line_error(runner.invoke(app, [*args, "--codes", "0,3", "--strategy", "fluorescence"]),
                   "--codes 0,3 and --strategy fluorescence")


@pytest.mark.slow
def test_torchrun_without_run_dir_trains_into_one_folder_rank_0_names(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    Path("settings.yaml").write_text("model:\n  encoder: test_resnet\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(sys.executable).with_name("cellseg")), "train", "--data", str(trainer_store),
               "--config", "settings.yaml", *TINY_FIT, "--no-register"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in Path("runs").iterdir() if p.is_dir()]  # both trained in the folder rank 0 named
    assert run_dir.name.startswith("fluorescence-") and (run_dir / "checkpoint_last.pt").is_file()
    client = MlflowClient(resolve_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
