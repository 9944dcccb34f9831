"""The two notebooks run top to bottom at tiny sizes, and are kept without outputs in git.

Parameters are injected papermill-style: a cell assigning the test's values is inserted right after
the cell tagged ``parameters``. The kernel is this interpreter (a kernelspec written for the test), so
the notebooks run against the cellseg under test in whatever venv runs pytest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {"model.encoder": "test_resnet", "data.size": 64, "train.epochs_frozen": 1, "train.epochs": 1,
         "train.batch_size": 2}


def _kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec for this interpreter, found first on JUPYTER_PATH."""
    name = "cellseg-test"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return name


def inject(notebook, values: dict) -> None:
    """Insert a cell setting ``values`` after the cell tagged ``parameters`` (which must exist)."""
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.pop("id", None)
    notebook.cells.insert(position + 1, cell)


def run_notebook(name: str, values: dict, cwd: Path, kernel: str):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject(notebook, values)
    NotebookClient(notebook, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


@pytest.mark.parametrize("name", ["Subimage Generation.ipynb", "Segmentation Model Trainer.ipynb"])
def test_notebooks_are_stored_without_outputs_and_have_a_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: strip the outputs"
    assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.slow
def test_subimage_generation_notebook_runs(tmp_path, monkeypatch):
    kernel = _kernel(tmp_path, monkeypatch)
    run_notebook("Subimage Generation.ipynb", {"DEMO_TILE": 48, "OUT": "crops"}, tmp_path, kernel)

    crops = sorted(p.name for p in (tmp_path / "crops" / "Segmented_Image").iterdir())
    assert len(crops) == 5  # four tiles and the box hanging over the border (clamped)
    assert len(list((tmp_path / "crops" / "Segmented_Masks").iterdir())) == 5
    assert (tmp_path / "crops" / "overview.png").is_file()


@pytest.mark.slow
def test_segmentation_model_trainer_notebook_runs(tmp_path, monkeypatch, mlflow_db):
    kernel = _kernel(tmp_path, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(tmp_path / "mlflow.db", work / "mlflow.db")  # already migrated: saves ~15 s
    values = {"SYNTH": {"cells": 4, "negatives": 2, "size": 64, "seed": 0}, "WORK": str(work), "OVERRIDES": SMALL,
              "COMPARE": ["fluorescence", "all_black"], "CE_WEIGHTS": [0.1, 10], "LR_STEPS": 6}
    notebook = run_notebook("Segmentation Model Trainer.ipynb", values, tmp_path, kernel)

    for produced in ("augment_preview.png", "lr_find/lr_find.png", "runs/fluorescence/checkpoint_last.pt",
                     "compare/compare.csv", "sweep_ce/sweep_ce.csv", "predictions.png"):
        assert (work / produced).exists(), produced
    shown = [o.get("data", {}).get("text/plain", "") for o in notebook.cells[-1].outputs]
    assert any("cellseg-notebook" in text for text in shown)  # the trained model was registered
