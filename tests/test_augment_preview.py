"""`cellseg augment preview`: the engine's own augmented training batches drawn as a grid with mask
outlines, deterministic from the seed, logged to MLflow; one-line errors for bad options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.experiments.augment_preview import augment_preview, augmented_samples
from cellseg.visualize import TRUTH_COLOUR, overlay
from experiments_support import TINY, one_line_error, small_encoder_file, tiny_config

runner = CliRunner()


def test_samples_are_the_engines_training_batches(trainer_store, tmp_path):
    from cellseg.engine.session import TrainingSession

    plain = tiny_config(trainer_store, **{"augment.enabled": False})
    session = TrainingSession(plain, tmp_path)
    images, titles = augmented_samples(session, 5)  # more than one epoch's 4 samples
    x, y = next(iter(session.train_source.epoch(0)))
    assert np.array_equal(images[0], overlay(x[0], None, y[0])) and titles[0] == "epoch 1 · batch 1 · #1"
    assert titles[4].startswith("epoch 2") and images[0].shape == (64, 64, 3)

    first = augment_preview(tiny_config(trainer_store), tmp_path / "a.png", n=4, track=False)
    second = augment_preview(tiny_config(trainer_store), tmp_path / "b.png", n=4, track=False)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, second.images))  # seeded
    assert not all(np.array_equal(a, b) for a, b in zip(first.images, images))  # and augmented
    outlined = [np.all(image == TRUTH_COLOUR, axis=-1).any() for image in first.images]
    assert any(outlined)  # cells carry their (transformed) mask outline


def test_preview_command_writes_the_grid_and_logs_it(trainer_store, mlflow_db):
    from mlflow import MlflowClient

    from cellseg.tracking.runs import resolve_tracking_uri

    result = runner.invoke(app, ["augment", "preview", "--data", str(trainer_store), "--strategy", "fluorescence",
                                 "--n", "6", "--out", "grid.png", "--config", small_encoder_file(), *TINY])
    assert result.exit_code == 0, result.output
    assert "6 samples" in result.output and Path("grid.png").stat().st_size > 0
    client = MlflowClient(resolve_tracking_uri())  # absolute: MLflow caches stores by URI
    (run,) = client.search_runs([client.get_experiment_by_name("cellseg").experiment_id])
    assert run.data.tags["cellseg.kind"] == "augment-preview" and run.data.params["augment.enabled"] == "True"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["grid.png"]


def test_bad_preview_options_are_one_line(trainer_store):
    def preview(*args: str):
        return runner.invoke(app, ["augment", "preview", "--data", str(trainer_store), *args, *TINY])

    one_line_error(preview("--n", "0"), "--n 0")
    one_line_error(preview("--out", "grid.jpg"), "--out grid.jpg")
    one_line_error(preview("--strategy", "telepathy"), "telepathy")
