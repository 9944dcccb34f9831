"""`cellseg tune`: a study continued by a second invocation, best.yaml that `cellseg train` accepts,
child runs tagged under one parent, workers sharing a study through the journal file and PostgreSQL,
and the study's settings kept across invocations."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from experiments_support import small_encoder_file
from cellseg.errors import ConfigError

runner = CliRunner()
TINY = ["--size", "64", "--batch-size", "2", "--epochs-frozen", "0", "--epochs", "1", "--device", "cpu"]


def tune_args(store, study: str, trials: int = 1, *extra: str) -> list[str]:
    return ["tune", "--data", str(store), "--config", small_encoder_file(), "--study", study, "--trials", str(trials),
            *TINY, *extra]


def study_runs(study: str):
    """(parent run, child runs) of ``study`` in the default tracking store."""
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name("cellseg").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.study = '{study}'")
    parents = [r for r in runs if r.data.tags.get("cellseg.kind") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children, client


@pytest.mark.slow
def test_tune_continues_the_study_and_best_yaml_trains(trainer_store, mlflow_db):
    import optuna

    first = runner.invoke(app, tune_args(trainer_store, "s1", 1, "--lr", "0.002"))  # as the DVC pipeline passes it
    assert first.exit_code == 0, first.output
    assert "trial 0 complete accuracy" in first.output and "wrote best.yaml" in first.output
    again = runner.invoke(app, tune_args(trainer_store, "s1"))
    assert again.exit_code == 0, again.output
    assert "trial 1 complete" in again.output and "(2 trials in the study)" in again.output

    study = optuna.load_study(study_name="s1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("optuna.journal")))
    assert [t.number for t in study.trials] == [0, 1]  # the first invocation's trial is kept
    assert study.user_attrs["sampler_seed"] == 0 and study.user_attrs["cellseg.settings"]["objective"] == "accuracy"
    assert len({tuple(t.params.items()) for t in study.trials}) == 2  # worker 1 is seeded differently
    # --lr without --lr-range: a decade either side of it, kept by the study for later invocations
    assert study.user_attrs["cellseg.settings"]["lr_range"] == pytest.approx([0.0002, 0.02])
    assert all(0.0002 <= t.params["lr"] <= 0.02 for t in study.trials)

    (parent,), children, client = study_runs("s1")  # one parent, continued by the second invocation
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert sorted(c.data.tags["trial"] for c in children) == ["0", "1"]
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["strategy"] == "fluorescence"
        trial = study.trials[int(tags["trial"])]
        assert tags["param.lr"] == f"{trial.params['lr']:.3g}" and "param.ce_ratio" in tags
        assert child.data.params["train.lr"] == str(trial.params["lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {"study/trials.csv", "study/history.png", "study/best.yaml"}
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [0, 1]
    assert Path("runs/tune/s1/trial-1/split.json").read_text() == Path("runs/tune/s1/trial-0/split.json").read_text()

    trained = runner.invoke(app, ["train", "--config", "best.yaml", "--run-dir", "runs/best", "--no-register"])
    assert trained.exit_code == 0, trained.output
    best = study.best_trial
    assert f"lr: {best.params['lr']}" in Path("runs/best/config.yaml").read_text()


def run_workers(store, study: str, storage: str | None, workers: int = 2) -> None:
    """``workers`` `cellseg tune` processes on one study at once, one trial each."""
    args = tune_args(store, study, 1, *(["--storage", storage] if storage else []))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core each, as pytest's own process uses
    procs = [subprocess.Popen([sys.executable, "-m", "cellseg", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(workers)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output


def check_shared(study_name: str, storage, workers: int = 2) -> None:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    assert sorted(t.number for t in study.trials) == list(range(workers))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    workers_joined = [k for k in study.user_attrs if k.startswith("cellseg.worker.")]
    assert len(workers_joined) == workers
    parents, children, _ = study_runs(study_name)
    assert len(parents) == 1  # the two processes agreed on one parent run
    assert sorted(c.data.tags["trial"] for c in children) == [str(i) for i in range(workers)]


@pytest.mark.slow
def test_two_processes_share_the_default_journal(trainer_store, mlflow_db):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run_workers(trainer_store, "shared", None)
    check_shared("shared", JournalStorage(JournalFileBackend("optuna.journal")))
    assert Path("best.yaml").is_file()


@pytest.mark.slow
def test_two_processes_share_a_postgres_study(trainer_store, mlflow_db, postgres_url):
    import uuid

    name = f"pg-{uuid.uuid4().hex[:8]}"
    run_workers(trainer_store, name, postgres_url)
    check_shared(name, postgres_url)


def test_a_study_keeps_its_settings(tmp_path, trainer_store):
    import optuna

    from cellseg.config import load_config
    from cellseg.experiments.tune import _check_fixed, _join, _study_settings, open_storage

    storage = open_storage(str(tmp_path / "j.journal"))
    config = load_config(overrides={"data.store": str(trainer_store), "seed": 4})
    created = _study_settings(storage, "st", {"objective": "dice", "lr_range": (1e-4, 1e-2)}, config)
    assert created.sampler_seed == 4 and created.direction == "maximize"
    same = _study_settings(storage, "st", {"objective": None, "lr_range": None}, config)
    assert same == created  # nothing given: the study's settings
    with pytest.raises(ConfigError, match="--objective accuracy: study st was created with dice"):
        _study_settings(storage, "st", {"objective": "accuracy"}, config)
    study = optuna.load_study(study_name="st", storage=storage)
    _check_fixed(study, config.with_overrides({"train.lr": 0.5, "data.store": "elsewhere.zarr"}), created, "st")
    with pytest.raises(ConfigError, match="train.epochs is 7 here but 100"):
        _check_fixed(study, config.with_overrides({"train.epochs": 7}), created, "st")
    assert [_join(storage, "st"), _join(storage, "st")] == [0, 1]
    minimise = _study_settings(storage, "loss", {"objective": "val_loss"}, config)
    assert optuna.load_study(study_name="loss", storage=storage).direction.name == "MINIMIZE"
    assert minimise.direction == "minimize"


def test_storage_urls(tmp_path):
    import optuna

    from cellseg.experiments.tune import open_storage, redact

    assert isinstance(open_storage(str(tmp_path / "x.journal")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'x.db'}"), optuna.storages.RDBStorage)
    with pytest.raises(ConfigError, match="folder .* does not exist"):
        open_storage(str(tmp_path / "no" / "x.journal"))
    assert redact("postgresql://me:secret@db:5432/s") == "postgresql://me:***@db:5432/s"


def test_bad_options_are_one_line_and_start_nothing(trainer_store):
    for extra, needle in ((["--study", "a b"], "--study 'a b'"), (["--objective", "speed"], "--objective speed"),
                          (["--lr-range", "1,x"], "--lr-range '1,x'"),
                          (["--ratio-range", "5,1"], "--ratio-range 5.0,1.0"), (["--heartbeat", "0"], "--heartbeat 0")):
        result = runner.invoke(app, ["tune", "--data", str(trainer_store), *extra])
        assert result.exit_code == 1, result.output
        assert needle in result.output and "Traceback" not in result.output
    assert not Path("mlflow.db").exists() and not Path("runs").exists()
    assert not Path("optuna.journal").exists()  # a rejected new study leaves no empty journal


def test_history_figure_and_table_from_trials(tmp_path):
    import optuna

    from cellseg.experiments.tune import StudySettings, history_figure, trials_table
    from cellseg.plots import save_figure

    study = optuna.create_study(direction="maximize")
    for value, pruned in ((0.8, False), (0.7, True), (0.9, False)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
                           "ce_ratio": optuna.distributions.FloatDistribution(0.01, 100, log=True)})
        trial.report(value, 1)
        study.tell(trial, None if pruned else value,
                   state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE)
    table = trials_table(study.trials)
    assert list(table["state"]) == ["COMPLETE", "PRUNED", "COMPLETE"] and "param_lr" in table
    assert save_figure(history_figure(study.trials, StudySettings()), tmp_path / "h.png").stat().st_size > 0


@pytest.mark.slow
def test_a_killed_postgres_worker_is_retried_from_its_checkpoint(trainer_store, mlflow_db, postgres_url):
    """SIGKILL a worker mid-trial; the next worker fails the silent trial and retries it with the same
    parameters, continuing the dead trial's run folder and MLflow run from its last checkpoint."""
    import signal
    import time
    import uuid

    import optuna

    name = f"kill-{uuid.uuid4().hex[:8]}"
    args = tune_args(trainer_store, name, 1, "--storage", postgres_url, "--heartbeat", "1", "--epochs", "8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "cellseg", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    storage = optuna.storages.RDBStorage(postgres_url)  # one connection pool for all the polling
    deadline = time.monotonic() + 240
    while True:  # kill once the trial has reported (and checkpointed) an epoch
        assert worker.poll() is None and time.monotonic() < deadline, "the worker ended before it was killed"
        with contextlib.suppress(KeyError):  # the study does not exist yet
            trials = optuna.load_study(study_name=name, storage=storage).trials
            if trials and trials[0].intermediate_values:
                break
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = optuna.load_study(study_name=name, storage=storage).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING
    epochs_done = max(killed.intermediate_values) + 1
    time.sleep(3.5)  # 3 missed heartbeats

    resumed = subprocess.run([sys.executable, "-m", "cellseg", *args], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "trial 1 complete" in resumed.stderr + resumed.stdout and "retry of trial 0" in resumed.stderr + resumed.stdout
    first, retry = optuna.load_study(study_name=name, storage=storage).trials
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["run_dir"] == first.user_attrs["run_dir"]  # continued, not started over
    assert min(retry.intermediate_values) >= epochs_done  # it trained only the epochs left

    parents, children, client = study_runs(name)
    (child,) = children  # the dead trial's MLflow run, continued and finished
    assert child.info.status == "FINISHED"
    assert child.data.tags["trial"] == "1" and child.data.tags["retry_of"] == "0"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == list(range(1, 9))  # epochs 1..8, each once
