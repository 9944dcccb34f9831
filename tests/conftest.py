"""Shared fixtures: tiny synthetic data made by the tests themselves, never downloaded."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # pytest-xdist runs one worker per core

# Real servers on loopback (mlflow_server, postgres_url, s3_endpoint) from tests/servers.py, importable
# because pytest's default (prepend) import mode puts this folder on sys.path.
pytest_plugins = ["servers"]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default stores (mlflow.db, optuna.journal) never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def synth_trainer(tmp_path_factory):
    """A tiny `trainer`-layout dataset on disk (SPEC 2.1 layout): 4 cells + 2 controls, 64 px."""
    from cellseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "trainer"
    synthesize(root, layout="trainer", cells=4, negatives=2, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def trainer_store(synth_trainer, tmp_path_factory):
    """The tiny `trainer` dataset ingested into a Zarr store."""
    from cellseg.data.ingest import ingest

    out = tmp_path_factory.mktemp("stores") / "trainer.zarr"
    ingest(synth_trainer, out, layout="trainer")
    return out


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty, migrated MLflow SQLite store: creating one costs ~15 s, copying it next to nothing."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(_mlflow_template, tmp_path):
    """The default tracking URI (sqlite:///mlflow.db in the test's folder), already migrated."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    return "sqlite:///mlflow.db"
