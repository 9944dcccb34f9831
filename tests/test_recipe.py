"""A model records its resolved input recipe (issue 13): predict, evaluate and transfer build its inputs
from that record alone, whatever the codes files of the shell say; older models still load, with one note."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from experiments_support import one_line_error, tiny_config

from cellseg.cli.main import app
from cellseg.data.codes import CODES_ENV, record_codes, resolve_codes
from cellseg.data.layouts import load_layout
from cellseg.engine.checkpoint import load_checkpoint, save_checkpoint
from cellseg.engine.loop import fit
from cellseg.inference.predict import input_plan
from cellseg.inference.transfer import plan_transfer
from cellseg.tracking.models import load_trained_model

pytestmark = pytest.mark.slow

runner = CliRunner()
TRAINER = load_layout("trainer")
CODES = [150, 151, 212]  # 150 and 151 exist only in the user's codes file
CUSTOM = """codes:
  150: {op: merge, channels: [cyto_total, memb_total], merge_dropout: true}
  151: {op: random, channels: [bf_m3, bf_0, bf_p3], channel_dropout: 0.25}
"""
CHANGED = """codes:
  150: {op: black}
  151: {op: channel, channels: [mito_total]}
"""


@pytest.fixture(scope="module")
def codes_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("codes")
    (folder / "custom.yaml").write_text(CUSTOM)
    (folder / "changed.yaml").write_text(CHANGED)
    return {"custom": str(folder / "custom.yaml"), "changed": str(folder / "changed.yaml")}


@pytest.fixture(scope="module")
def recipe_run(trainer_store, codes_files, tmp_path_factory) -> Path:
    """A run folder of a tiny model trained with CODES while CELLSEG_CODES named the custom file."""
    folder = tmp_path_factory.mktemp("recipe") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CODES_ENV, codes_files["custom"])
        fit(tiny_config(trainer_store, **{"data.codes": CODES, "train.epochs_frozen": 1, "train.epochs": 0}), folder)
    return folder


def predict_masks(model: Path, store: Path, out: str) -> tuple[str, dict[str, np.ndarray]]:
    result = runner.invoke(app, ["predict", str(model), str(store), "--out", out, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    masks = {p.relative_to(out).as_posix(): np.array(Image.open(p)) for p in sorted(Path(out).rglob("masks/**/*.png"))}
    assert masks
    return result.output, masks


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_model_records_each_code_resolved(recipe_run):
    metadata = load_trained_model(recipe_run).metadata
    assert metadata["input_schema"] == 3 and metadata["codes"] == CODES
    merge, random, dropout = metadata["recipe"]
    assert merge == {"code": 150, "op": "merge", "channels": [0, 3], "channel_names": ["cyto_total", "memb_total"],
                     "merge_dropout": True, "channel_dropout": False, "dropout_code": False}
    assert random["op"] == "random" and random["channel_names"] == ["bf_m3", "bf_0", "bf_p3"]
    assert random["channel_dropout"] == 0.25
    assert dropout == {"code": 212, "op": "channel", "channels": [12], "channel_names": ["bf_0"],
                       "merge_dropout": False, "channel_dropout": False, "dropout_code": True}


def test_predict_needs_no_codes_file_and_ignores_a_changed_one(recipe_run, trainer_store, codes_files, monkeypatch):
    monkeypatch.setenv(CODES_ENV, codes_files["custom"])
    _, trained_with = predict_masks(recipe_run, trainer_store, "with")
    recorded = input_plan(load_trained_model(recipe_run)).recipes

    monkeypatch.delenv(CODES_ENV)  # a shell without the file: codes 150 and 151 are unknown today
    output, without = predict_masks(recipe_run, trainer_store, "without")
    assert same(without, trained_with) and "note:" not in output

    monkeypatch.setenv(CODES_ENV, codes_files["changed"])  # the codes redefined since training
    assert resolve_codes(CODES, TRAINER, 0.0, 0.0).recipes != recorded
    assert input_plan(load_trained_model(recipe_run)).recipes == recorded
    _, changed = predict_masks(recipe_run, trainer_store, "changed")
    assert same(changed, trained_with)


def _variant(run: Path, folder: Path, **changes) -> Path:
    """A copy of ``run``'s checkpoint with metadata keys replaced (None: removed)."""
    state = load_checkpoint(run / "checkpoint_last.pt")
    metadata = {**state["metadata"], **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    save_checkpoint(folder / "checkpoint_last.pt", {"metadata": metadata, "model": state["model"]})
    return folder


def test_a_model_without_a_recipe_uses_todays_codes_with_one_line(recipe_run, trainer_store, codes_files,
                                                                    monkeypatch, tmp_path):
    legacy = _variant(recipe_run, tmp_path / "legacy", recipe=None, input_schema=2)
    monkeypatch.setenv(CODES_ENV, codes_files["custom"])
    output, masks = predict_masks(legacy, trainer_store, "legacy")
    notes = [line for line in output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "records no input recipe" in notes[0]
    assert "today's definitions of its codes 150,151,212" in notes[0]
    assert same(masks, predict_masks(recipe_run, trainer_store, "recorded")[1])

    monkeypatch.delenv(CODES_ENV)  # today's codes lack 150: one line, as for any unknown code
    result = runner.invoke(app, ["predict", str(legacy), str(trainer_store), "--out", "x", "--device", "cpu"])
    one_line_error(result, "unknown loading code 150")


def test_a_recipe_that_does_not_fit_its_layout_is_one_line(recipe_run, trainer_store, tmp_path):
    recipe = load_trained_model(recipe_run).metadata["recipe"]
    bad = _variant(recipe_run, tmp_path / "bad", recipe=[{**recipe[0], "channel_names": ["bf_0", "memb_total"]},
                                                         *recipe[1:]])
    result = runner.invoke(app, ["predict", str(bad), str(trainer_store), "--out", "x", "--device", "cpu"])
    one_line_error(result, str(bad), "input recipe of code 150", "bf_0")


def test_transfer_maps_the_recorded_recipe_without_the_codes_file(codes_files, monkeypatch):
    monkeypatch.setenv(CODES_ENV, codes_files["custom"])
    (random,) = record_codes([151], TRAINER)
    monkeypatch.delenv(CODES_ENV)
    single = random.model_copy(update={"channels": (12, 0), "channel_names": ("bf_0", "cyto_total")})
    metadata = {"codes": [151], "layout": TRAINER.model_dump(mode="json"), "recipe": [single.model_dump(mode="json")]}
    mapped = plan_transfer(metadata, load_layout("external"))
    assert mapped.applicable and mapped.target_codes == [151]
    (entry,) = mapped.target_recipe
    assert entry["channels"] == [5, 0] and entry["channel_names"] == ["bf_0", "cyto"]
    assert entry["channel_dropout"] == 0.25  # the definition's own dropout travels with it
