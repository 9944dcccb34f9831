"""The training engine end to end on the tiny synthetic store (CPU): MLflow logging and registration,
resume equivalence, extending a finished run, init-from, and clear errors that lose nothing."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console

import experiments_support
from experiments_support import small_encoder_file

from cellseg.data.store import open_store
from cellseg.engine.checkpoint import load_checkpoint
from cellseg.engine.loop import fit
from cellseg.engine.progress import ProgressCallback
from cellseg.errors import BadInputError, ConfigError
from cellseg.tracking.models import model_resolver
from cellseg.tracking.runs import MlflowCallback

pytestmark = pytest.mark.slow


def tiny_config(store, **overrides):
    """The small encoder at the store's 64 px, batch 2, one frozen and one unfrozen epoch."""
    return experiments_support.tiny_config(store, **{"train.epochs_frozen": 1, "train.epochs": 1, **overrides})


class Interrupt(Exception):
    """Stands for a killed process: raised after the checkpoint of ``epoch`` was written."""


class StopAfter:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, session, epoch, metrics):
        if epoch == self.epoch:
            raise Interrupt


class RecordLR:
    """Learning rate of every parameter group at every optimizer step."""

    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_train_batch_end(self, session, step, loss):
        self.lrs.append([g["lr"] for g in session.optimizer.param_groups])


def test_fit_logs_run_metrics_and_registers_a_model(trainer_store, mlflow_db, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    import cellseg.plots

    legends = []  # the predictions figure says which outline is which

    def image_grid(*args, **kwargs):
        fig = real_grid(*args, **kwargs)
        legends.extend([(t.get_text(), tuple(h.get_color())) for t, h in zip(lg.get_texts(), lg.legend_handles)]
                       for lg in fig.legends)
        return fig

    real_grid = cellseg.plots.image_grid
    monkeypatch.setattr(cellseg.plots, "image_grid", image_grid)
    callback = MlflowCallback(experiment="engine-test")
    terminal = io.StringIO()
    progress = ProgressCallback(Console(file=terminal, force_terminal=True, width=150))
    result = fit(tiny_config(trainer_store), tmp_path / "run", callbacks=[callback, progress])
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # the live bars, without ANSI codes
    assert "epochs" in shown and "batches" in shown and "epoch 2/2 (phase 2)" in shown

    assert [h["epoch"] for h in result.history] == [1, 2] and [h["phase"] for h in result.history] == [1, 2]
    assert {"train_loss", "val_loss", "accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "lr"} <= set(result.final)
    run_dir = tmp_path / "run"
    assert {"config.yaml", "split.json", "checkpoint_last.pt", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "metrics.json").read_text())[-1]["epoch"] == 2

    client = MlflowClient(callback.uri)
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["codes"] == "0,3,6"
    assert run.data.params["store.content_hash"] == open_store(trainer_store).content_hash
    assert [m.step for m in client.get_metric_history(callback.run_id, "accuracy")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(callback.run_id)} | {
        a.path for a in client.list_artifacts(callback.run_id, "plots")}
    assert {"config.yaml", "split.json", "metrics.json", "plots/learning_curves.png", "plots/predictions.png"} <= artifacts
    assert legends == [[("ground truth", (0.0, 1.0, 0.0)), ("prediction", (1.0, 0.0, 1.0))]]  # green, magenta
    assert run.info.run_name == "fluorescence · 0,3,6 · 64px crops"  # what ran, not the folder's time stamp
    assert run.data.params["data.codes"] == "0,3,6"  # the resolved codes, as in "codes"
    assert {"mlflow.source.type", "mlflow.source.name", "mlflow.user"} <= set(run.data.tags)

    assert callback.registered == ("cellseg-fluorescence", 1)
    aliases = client.get_registered_model("cellseg-fluorescence").aliases
    assert aliases == {"champion": 1, "challenger": 1}
    mlflow.set_tracking_uri(callback.uri)
    info = mlflow.models.get_model_info("models:/cellseg-fluorescence@champion")
    assert info.metadata["in_channels"] == 3 and info.metadata["codes"] == [0, 3, 6] and info.metadata["size"] == 64
    assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    loaded = mlflow.pytorch.load_model("models:/cellseg-fluorescence/1")
    x = torch.rand(1, 3, 96, 80)  # any size, not only the training size
    assert torch.allclose(loaded.eval()(x), result.model.eval()(x), atol=1e-5)

    seen = {}

    class Capture:
        def on_fit_start(self, session):
            seen.update({k: v.clone() for k, v in session.model.state_dict().items()})  # before its epoch

    one_epoch = tiny_config(trainer_store, **{"train.epochs_frozen": 0, "train.epochs": 1})
    fit(one_epoch, tmp_path / "from-registry", init_from="models:/cellseg-fluorescence@champion", callbacks=[Capture()],
        resolve=model_resolver())
    assert all(torch.equal(seen[k], v) for k, v in result.model.state_dict().items())


def test_resume_reaches_the_uninterrupted_result(trainer_store, mlflow_db, tmp_path):
    config = tiny_config(trainer_store, **{"train.epochs": 2})  # 1 frozen + 2 unfrozen: stop mid-cycle
    whole_lr = RecordLR()
    whole = fit(config, tmp_path / "whole", callbacks=[whole_lr])

    parts_lr = RecordLR()
    first = MlflowCallback(log_model=False)
    with pytest.raises(Interrupt):
        fit(config, tmp_path / "parts", callbacks=[first, parts_lr, StopAfter(2)])
    assert load_checkpoint(tmp_path / "parts")["epoch"] == 2
    assert load_checkpoint(tmp_path / "parts")["optimizer"] is not None  # mid-cycle: AdamW's moments kept
    second = MlflowCallback(log_model=False)
    resumed = fit(config, tmp_path / "parts", resume=True, callbacks=[second, parts_lr])

    assert second.run_id == first.run_id  # the same MLflow run continues
    assert parts_lr.lrs == whole_lr.lrs  # continuous learning-rate curve, step for step
    assert resumed.history == whole.history  # bitwise-equal metrics on the CPU
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    from mlflow import MlflowClient

    client = MlflowClient(second.uri)
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(second.run_id, "val_loss")] == [1, 2, 3]


def test_extend_a_finished_run_with_a_new_cycle(trainer_store, mlflow_db, tmp_path):
    run = tmp_path / "run"
    original = RecordLR()
    fit(tiny_config(trainer_store), run, callbacks=[original])
    assert load_checkpoint(run)["optimizer"] is None  # a finished cycle's optimizer is never reused
    recorder = RecordLR()
    extended = fit(tiny_config(trainer_store, **{"train.epochs": 2}), run, resume=True, callbacks=[recorder])
    assert [h["phase"] for h in extended.history] == [1, 2, 3]
    assert load_checkpoint(run)["cycles"] == [{"phase": 1, "epochs": 1}, {"phase": 2, "epochs": 1},
                                              {"phase": 3, "epochs": 1}]
    phase_two = original.lrs[len(original.lrs) // 2 :]  # 1 frozen + 1 unfrozen epoch
    assert recorder.lrs == phase_two  # the extension is a new one-cycle at the phase-2 rates
    with pytest.raises(ConfigError, match="cannot be shortened"):
        fit(tiny_config(trainer_store, **{"train.epochs": 1}), run, resume=True)


def test_init_from_an_earlier_run(trainer_store, tmp_path):
    earlier = fit(tiny_config(trainer_store), tmp_path / "a")
    seen = {}

    class Capture:
        def on_fit_start(self, session):
            seen["state"] = {k: v.clone() for k, v in session.model.state_dict().items()}

    fit(tiny_config(trainer_store, **{"train.epochs_frozen": 0}), tmp_path / "b", init_from=tmp_path / "a",
        callbacks=[Capture()])
    for name, value in earlier.model.state_dict().items():
        assert torch.equal(seen["state"][name], value), name

    with pytest.raises(ConfigError, match="takes 3 input channels, but the loading codes give 4"):
        fit(tiny_config(trainer_store, **{"data.codes": [0, 3, 6, 12]}), tmp_path / "c", init_from=tmp_path / "a")


def test_refuses_to_overwrite_or_to_resume_a_different_run(trainer_store, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(BadInputError, match="no checkpoint_last.pt to resume from"):
        fit(tiny_config(trainer_store), run, resume=True)
    fit(tiny_config(trainer_store, **{"train.epochs": 0}), run)
    before = (run / "checkpoint_last.pt").read_bytes()
    with pytest.raises(BadInputError, match="already holds a training run"):
        fit(tiny_config(trainer_store), run)
    with pytest.raises(ConfigError, match=r"train.lr \(0.001 -> 0.01\)"):
        fit(tiny_config(trainer_store, **{"train.epochs": 0, "train.lr": 0.01}), run, resume=True)
    assert (run / "checkpoint_last.pt").read_bytes() == before


def test_a_logging_failure_mid_training_loses_nothing(trainer_store, mlflow_db, tmp_path, caplog):
    callback = MlflowCallback(log_model=False)

    class BreakTrackingAfterStart:
        def on_fit_start(self, session):
            def down(*args, **kwargs):
                raise ConnectionError("tracking server went away")

            callback.client.log_batch = down

    result = fit(tiny_config(trainer_store), tmp_path / "run", callbacks=[callback, BreakTrackingAfterStart()])
    assert len(result.history) == 2
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2
    assert "could not log epoch 1" in caplog.text and "training continues" in caplog.text


def test_precise_bn_sets_running_statistics_to_the_training_set_average(trainer_store, tmp_path):
    """``train.precise_bn``: before validation, every BatchNorm's running mean is the exact average of
    its inputs over the epoch's (unaugmented) training batches, not an exponential average."""
    from cellseg.engine.session import TrainingSession

    session = TrainingSession(tiny_config(trainer_store, **{"train.precise_bn": True}), tmp_path / "run")
    bn = next(m for m in session.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    session.model.train()
    with torch.no_grad():
        for x, _ in session.train_batches(0):  # a few ordinary EMA updates first
            session.model(x)
    inputs.clear()
    session.recalibrate_batch_norm(0)
    hook.remove()
    batches = list(session.train_source.epoch(0))
    assert len(inputs) == len(batches) >= 2
    exact = torch.stack([i.mean(dim=(0, 2, 3)) for i in inputs]).mean(0)  # equal-sized batches
    torch.testing.assert_close(bn.running_mean, exact, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored for training


def test_precise_bn_option_reaches_the_run_config(trainer_store, tmp_path):
    from typer.testing import CliRunner

    from cellseg.cli.main import app

    small = small_encoder_file()
    result = CliRunner().invoke(app, ["train", "--data", str(trainer_store), "--profile", "quick", "--config", small,
                                      "--size", "64", "--epochs-frozen", "0", "--epochs", "1", "--batch-size", "2",
                                      "--device", "cpu", "--run-dir", "run", "--no-register",
                                      "--tracking-uri", "sqlite:///m.db"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint("run")["config"]["train"]["precise_bn"] is True  # the quick profile's
    off = CliRunner().invoke(app, ["train", "--data", str(trainer_store), "--profile", "quick", "--config", small,
                                   "--no-precise-bn", "--size", "64", "--epochs-frozen", "0", "--epochs", "1",
                                   "--device", "cpu", "--run-dir", "run2", "--no-register",
                                   "--tracking-uri", "sqlite:///m.db"])
    assert off.exit_code == 0, off.output
    assert load_checkpoint("run2")["config"]["train"]["precise_bn"] is False


def test_periodic_work_is_due_every_n_epochs_and_at_the_end_of_each_phase():
    from cellseg.engine.loop import _due

    assert [e + 1 for e in range(12) if _due(e, 5, cycle_end=12)] == [5, 10, 12]
    assert [e + 1 for e in range(3) if _due(e, 5, cycle_end=3)] == [3]
