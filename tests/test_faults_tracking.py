"""Tracking stores under faults: one that cannot be opened fails every command in seconds with one
line (MLflow itself retries for ~100 s), and processes starting together on a new SQLite store create
it once, under its lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app
from experiments_support import TINY_FIT, one_line_error

runner = CliRunner()
UNOPENABLE = {  # what each store is, and the end of the line it gets
    "read-only-file-system": ("sqlite:////proc/cellseg-mlflow.db", "unable to open database file"),
    "a-folder": ("sqlite:///store.db", "unable to open database file"),
    "not-a-database": ("sqlite:///junk.db", "file is not a database"),
}


def commands(store: Path) -> dict[str, list[str]]:
    model = "models:/cellseg-fluorescence@champion"
    return {
        "models list": ["models", "list"],
        "models promote": ["models", "promote", "cellseg-fluorescence", "1"],
        "ui": ["ui"],
        "train": ["train", "--data", str(store), *TINY_FIT, "--run-dir", "runs/t"],
        "tune": ["tune", "--data", str(store), *TINY_FIT, "--trials", "1"],
        "compare": ["compare", "--data", str(store), *TINY_FIT, "--strategies", "fluorescence", "--out", "cmp"],
        "predict": ["predict", model, str(store), "--out", "preds", "--device", "cpu"],
        "evaluate": ["evaluate", model, "--data", str(store), "--out", "ev", "--device", "cpu"],
    }


@pytest.mark.parametrize("kind", UNOPENABLE)
def test_a_store_that_cannot_be_opened_fails_every_command_in_seconds(kind, trainer_store, monkeypatch):
    uri, reason = UNOPENABLE[kind]
    Path("store.db").mkdir()
    Path("junk.db").write_bytes(b"not SQLite " * 100)
    monkeypatch.setattr("cellseg.cli.models.find_mlflow", lambda: "mlflow")  # `ui` needs none on PATH here
    for name, args in commands(trainer_store).items():
        start = time.monotonic()
        result = runner.invoke(app, [*args, "--tracking-uri", uri])
        seconds = time.monotonic() - start
        line = one_line_error(result, "cannot open the SQLite database", reason)
        assert "Traceback" not in result.output and "retried" not in result.output, (name, result.output)
        assert seconds < 5, f"{name}: {seconds:.1f} s ({line})"
    assert not Path("runs").exists() and not Path("optuna.journal").exists()  # nothing started


INIT = """
import sys, time
from pathlib import Path
from cellseg.tracking.runs import check_tracking_uri
while not Path("go").exists():  # start together
    time.sleep(0.01)
check_tracking_uri(sys.argv[1])
"""


@pytest.mark.slow
def test_processes_starting_together_create_a_new_store_once():
    """Without the lock they migrate the same half-made schema at once ("duplicate column name", "table
    _alembic_tmp_metrics already exists")."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    workers = [subprocess.Popen([sys.executable, "-c", INIT, uri], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    time.sleep(3)  # past the imports
    Path("go").touch()
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    assert MlflowClient(uri).get_experiment_by_name("Default") is not None
    assert Path("mlflow.db.lock").is_file()  # the lock beside the store
