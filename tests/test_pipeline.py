"""The reproduction pipeline's files hold together: dvc.yaml with either params file resolves, every
stage command is a valid cellseg command line, the MLproject entry points likewise (and one runs
through `mlflow run --env-manager local`), and the report generator turns results into computed claims."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.data.layouts import load_layout

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"reproduction": "params.yaml", "quick": "params-quick.yaml", "paper": "params-paper.yaml"}
runner = CliRunner()


def parse_cellseg(line: str) -> None:
    """Parse a `cellseg …` command line with the app's own parser (types, required options), not running it."""
    args = shlex.split(line)
    assert args[0] == "cellseg", line
    command, rest, name = typer.main.get_command(app), args[1:], "cellseg"
    while hasattr(command, "list_commands"):
        name, *rest = rest
        sub = command.get_command(typer.Context(command), name)
        assert sub is not None, f"no command '{name}' in: {line}"
        command = sub
    command.make_context(name, list(rest))  # raises click.UsageError / BadParameter on a bad line


def _keys(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}.{k}") for k, v in tree.items())) if tree else {prefix}


def stages(profile: str, tmp_path: Path):
    """dvc.yaml resolved with one profile's params, in a scratch DVC repo (the checkout is not touched)."""
    from dvc.repo import Repo

    work = tmp_path / profile
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / PROFILES[profile], work / "params.yaml")
    Repo.init(str(work), no_scm=True)
    repo = Repo(str(work))
    try:
        return {stage.name: stage for stage in repo.index.stages}, repo.index.graph
    finally:
        repo.close()


def test_every_params_file_has_the_same_keys_and_names_its_profile():
    loaded = {p: yaml.safe_load((ROOT / f).read_text()) for p, f in PROFILES.items()}
    assert _keys(loaded["quick"]) == _keys(loaded["paper"]) == _keys(loaded["reproduction"])
    assert {p: v["profile"] for p, v in loaded.items()} == {p: p for p in PROFILES}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_stage_command_is_a_valid_cellseg_command(profile, tmp_path):
    found, graph = stages(profile, tmp_path)
    assert {"compare", "sweep_ce", "tune", "train_best", "report", "synth@trainer", "ingest@external",
            "generalise@best"} <= set(found)
    for stage in found.values():
        for line in stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]:
            assert "${" not in line
            if not line.startswith("mkdir -p "):
                parse_cellseg(line)
    assert len(graph.nodes) == len(found)  # one connected pipeline: report depends on everything
    report = found["report"]
    import networkx as nx

    assert nx.descendants(graph, report) | {report} == set(graph.nodes)  # DVC edges: stage -> its deps


def test_generalisation_models_are_outputs_of_the_pipeline():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    compared = params["compare"]["strategies"].split(",")
    for name, path in params["generalisation"]["models"].items():
        assert path == "results/best/run" or path == f"results/compare/runs/{name}-r1", name
        assert name == "best" or name in compared


def test_stage_outputs_are_named_as_the_commands_write_them():
    from cellseg.experiments import lr_find, sweep_ce

    text = (ROOT / "dvc.yaml").read_text()
    for name in (lr_find.JSON_NAME, lr_find.PNG_NAME, sweep_ce.CSV_NAME, sweep_ce.PNG_NAME, sweep_ce.PREDICTIONS_NAME,
                 "compare.csv", "compare_runs.csv", "trials.csv", "metrics.json"):
        assert name in text


def test_mlproject_entry_points_build_valid_cellseg_commands(tmp_path):
    from mlflow.projects._project_spec import load_project

    (tmp_path / "store.zarr").mkdir()
    project = load_project(str(ROOT))
    assert {"main", "tune", "compare", "lr_find", "sweep_ce"} <= set(project._entry_points)
    for name in project._entry_points:
        entry = project.get_entry_point(name)
        line = entry.compute_command({"data": str(tmp_path / "store.zarr"), "epochs": "2"}, str(tmp_path))
        parse_cellseg(line)
        assert line.endswith("--epochs 2")  # undeclared parameters pass through as options


@pytest.mark.slow
def test_mlflow_run_tune_entry_point_with_local_env(tmp_path, trainer_store, mlflow_db):
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "small.yaml").write_text("model:\n  encoder: test_resnet\ntrain:\n  batch_size: 2\n")
    venv = Path(sys.executable).parent  # as if activated: the entry point's `cellseg` is this one
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    mlflow = venv / "mlflow"
    result = subprocess.run(
        [str(mlflow), "run", str(tmp_path), "-e", "tune", "--env-manager", "local", "-P", f"data={trainer_store}",
         "-P", "trials=2", "-P", "config=small.yaml", "-P", "size=64", "-P", "epochs-frozen=0", "-P", "epochs=1",
         "-P", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["model"]["encoder"] == "test_resnet" and best["data"]["size"] == 64
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # not the process-wide URI an earlier test may have set
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`cellseg.kind` = 'tune'")
    assert len(runs) == 1  # the study's parent run, in the store MLflow handed to the entry point


# --- the report ---------------------------------------------------------------------------------------

STRATEGIES = {"fluorescence": 0.95, "membrane": 0.96, "cytoplasm": 0.93, "random": 0.92, "brightfield": 0.90,
              "mitochondria": 0.88, "all_black": 0.80}


def fake_results(root: Path) -> None:
    """Results as the pipeline writes them, with numbers chosen so the expected claims are known."""
    (root / "compare").mkdir(parents=True)
    rows = [{"strategy": s, "n": 2, "epochs": 3, **{f"{m}_{x}": math.nan for m in
             ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "val_loss") for x in ("mean", "sd")}}
            for s in STRATEGIES]
    summary = pd.DataFrame(rows)
    summary["accuracy_mean"] = list(STRATEGIES.values())
    summary["accuracy_sd"] = 0.001
    summary["cell_accuracy_mean"] = [0.8] * 6 + [0.0]
    summary["background_accuracy_mean"] = [0.97] * 6 + [1.0]
    summary.to_csv(root / "compare" / "compare.csv", index=False)
    runs = pd.DataFrame([{"strategy": s, "replicate": 1, "epoch": e, "accuracy": a - 0.01 * (3 - e), "cell_accuracy": 0.8}
                         for s, a in STRATEGIES.items() for e in (1, 2, 3)])
    runs.to_csv(root / "compare" / "compare_runs.csv", index=False)
    (root / "qc").mkdir()
    otsu = {"cyto_total": 0.9, "memb_total": 0.6, "mito_total": 0.3}
    pd.DataFrame([{"store": "trainer.zarr", "channel": c, "interior_contrast": 1.0, "edge_contrast": 1.0,
                   "otsu_dice": otsu.get(c, 0.4 if c.startswith("bf_") else 0.5), "snr": 5.0, "floor": 0.0,
                   "saturated": 0.0, "stacks": 4, "constant": False} for c in load_layout("trainer").channel_names]
                 ).to_csv(root / "qc" / "qc.csv", index=False)
    (root / "sweep_ce").mkdir()
    peak = [0.85, 0.90, 0.95, 0.91, 0.80]
    pd.DataFrame({"weight": [0.01, 0.1, 1, 10, 100], "strategy": "fluorescence", "peak_accuracy": peak,
                  "accuracy": [p - 0.01 for p in peak], "wrong_background": [0.01, 0.02, 0.04, 0.08, 0.2],
                  "wrong_cell": [0.6, 0.3, 0.1, 0.05, 0.01], "wrong_overall": [0.1, 0.08, 0.05, 0.09, 0.2]}
                 ).to_csv(root / "sweep_ce" / "sweep_ce.csv", index=False)
    (root / "tune" / "runs").mkdir(parents=True)
    pd.DataFrame({"trial": [0, 1], "state": ["COMPLETE", "PRUNED"], "value": [0.93, None], "param_lr": [1e-3, 1e-1],
                  "param_ce_ratio": [0.5, 3.0]}).to_csv(root / "tune" / "runs" / "trials.csv", index=False)
    (root / "best" / "run").mkdir(parents=True)
    history = [{"epoch": e, "phase": 1 + (e > 1), "lr": 1e-3, "train_loss": 0.5, "val_loss": 0.4, "accuracy": 0.9 + e / 100,
                "background_accuracy": 0.95, "cell_accuracy": 0.7, "dice": 0.6, "iou": 0.5} for e in (1, 2, 3)]
    (root / "best" / "run" / "metrics.json").write_text(json.dumps(history))
    for model, codes, test, external in (("best", [0, 3, 6], 0.85, None), ("membrane", [3, 3, 3], 0.95, None),
                                         ("cytoplasm", [0, 0, 0], 0.70, 0.88)):
        folder = root / "generalisation" / model
        (folder / "test").mkdir(parents=True)
        (folder / "test" / "summary.json").write_text(json.dumps([{"scope": "all", "accuracy": test, "cell_accuracy": 0.5}]))
        (folder / "external").mkdir()
        record = {"model": model, "applicable": external is not None, "source_layout": "trainer",
                  "target_layout": "external", "source_codes": codes,
                  "target_codes": codes if external is not None else None,
                  "reason": None if external is not None else "input 1 (code 3) reads memb_total, which layout "
                                                              "'external' does not have"}
        (folder / "external" / "transfer.json").write_text(json.dumps(record))
        if external is not None:
            (folder / "external" / "summary.json").write_text(
                json.dumps([{"scope": "all", "accuracy": external, "cell_accuracy": 0.6}]))


def test_report_from_fake_results_states_computed_claims(tmp_path, trainer_store):
    fake_results(tmp_path / "results")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trainer.zarr").symlink_to(trainer_store)
    params = yaml.safe_load((ROOT / "params-quick.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    result = runner.invoke(app, ["report", "--results", "results", "--data", "data", "--params", "params.yaml",
                                 "--out", "reports/paper.md"])

    assert result.exit_code == 0, result.output
    text = (tmp_path / "reports" / "paper.md").read_text()
    assert "profile `quick`" in text and "Differs from the paper's protocol" in text
    # threshold Dice: the best input channel's Otsu Dice; random (code 107) draws from all 16 channels
    assert "| fluorescence | 95.0% ± 0.1 (n=2) | 80.0% | 97.5% | -2.5 pts | 2 / 1 | 0.900 |" in text
    assert "| random | 92.0% ± 0.1 (n=2) | 80.0% | 95.1% | -3.1 pts | 4 / 4 | 0.475 |" in text
    assert "| all_black | 80.0% ± 0.1 (n=2) ⚠ | 0.0% | 81.0% | -1.0 pts | 7 / 7 | 0.000 |" in text
    reach = [0.9, 0.6, 0.9, 0.475, 0.4, 0.3, 0.0]
    rho = np.corrcoef(pd.Series(list(STRATEGIES.values())).rank(), pd.Series(reach).rank())[0, 1]
    assert f"follows the threshold Dice of their inputs with Spearman ρ {rho:+.2f}" in text
    assert "each fluorescent label is missing from 20% of cells" in text
    assert "| bf_m10 | 1.000 | 1.000 | 0.400 | 5.000 | 0.05 / 0.17 / 0.20 |" in text
    # fluorescence/membrane is the one pair out of the paper's order (0.95 < 0.96, sds 0.001)
    assert "20 are in the paper's order, 1 reversed and 0 within replicate noise" in text
    assert "ours is membrane (the paper's best is fluorescence)" in text
    assert "predicts background everywhere" in text and "Every strategy beats all black" in text
    assert "ours is highest at w = 1, the paper's at w = 1 (matches)" in text
    assert "rises to one peak inside the range and falls after it (the paper's does)" in text
    assert "wrong cell pixels fall (Spearman ρ -1.00) and wrong background pixels rise (ρ +1.00)" in text
    assert "ours does too" in text  # 0.80 at w=100 < 0.85 at w=0.01, as the paper's 83.6 < 88.7
    assert "cell weight w = 2 relative to background" in text
    assert "| cytoplasm | 0,0,0 | 93.0% | 70.0% | -23.0 pts | cyto_total | 88.0% (codes 0,0,0) |" in text
    assert "n/a: input 1 (code 3) reads memb_total" in text
    assert ("models reading the relabelled channels (best, cytoplasm) change by -15.5 pts on average from trainer "
            "to test; models not reading them (membrane) change by -1.0 pts.") in text
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["ordering"]["reversed"] == 1 and metrics["ce_shape"]["peak_weight"] == 1.0
    assert metrics["strategies"]["all_black"]["paper"] == 0.81 and metrics["generalisation"]["membrane"]["external"] is None
    assert metrics["strategies"]["membrane"]["threshold_dice"] == 0.6
    for figure in ("strategies.png", "ce_tradeoff.png", "generalisation.png", "best_learning_curves.png"):
        assert (tmp_path / "reports" / "figures" / figure).is_file()
        assert f"figures/{figure}" in text


def test_report_of_a_pipeline_that_has_not_run_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    result = runner.invoke(app, ["report", "--results", "results", "--out", "r/paper.md"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "paper.md").read_text()
    assert "Not run (no results/compare/compare.csv)" in text and "Not run (no results/generalisation)" in text


def test_a_flat_ce_peak_is_reported_as_a_plateau_not_as_the_paper_s_shape():
    from cellseg.reports.analysis import ce_shape
    from cellseg.reports.paper import _peak_verdict

    flat = pd.DataFrame({"weight": [0.01, 0.1, 1, 10, 100], "peak_accuracy": [0.84, 0.84, 0.84, 0.57, 0.16],
                         "wrong_cell": [1, 1, 1, 0.7, 0], "wrong_background": [0, 0, 0, 0.4, 1]})
    shape = ce_shape(flat)
    assert shape.peak_weights == [0.01, 0.1, 1.0] and not shape.rises_then_falls and shape.high_end_lower is None
    assert _peak_verdict(shape.peak_weights, [1.0]) == "the paper's peak is on our plateau, which is wider"
