"""Shared fixtures: tiny synthetic data made by the tests themselves, never downloaded."""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # pytest-xdist runs one worker per core

# Real servers on loopback (mlflow_server, postgres_url, s3_endpoint) from tests/servers.py, importable
# because pytest's default (prepend) import mode puts this folder on sys.path.
pytest_plugins = ["servers"]


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default stores (mlflow.db, optuna.journal) never leak, and
    starts and ends with MLflow's process-wide tracking and registry URIs unset: `set_tracking_uri` (the CLI
    commands call it too) would otherwise point the next test in this process at this test's store."""
    monkeypatch.chdir(tmp_path)
    for name in MLFLOW_URI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    _unset_mlflow_uris()
    yield
    _unset_mlflow_uris()  # before monkeypatch puts back any variable the run started with


def _unset_mlflow_uris() -> None:
    if "mlflow" not in sys.modules:  # nothing set yet, and importing it costs seconds
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if tracking_utils._tracking_uri is not None:
        tracking_utils.set_tracking_uri(None)
    registry_utils._registry_uri = None  # set_registry_uri(None) keeps the variable it exported
    for name in MLFLOW_URI_VARIABLES:  # exported by set_*_uri for subprocesses
        os.environ.pop(name, None)


# --- servers the suite needs: a skip says so in the summary, and fails where they are required -----------

SERVER_FIXTURES = ("postgres_url", "mlflow_server", "s3_endpoint")
REQUIRE_SERVICES = "CELLSEG_REQUIRE_SERVICES"  # =1 (set by .ci/run): a server test that cannot run fails
SERVER_SKIP = "cellseg_server_skip"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "setup" and report.skipped and any(f in item.fixturenames for f in SERVER_FIXTURES):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.user_properties.append((SERVER_SKIP, reason))  # travels from xdist workers to the summary
        if os.environ.get(REQUIRE_SERVICES) == "1":
            report.outcome = "failed"
            report.longrepr = f"{REQUIRE_SERVICES}=1 but this test's server could not start: {reason}"
    return report


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if any(key == SERVER_SKIP for key, _ in getattr(r, "user_properties", ()))]
    if skipped:
        reasons = sorted({value for r in skipped for key, value in r.user_properties if key == SERVER_SKIP})
        terminalreporter.section("servers", sep="!", red=True, bold=True)
        terminalreporter.line(f"{len(skipped)} server test(s) SKIPPED, not run (set {REQUIRE_SERVICES}=1 to fail "
                              "instead; scripts/ensure_services.sh installs PostgreSQL):", red=True, bold=True)
        for reason in reasons:
            terminalreporter.line(f"  {reason}", red=True)


@pytest.fixture(scope="session")
def synth_trainer(tmp_path_factory):
    """A tiny `trainer`-layout dataset on disk (docs/data.md layout): 4 cells + 2 controls, 64 px."""
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
    """The default tracking store (mlflow.db in the test's folder, what `sqlite:///mlflow.db` means there),
    already migrated; its URI written absolute: MLflow caches one store per URI string, so in a process that
    already used the relative form it would still reach an earlier test's folder."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
