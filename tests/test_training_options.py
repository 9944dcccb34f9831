"""Training options refused in one line before any work: values the model cannot take, options that exclude each other."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "7"], "data.size"),
    (["--strategy", "fluorescence", "--codes", "0,3,6"], "--strategy fluorescence and --codes 0,3,6"),
    (["--resize", "squash"], "data.resize"),
    (["--normalize", "zscore"], "data.normalize"),
    (["--scale", "0"], "data.scale"),
])
def test_bad_training_options_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "s.zarr"), "--run-dir", str(tmp_path / "run"),
                                 "--device", "cpu", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
