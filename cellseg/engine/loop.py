"""``fit``: the one training loop (train, tune, compare and sweep-ce all call it).

Per epoch: train on augmented batches (one optimizer and one-cycle scheduler per cycle, stepped per
batch), evaluate on the validation split (with ``val_ap_50`` when the store keeps its true cells, every
``train.instance_metrics_every`` epochs and at the end of each cycle:
instance_validation.py), append to the history, write ``metrics.json``, write the
checkpoint (every ``train.checkpoint_every`` epochs and at the end of each cycle), and only then
call the callbacks — a failing logger or a pruner can never cost the checkpoint of that epoch.

Callbacks implement any of ``on_fit_start(session)``, ``on_train_batch_end(session, step, loss)``,
``on_epoch_end(session, epoch, metrics)`` (may raise, e.g. ``optuna.TrialPruned``),
``on_fit_end(session, result)``, ``on_fit_error(session, exc)``, and ``state_dict()`` /
``load_state_dict(state)`` saved in the checkpoint under ``state_key`` (default: the class name).

In a distributed run (distributed.py) every rank runs this loop in step; only rank 0 locks and
writes the run folder and calls the callbacks.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg.config import Config
from cellseg.data.codes import CodePlan
from cellseg.data.split import Split
from cellseg.engine import distributed
from cellseg.engine.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cellseg.engine.instance_validation import instance_metrics
from cellseg.engine.restore import check_compatible, check_resume_config, load_initial_model
from cellseg.engine.schedule import (
    Cycle,
    cycle_at,
    make_optimizer,
    make_scheduler,
    peak_lrs,
    plan_cycles,
    set_encoder_frozen,
)
from cellseg.engine.session import TrainingSession, seed_everything
from cellseg.engine.store_classes import adopt_store_classes
from cellseg.errors import BadInputError, ConfigError
from cellseg.fileio import json_safe, remove_leftovers, write_text
from cellseg.locks import hold
from cellseg.model.loading import Resolver
from cellseg.run_folder import CONFIG_NAME, METRICS_NAME, SPLIT_NAME


class Callback:
    """Base class with no-op hooks; subclass and override what you need."""

    state_key: str | None = None

    def on_fit_start(self, session: TrainingSession) -> None: ...
    def on_train_batch_end(self, session: TrainingSession, step: int, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, session: TrainingSession, epoch: int, metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, session: TrainingSession, result: FitResult) -> None: ...
    def on_fit_error(self, session: TrainingSession, exc: BaseException) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    final: dict[str, Any]
    model: nn.Module
    plan: CodePlan
    split: Split
    run_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _key(callback: Any) -> str:
    return getattr(callback, "state_key", None) or type(callback).__name__


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def fit(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    init_from: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    split: Split | None = None,
    wait: bool | None = None,
    resolve: Resolver | None = None,
) -> FitResult:
    """Train per ``config`` in ``run_dir``; ``resume`` continues its checkpoint (see schedule.py for
    a larger ``train.epochs``); ``init_from`` starts from an earlier model's weights (a model URI is
    fetched by ``resolve``, e.g. ``cellseg.tracking.models.model_resolver()``).

    Rank 0 locks the run folder for the whole fit: a second process training into it at once (whose
    checkpoint would keep only one of two MLflow runs) stops with one line naming the first, or with
    ``wait`` waits for it to end (None: the caller offers no ``--wait``, so the line does not suggest it)."""
    run_dir = Path(run_dir)
    if not resume:
        check_epochs(config)
    lock = hold(run_dir, "training in it", wait) if distributed.world().main else contextlib.nullcontext()
    with lock:
        return _fit(config, run_dir, resume, init_from, callbacks, split, resolve)


def _fit(config: Config, run_dir: Path, resume: bool, init_from: str | Path | None, callbacks: Sequence[Any],
         split: Split | None, resolve: Resolver | None) -> FitResult:
    config = adopt_store_classes(config)  # a store with a Boundary class trains a 3-class model
    checkpoint = _checkpoint_to_resume(run_dir, config, resume, init_from)
    session = TrainingSession(config, run_dir, split=split)
    check_split(session.split, config)
    main = session.world.main
    callbacks = list(callbacks) if main else []
    if checkpoint is not None:
        _check_same_data(checkpoint, session, run_dir)
    elif init_from is not None:
        state, metadata = load_initial_model(init_from, resolve)
        check_compatible(metadata, init_from, session.plan.in_channels, config.model.encoder, config.model.num_classes)
        session.model.load_state_dict(state)
    started = [Cycle(**c) for c in checkpoint["cycles"]] if checkpoint else None
    cycles = plan_cycles(config.train, started)
    session.cycles = cycles
    session.start_epoch = checkpoint["epoch"] if checkpoint else 0
    if checkpoint is not None:
        _check_same_world(checkpoint, session, cycles)
        session.model.load_state_dict(checkpoint["model"])
        session.history = list(checkpoint["history"])
        for callback in callbacks:
            if _key(callback) in checkpoint["callbacks"]:
                callback.load_state_dict(checkpoint["callbacks"][_key(callback)])
    if main:
        for name in (CONFIG_NAME, SPLIT_NAME, METRICS_NAME, checkpoint_path(run_dir).name):
            remove_leftovers(run_dir / name)  # temporaries of a killed process
        write_text(run_dir / CONFIG_NAME, config.to_yaml())
        session.split.save(run_dir / SPLIT_NAME)
    _call(callbacks, "on_fit_start", session)
    try:
        if checkpoint is not None:
            _restore_rng(checkpoint, session)
        _run(session, cycles, callbacks, checkpoint)
    except BaseException as exc:
        _call(callbacks, "on_fit_error", session, exc)
        raise
    finally:
        session.unwrap()
    result = FitResult(
        history=session.history,
        final=session.history[-1] if session.history else {},
        model=session.model,
        plan=session.plan,
        split=session.split,
        run_dir=run_dir,
        metadata=session.metadata(),
    )
    _call(callbacks, "on_fit_end", session, result)
    return result


def check_epochs(config: Config) -> None:
    """A new run without an epoch would log and register a model of random weights."""
    if config.train.epochs_frozen + config.train.epochs == 0:
        raise ConfigError("--epochs-frozen 0 --epochs 0: nothing to train; give at least one epoch")


def check_split(split: Split, config: Config) -> None:
    """Every metric (and so the registered model's only judgement) comes from the validation stacks:
    a split without any is refused before the first epoch rather than trained into NaN metrics."""
    store, stacks = config.data.store, len(split.train) + len(split.val)
    if stacks < 2:
        raise BadInputError(f"{store}: {stacks} stack(s); training needs at least 2 (one to train on, "
                            "one to validate on)")
    if not split.val:
        raise ConfigError(f"{store}: the split leaves no stack for validation (data.val_fraction "
                          f"{config.data.val_fraction}); raise it, or give a split with validation stacks")


def _checkpoint_to_resume(run_dir: Path, config: Config, resume: bool, init_from) -> dict | None:
    path = checkpoint_path(run_dir)
    if resume and init_from is not None:
        raise ConfigError("--resume and --init-from exclude each other (resume continues the run's own model)")
    if not resume:
        if path.exists():
            raise BadInputError(
                f"{run_dir}: already holds a training run ({path.name}); pass --resume to continue it "
                "or choose another --run-dir"
            )
        return None
    if not path.is_file():
        raise BadInputError(f"{run_dir}: no {path.name} to resume from (start the run without --resume)")
    checkpoint = load_checkpoint(path)
    check_resume_config(checkpoint["config"], config)
    return checkpoint


def _check_same_data(checkpoint: dict, session: TrainingSession, run_dir: Path) -> None:
    if checkpoint["store_hash"] != session.store.content_hash:
        raise BadInputError(
            f"--resume {run_dir}: store {session.config.data.store} is not the data this run was trained on "
            "(content hash differs)"
        )


def _check_same_world(checkpoint: dict, session: TrainingSession, cycles: list[Cycle]) -> None:
    """A one-cycle in progress counts its steps for one global batch: finish it on as many processes."""
    saved, now = checkpoint.get("world_size", 1), session.world.size
    epoch = checkpoint["epoch"]
    if saved != now and epoch < sum(c.epochs for c in cycles) and cycle_at(cycles, epoch)[1] > 0:
        raise ConfigError(
            f"--resume: this run is in the middle of a one-cycle trained by {saved} process(es) and now runs on "
            f"{now}; resume it on {saved} (torchrun --nproc-per-node {saved}), or extend it after the cycle ends"
        )


def _restore_rng(checkpoint: dict, session: TrainingSession) -> None:
    """Each rank continues its own random stream (a rank the checkpoint lacks starts a fresh one)."""
    states = [checkpoint["rng"], *checkpoint.get("rng_ranks", [])]
    rank = session.world.rank
    if rank < len(states) and len(states) == session.world.size:
        set_rng_state(states[rank])
    else:
        set_rng_state(states[0])
        if rank > 0:
            seed_everything(distributed.rank_seed(session.config.seed, rank, checkpoint["epoch"]))


def _run(session: TrainingSession, cycles: list[Cycle], callbacks: Sequence[Any], checkpoint: dict | None) -> None:
    total = sum(c.epochs for c in cycles)
    epoch = session.start_epoch
    while epoch < total:
        index, within = cycle_at(cycles, epoch)
        cycle = cycles[index]
        _start_cycle(session, cycle)
        if within > 0 and checkpoint is not None:  # resuming in the middle of this cycle
            session.optimizer.load_state_dict(checkpoint["optimizer"])
            session.scheduler.load_state_dict(checkpoint["scheduler"])
        cycle_end = epoch - within + cycle.epochs
        for epoch in range(epoch, cycle_end):
            _epoch(session, cycle, epoch, cycle_end, callbacks)
        epoch = cycle_end


def _start_cycle(session: TrainingSession, cycle: Cycle) -> None:
    train = session.config.train
    set_encoder_frozen(session.model, cycle.frozen)
    session.wrap_for_training()
    lrs = peak_lrs(cycle, train, len(session.model.param_groups()))
    session.optimizer = make_optimizer(session.model, lrs, train.weight_decay)
    session.scheduler = make_scheduler(session.optimizer, lrs, cycle.epochs * len(session.train_source))


def _epoch(session: TrainingSession, cycle: Cycle, epoch: int, cycle_end: int, callbacks: Sequence[Any]) -> None:
    steps = len(session.train_source)
    sums = torch.zeros(2, device=session.device, dtype=torch.float64)  # loss × samples, samples
    lr = math.nan
    for i, (x, y) in enumerate(session.train_batches(epoch)):
        lr = session.optimizer.param_groups[-1]["lr"]
        loss = session.train_step(x, y, session.optimizer)
        _call(callbacks, "on_train_batch_end", session, epoch * steps + i, loss)
        session.scheduler.step()
        sums[0] += loss * len(y)
        sums[1] += len(y)
    loss_sum, seen = distributed.all_reduce_sum(sums).tolist()
    if session.config.train.precise_bn:
        session.recalibrate_batch_norm(epoch)
    record = {
        "epoch": epoch + 1,
        "phase": cycle.phase,
        "lr": lr,
        "train_loss": loss_sum / seen if seen else math.nan,
        **session.evaluate(),
        **(instance_metrics(session) if _due(epoch, session.config.train.instance_metrics_every, cycle_end) else {}),
    }
    session.history.append(record)
    run_dir = session.run_dir
    main = session.world.main
    if main:
        write_text(run_dir / METRICS_NAME, json.dumps(json_safe(session.history), indent=1) + "\n")
    if _due(epoch, session.config.train.checkpoint_every, cycle_end):
        rngs = distributed.all_gather(rng_state())  # every rank's generators
        if main:
            save_checkpoint(checkpoint_path(run_dir),
                            _checkpoint_state(session, epoch + 1, callbacks, rngs, cycle_done=epoch + 1 == cycle_end))
    _call(callbacks, "on_epoch_end", session, epoch + 1, record)


def _due(epoch: int, every: int, cycle_end: int) -> bool:
    """Every ``every`` epochs and at the end of each cycle (phase)."""
    return (epoch + 1) % every == 0 or epoch + 1 == cycle_end


def _checkpoint_state(session: TrainingSession, epochs_done: int, callbacks: Sequence[Any],
                      rngs: list[dict[str, Any]], cycle_done: bool) -> dict[str, Any]:
    """Everything ``--resume`` needs. At the end of a cycle the optimizer state is left out: the next
    cycle (or an extension) starts a fresh optimizer, and AdamW's moments are twice the model's size
    (a finished resnet34 run keeps a 0.17 GB checkpoint instead of 0.5 GB)."""
    return {
        "metadata": session.metadata(),
        "model": {k: v.detach().cpu() for k, v in session.model.state_dict().items()},
        "optimizer": None if cycle_done else session.optimizer.state_dict(),
        "scheduler": None if cycle_done else session.scheduler.state_dict(),
        "cycles": [c.to_dict() for c in session.cycles],
        "epoch": epochs_done,
        "history": list(session.history),
        "rng": rngs[0],
        "rng_ranks": rngs[1:],  # ranks 1.. of a distributed run
        "world_size": session.world.size,
        "callbacks": {_key(cb): cb.state_dict() for cb in callbacks if hasattr(cb, "state_dict")},
        "store_hash": session.store.content_hash,
        "config": session.config.to_dict(),
    }
