"""`cellseg train`: shared option mapping, one-line errors before any training, and a CPU run
end to end through MLflow including resume-to-extend from the command line."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.cli.options import TrainingOptions, with_options
from cellseg.errors import ConfigError
from experiments_support import one_line_error, small_encoder_file

runner = CliRunner()
TINY = ["--size", "64", "--batch-size", "2", "--epochs-frozen", "1", "--epochs", "1", "--device", "cpu"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_options_map_to_config_keys(tmp_path):
    options = TrainingOptions(data=Path("s.zarr"), profile="quick", codes="0,3,206", lr=0.01, ce_weights="1,10",
                              epochs=7, seed=5)
    config = options.load()
    assert config.data.codes == [0, 3, 206] and config.data.strategy is None
    assert config.train.lr == 0.01 and config.train.ce_weights == [1.0, 10.0] and config.seed == 5
    assert config.train.epochs == 7  # the option beats the profile …
    assert config.data.size == 96  # … and the profile beats the defaults
    user = tmp_path / "user.yaml"
    user.write_text("data:\n  codes: [12, 12, 12]\n")
    assert TrainingOptions(config=user).load().data.codes == [12, 12, 12]
    assert TrainingOptions(config=user, strategy="membrane").load().data.codes is None  # CLI strategy wins
    with pytest.raises(ConfigError, match="--profile huge: unknown profile"):
        TrainingOptions(profile="huge").load()
    with pytest.raises(ConfigError, match="--ce-weights '1,x'"):
        TrainingOptions(ce_weights="1,x").load()


def test_with_options_gives_any_command_the_same_options():
    demo = typer.Typer()
    got = {}

    @demo.command()
    @with_options(TrainingOptions, "options")
    def other(options: TrainingOptions, out: str = "x") -> None:
        got["config"], got["out"] = options.load(), out

    result = runner.invoke(demo, ["--lr", "0.5", "--epochs-frozen", "2", "--out", "y"])
    assert result.exit_code == 0, result.output
    assert got["config"].train.lr == 0.5 and got["config"].train.epochs_frozen == 2 and got["out"] == "y"


def test_tracking_uri_precedence_and_absolute_sqlite(tmp_path, monkeypatch):
    from cellseg.tracking.runs import resolve_tracking_uri

    here = f"sqlite:///{tmp_path.as_posix()}"
    assert resolve_tracking_uri() == f"{here}/mlflow.db"  # MLflow's default store, in the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri() == "http://env:5000"
    assert resolve_tracking_uri("sqlite:///runs/t.db?timeout=9") == f"{here}/runs/t.db?timeout=9"
    assert resolve_tracking_uri("sqlite:////abs/t.db") == "sqlite:////abs/t.db"


def test_missing_store_is_one_line(mlflow_db):
    one_line_error(invoke("train", "--data", "nowhere.zarr", *TINY), "nowhere.zarr", "store not found")


def test_unknown_strategy_is_one_line(trainer_store, mlflow_db):
    one_line_error(invoke("train", "--data", str(trainer_store), "--strategy", "telepathy", *TINY), "telepathy")


def test_store_lacking_the_codes_channels_is_one_line(trainer_store, mlflow_db):
    result = invoke("train", "--data", str(trainer_store), "--codes", "0,3,40", *TINY)
    one_line_error(result, "40")
    assert not Path("runs").exists() or not any(Path("runs").rglob("checkpoint_last.pt"))


def http_limits(monkeypatch) -> None:
    """check_tracking_uri caps MLflow's HTTP retries via the environment: keep that inside the test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def test_unreachable_tracking_server_fails_in_seconds(trainer_store, monkeypatch):
    http_limits(monkeypatch)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = invoke("train", "--data", str(trainer_store), "--tracking-uri", f"http://127.0.0.1:{port}", *TINY)
    one_line_error(result, f"http://127.0.0.1:{port}", "not reachable")
    assert not Path("runs").exists()  # checked before any data is loaded or any epoch trained
    assert time.monotonic() - start < 60  # the check's own timeout is 5 s; the rest is importing torch & co.


def test_resume_needs_a_run_folder(tmp_path):
    one_line_error(invoke("train", "--resume"), "--resume needs --run-dir")
    one_line_error(invoke("train", "--resume", "--run-dir", str(tmp_path / "none")), "nothing to resume")


@pytest.mark.slow
def test_train_then_extend_from_the_command_line(trainer_store, mlflow_db, monkeypatch):
    import getpass
    import sys

    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    # what the shell would have passed (CliRunner leaves sys.argv alone): the source tag records it
    monkeypatch.setattr(sys, "argv", ["/venv/bin/cellseg", "train", "--tracking-uri", "postgresql://me:s3cret@db/x",
                                      "--register-as", "tiny"])
    first = invoke("train", "--data", str(trainer_store), "--seed", "1", "--config", small_encoder_file(),
                   "--run-dir", "runs/a", "--register-as", "tiny", *TINY)
    assert first.exit_code == 0, first.output
    assert "epoch 2/2" in first.output and "registered: models:/tiny/1" in first.output
    # the count is explained: the phases add up, and each line says where it is within its phase
    assert "2 epochs = phase 1: 1 with the encoder frozen (--epochs-frozen) + phase 2: 1 unfrozen" in first.output
    assert "epoch 1/2 (phase 1) frozen 1/1 ·" in first.output and "epoch 2/2 (phase 2) unfrozen 1/1 ·" in first.output
    again = invoke("train", "--run-dir", "runs/a", "--resume", "--epochs", "2")
    assert again.exit_code == 0, again.output
    assert "epoch 3/3 (phase 3)" in again.output and "registered: models:/tiny/2" in again.output
    assert "phase 3: 1 unfrozen (--epochs raised on resume); resuming after epoch 2" in again.output

    client = MlflowClient(resolve_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [1, 2, 3]
    assert run.data.params["train.epochs"] == "1" and run.data.tags["cellseg.resumed.train.epochs"] == "2"
    assert client.get_registered_model("tiny").aliases == {"champion": 1, "challenger": 2}
    # the MLflow UI's name, "Created by" and "Source": what ran (strategy fluorescence = codes 0,3,6 in
    # configs/strategies.yaml; --size 64 crops: default.yaml's resize none), who ran it, the command
    assert run.info.run_name == "fluorescence · 0,3,6 · 64px crops"
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == "cellseg train --tracking-uri 'postgresql://me:***@db/x' --register-as tiny"
    assert "s3cret" not in str(tags)
    # the parameters agree: data.codes holds the codes the strategy resolved to, not None
    assert run.data.params["data.codes"] == run.data.params["codes"] == "0,3,6"
    assert run.data.params["data.strategy"] == run.data.params["strategy"] == "fluorescence"


@pytest.mark.slow
def test_train_under_mlflow_run_logs_into_its_run(trainer_store, mlflow_db, monkeypatch):
    """`mlflow run` starts the command with MLFLOW_RUN_ID set: training fills that run, creating no other."""
    from mlflow import MlflowClient

    from cellseg.inference.predict import input_plan
    from cellseg.tracking.models import load_trained_model
    from cellseg.tracking.runs import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri())
    project = client.create_run(client.create_experiment("project")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project)
    result = invoke("train", "--data", str(trainer_store), "--config", small_encoder_file(), "--run-dir", "runs/p",
                    "--no-register", *TINY)
    assert result.exit_code == 0, result.output
    assert f"run: {project}" in result.output
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [project]
    assert [m.step for m in client.get_metric_history(project, "accuracy")] == [1, 2]
    run = client.get_run(project)
    assert run.info.status == "FINISHED" and run.data.params["codes"] == "0,3,6"
    assert run.data.tags["strategy"] == "fluorescence" and "cellseg.model_uri" in run.data.tags
    trained = load_trained_model(run.data.tags["cellseg.model_uri"], tracking_uri=resolve_tracking_uri())
    assert trained.metadata["recipe"][1]["channel_names"] == ["memb_total"]  # the recipe survives MLflow's YAML
    assert input_plan(trained).codes == [0, 3, 6]


@pytest.mark.slow
def test_train_against_a_tracking_server(trainer_store, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    http_limits(monkeypatch)
    result = invoke("train", "--data", str(trainer_store), "--config", small_encoder_file(), "--run-dir", "runs/s",
                    "--tracking-uri", mlflow_server, "--experiment", "over-http", "--register-as", "tiny-http", *TINY)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("over-http").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cellseg.registered"] == "models:/tiny-http/1"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/learning_curves.png", "plots/predictions.png"}
    assert not Path("mlflow.db").exists()  # nothing went to the local default store


def test_run_label_says_what_ran():
    from types import SimpleNamespace

    from cellseg.tracking.runs import run_label

    crops = SimpleNamespace(size=96, resize="none", scale=1.0)
    assert run_label("fluorescence", [0, 3, 6], crops) == "fluorescence · 0,3,6 · 96px crops"
    assert run_label(None, [0, 3, 206], SimpleNamespace(size=128, resize="stack", scale=0.5)) == \
        "codes 0,3,206 · 128px stacks"  # resize stack: the scale plays no part
    assert run_label("membrane", [3, 3, 3], SimpleNamespace(size=64, resize="none", scale=0.5)) == \
        "membrane · 3,3,3 · 64px crops ×0.5"


def test_command_line_and_source_tags(tmp_path, monkeypatch):
    import getpass
    import shutil
    import subprocess

    from cellseg.tracking import runs

    assert runs.command_line(["/v/bin/cellseg", "train", "--tracking-uri=http://u:pw@h:5000", "--data", "a b.zarr"]) \
        == "cellseg train '--tracking-uri=http://u:***@h:5000' --data 'a b.zarr'"  # quoted: pasteable
    assert runs.command_line(["/site/cellseg/__main__.py", "tune", "--storage", "postgresql://me:x@db/s"]) \
        == "python -m cellseg tune --storage 'postgresql://me:***@db/s'"
    assert len(runs.command_line(["cellseg", "x" * 5000])) == runs.SOURCE_NAME_MAX

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["/v/bin/cellseg", "compare"])
    tags = runs.source_tags()
    assert tags == {"mlflow.source.type": "LOCAL", "mlflow.source.name": "cellseg compare",
                    "mlflow.user": getpass.getuser()}  # not in a git checkout: no commit

    def no_login():
        raise OSError("no user name")

    monkeypatch.setattr(getpass, "getuser", no_login)
    assert runs.source_tags()["mlflow.user"] == "unknown"
    if shutil.which("git") is None:
        return
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert runs.source_tags()["mlflow.source.git.commit"] == head


def test_run_name_gets_the_folder_only_when_taken(mlflow_db, tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from cellseg.config import Config
    from cellseg.tracking.runs import MlflowCallback, experiment_id, resolve_tracking_uri

    callback = MlflowCallback(experiment="names")
    client = MlflowClient(resolve_tracking_uri())
    exp = experiment_id(client, "names")
    data = Config().data.model_copy(update={"size": 96, "resize": "stack"})
    session = SimpleNamespace(plan=SimpleNamespace(strategy="fluorescence", codes=(0, 3, 6)),
                              config=SimpleNamespace(data=data), run_dir=tmp_path / "fluorescence-20261130-064744")
    assert callback._run_name(session, exp) == "fluorescence · 0,3,6 · 96px stacks"
    client.create_run(exp, run_name="fluorescence · 0,3,6 · 96px stacks")
    assert callback._run_name(session, exp) == "fluorescence · 0,3,6 · 96px stacks · fluorescence-20261130-064744"
    session.plan = SimpleNamespace(strategy="it's", codes=(1,))  # a quote in a name: looked up all the same
    assert callback._run_name(session, exp) == "it's · 1 · 96px stacks"
    client.create_run(exp, run_name="it's · 1 · 96px stacks")
    assert callback._run_name(session, exp) == "it's · 1 · 96px stacks · fluorescence-20261130-064744"


def test_epoch_lines_explain_the_count():
    from cellseg.engine.progress import epoch_line, schedule_line
    from cellseg.engine.schedule import Cycle

    cycles = [Cycle(1, 1), Cycle(2, 6)]
    assert schedule_line(cycles) == ("7 epochs = phase 1: 1 with the encoder frozen (--epochs-frozen) + "
                                     "phase 2: 6 unfrozen (--epochs)")
    assert schedule_line([Cycle(2, 1)], 0) == "1 epoch = phase 2: 1 unfrozen (--epochs)"
    record = {"epoch": 4, "phase": 2, "train_loss": 0.25}
    assert epoch_line(record, 7, cycles).startswith("epoch 4/7 (phase 2) unfrozen 3/6 · train_loss 0.2500 ")
    first = epoch_line({"epoch": 1, "phase": 1}, 7, cycles)
    assert first.startswith("epoch 1/7 (phase 1) frozen 1/1 · train_loss nan")
    assert epoch_line(record, 7).startswith("epoch 4/7 (phase 2) train_loss")  # without the cycles: as before
