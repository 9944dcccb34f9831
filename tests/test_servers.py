"""The real-server fixtures work: MLflow client round trip over HTTP, Optuna shared through PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter

import pytest

pytestmark = pytest.mark.slow  # each starts (once per session) a real server

# One Optuna worker, as a separate process would run it on another machine: wait until every worker
# is up (so they really run at once), then optimise the shared study.
WORKER = """
import pathlib, sys, time
import optuna

url, study_name, worker, barrier, n_workers, n_trials = sys.argv[1:]
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=study_name, storage=url)
pathlib.Path(barrier, worker).touch()
deadline = time.monotonic() + 120
while len(list(pathlib.Path(barrier).iterdir())) < int(n_workers):
    if time.monotonic() > deadline:
        sys.exit("barrier timeout")
    time.sleep(0.05)

def objective(trial):
    trial.set_user_attr("worker", worker)
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.05)  # long enough for the two workers' trials to interleave
    return x * x

study.optimize(objective, n_trials=int(n_trials))
"""


def test_mlflow_server_round_trip(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment(f"servers-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    for step, value in enumerate([0.5, 0.7]):
        client.log_metric(run.info.run_id, "dice", value, step=step)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # through the server's artifact proxy
    client.set_terminated(run.info.run_id)

    fresh = MlflowClient(tracking_uri=mlflow_server)
    history = fresh.get_metric_history(run.info.run_id, "dice")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7)]
    assert fresh.get_run(run.info.run_id).info.status == "FINISHED"
    downloaded = fresh.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert open(downloaded).read() == "hello"


def test_optuna_two_workers_share_a_postgres_study(postgres_url, tmp_path):
    import optuna

    n_workers, n_trials = 2, 6
    name = f"shared-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=postgres_url, direction="minimize")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, name, f"w{i}", str(barrier), str(n_workers), str(n_trials)],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(n_workers)
    ]
    for proc in workers:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err

    trials = optuna.load_study(study_name=name, storage=postgres_url).trials
    total = n_workers * n_trials
    assert sorted(t.number for t in trials) == list(range(total))  # every trial counted once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    per_worker = Counter(t.user_attrs["worker"] for t in trials)
    assert per_worker == {f"w{i}": n_trials for i in range(n_workers)}
    assert sum(per_worker.values()) == len(trials) == total
    # They ran at once: each worker started a trial before the other had finished all of its own.
    spans = {w: [t for t in trials if t.user_attrs["worker"] == w] for w in per_worker}
    first_start = {w: min(t.datetime_start for t in ts) for w, ts in spans.items()}
    last_end = {w: max(t.datetime_complete for t in ts) for w, ts in spans.items()}
    assert first_start["w0"] < last_end["w1"] and first_start["w1"] < last_end["w0"]
