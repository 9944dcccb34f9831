"""cellseg transfer: a model's codes mapped to same-meaning channels of another layout, or refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from experiments_support import synthetic_store

from cellseg.cli.main import app
from cellseg.data.layouts import load_layout
from cellseg.engine.checkpoint import save_checkpoint
from cellseg.data.codes import record_codes
from cellseg.inference.transfer import NotApplicable, map_recipe
from cellseg.model import build_model

runner = CliRunner()
TRAINER, TEST, EXTERNAL = (load_layout(name) for name in ("trainer", "test", "external"))


def map_codes(codes, source, target):
    """The code numbers of ``codes``' inputs mapped from ``source`` onto ``target``."""
    return [r.code for r in map_recipe(record_codes(codes, source), source, target)]


@pytest.mark.parametrize(("codes", "target", "expected"), [
    ([0, 0, 0], EXTERNAL, [0, 0, 0]),  # cytoplasm total is channel 0 in both
    ([12, 12, 12], EXTERNAL, [5, 5, 5]),  # in-focus brightfield: 12 -> 5
    ([212, 12], EXTERNAL, [205, 5]),  # channel dropout kept
    ([110, 110, 110], EXTERNAL, [110, 110, 110]),  # black needs no channel
    ([101, 12, 102], TEST, [101, 12, 102]),  # brightfield is unchanged in the test layout
    ([3, 6], TEST, [3, 6]),
])
def test_codes_map_to_same_meaning_channels(codes, target, expected):
    assert map_codes(codes, TRAINER, target) == expected


@pytest.mark.parametrize(("codes", "target", "named"), [
    ([0, 3, 6], EXTERNAL, "memb_total"),  # external has no membrane label
    ([0, 0, 0], TEST, "cyto_total"),  # test carries ER where trainer has cytoplasm
    ([101, 12, 102], EXTERNAL, "bf_m10"),  # external's z-series has other planes
])
def test_a_channel_without_counterpart_is_named(codes, target, named):
    with pytest.raises(NotApplicable, match=named):
        map_codes(codes, TRAINER, target)


def _run_folder(folder, codes, strategy):
    metadata = {"codes": codes, "strategy": strategy, "layout": TRAINER.model_dump(mode="json"),
                "classes": ["Background", "Cell"], "size": 64, "in_channels": len(codes), "num_classes": 2,
                "channel_dropout": 0.5, "merge_dropout": 0.5, "encoder": "test_resnet"}
    torch.manual_seed(0)
    save_checkpoint(folder / "checkpoint_last.pt",
                    {"metadata": metadata, "model": build_model("test_resnet", len(codes), 2).state_dict()})
    return folder


@pytest.fixture(scope="module")
def external_store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("external"), "external", cells=2, negatives=1)


def test_transfer_cli_scores_a_mappable_model(tmp_path, external_store):
    model = _run_folder(tmp_path / "bf", [12, 12, 12], "in_focus_brightfield")
    result = runner.invoke(app, ["transfer", str(model), "--data", str(external_store), "--out", "ext",
                                 "--device", "cpu", "--no-log"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "ext" / "transfer.json").read_text())
    assert record["applicable"] and record["target_codes"] == [5, 5, 5] and record["target_layout"] == "external"
    summary = json.loads((tmp_path / "ext" / "summary.json").read_text())
    assert summary[0]["scope"] == "all" and summary[0]["stacks"] == 3


def test_transfer_cli_records_or_refuses_an_unmappable_model(tmp_path, external_store):
    model = _run_folder(tmp_path / "fl", [0, 3, 6], "fluorescence")
    args = ["transfer", str(model), "--data", str(external_store), "--device", "cpu", "--no-log"]
    refused = runner.invoke(app, [*args, "--out", "a"])
    assert refused.exit_code == 1 and "memb_total" in refused.output and "Traceback" not in refused.output
    recorded = runner.invoke(app, [*args, "--out", "b", "--not-applicable-ok"])
    assert recorded.exit_code == 0, recorded.output
    record = json.loads((tmp_path / "b" / "transfer.json").read_text())
    assert not record["applicable"] and "membrane" in record["reason"]
    assert not (tmp_path / "b" / "summary.json").exists()
    # the first input without a counterpart: input 1, code 3 = trainer channel 3 (memb_total), none in external
    assert record["reason"].startswith("input 1 (code 3) reads memb_total (")
    assert record["reason"].endswith("which layout 'external' does not have")
