"""The runner tune, compare and sweep-ce share (cellseg.experiments.runner): each refuses a split made
of other data before any work, each continues when run again (sweep-ce as compare, without
`--resume`), and the progress display is the engine callback of their fits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.split import Split, make_split
from cellseg.data.store import open_store
from cellseg.experiments.progress import RunsProgress
from cellseg.experiments.runner import default_name
from experiments_support import TINY, TINY_FIT, one_line_error, small_encoder_file

runner = CliRunner()

# (command, the folder holding its split)
EXPERIMENTS = [
    (["tune", "--trials", "1", "--study", "s"], "runs/tune/s"),
    (["compare", "--strategies", "fluorescence", "--replicates", "1", "--out", "cmp"], "cmp"),
    (["sweep-ce", "--weights", "1", "--out", "ce"], "ce"),
]


@pytest.mark.parametrize(("command", "folder"), EXPERIMENTS, ids=["tune", "compare", "sweep-ce"])
def test_a_split_of_other_data_is_refused_before_any_work(command, folder, trainer_store, mlflow_db):
    split = make_split(open_store(trainer_store), 0.5, 0).model_copy(update={"content_hash": "0" * 16})
    split.save(Path(folder) / "split.json")
    result = runner.invoke(app, [*command, "--data", str(trainer_store), "--config", small_encoder_file(), *TINY])
    one_line_error(result, f"{Path(folder) / 'split.json'}: made for another version of the data", "content hash")
    assert list(Path(folder).iterdir()) == [Path(folder) / "split.json"]  # no run folder, split unchanged
    assert Split.load(Path(folder) / "split.json").content_hash == "0" * 16
    assert not Path("optuna.journal").exists()
    if Path("mlflow.db").exists():
        from mlflow import MlflowClient

        from cellseg.tracking.runs import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri())
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_sweep_ce_run_again_continues_like_compare(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    def sweep(weights: str):
        return runner.invoke(app, ["sweep-ce", "--data", str(trainer_store), "--strategy", "fluorescence",
                                   "--weights", weights, "--out", "ce", "--config", small_encoder_file(), *TINY_FIT])

    first = sweep("1")
    assert first.exit_code == 0, first.output
    kept = Path("ce/weight-1/checkpoint_last.pt").stat().st_mtime_ns
    more = sweep("1,10")  # no --resume: weight 1 is re-read, weight 10 trained, under the same parent run
    assert more.exit_code == 0, more.output
    assert Path("ce/weight-1/checkpoint_last.pt").stat().st_mtime_ns == kept
    assert Path("ce/weight-10/checkpoint_last.pt").is_file()
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name("cellseg").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`cellseg.kind` = 'sweep-ce'")
    assert parent.data.tags["sweep"] == default_name("ce")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["weight"] for c in children) == ["1", "10"]
    assert {c.data.tags["sweep"] for c in children} == {default_name("ce")}


def test_progress_lines_and_the_epoch_bar_of_a_fit():
    class Session:
        run_dir, start_epoch = Path("runs/a"), 1
        cycles = [type("Cycle", (), {"epochs": 3})()]

    quiet = io.StringIO()
    with RunsProgress(2, "runs", console=Console(file=quiet), enabled=False) as progress:
        progress.on_fit_start(Session())
        progress.on_epoch_end(Session(), 2, {"accuracy": 0.5})
        progress.done("a done")
    assert quiet.getvalue() == ""
    plain = io.StringIO()
    with RunsProgress(2, "runs", console=Console(file=plain)) as progress:  # not a terminal: lines only
        progress.on_fit_start(Session())
        progress.done("a done")
    assert plain.getvalue() == "a done\n"
    live = io.StringIO()
    with RunsProgress(2, "runs", console=Console(file=live, force_terminal=True, width=100)) as progress:
        progress.on_fit_start(Session())
        progress.on_epoch_end(Session(), 2, {"accuracy": 0.5})
        assert progress.progress.tasks[1].completed == 2 and progress.progress.tasks[1].total == 3
        progress.done("a done")
        assert progress.progress.tasks[0].completed == 1
    assert "a done" in live.getvalue()
