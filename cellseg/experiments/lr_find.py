"""Learning-rate finder (Smith 2015, fastai's ``lr_find``): train a few batches while the learning
rate grows exponentially, watch the loss, and suggest where to train.

What is swept: by default the **phase-1 model** — encoder frozen (batch norm trainable), every
parameter group at the same rate — as fastai's ``learn.lr_find()`` before ``fit_one_cycle`` did in
the seed notebook, so the suggestion is a value for ``train.lr``. With ``unfrozen=True`` the whole
model is swept with phase 2's discriminative rates (``lr / lr_div_first`` … ``lr / lr_div_head``),
the x axis still being ``train.lr``.

Each step is the engine's own ``TrainingSession.train_step`` on the engine's augmented training
batches, with AdamW as in training. The sweep stops early when the smoothed loss exceeds
``diverge`` × its minimum or becomes non-finite. The loss is smoothed by an exponential moving
average with bias correction (``beta`` 0.98, as fastai). Suggestion rules (all are reported; the
chosen one is the suggestion): ``valley`` (default, fastai's since 2.5) — the middle of the longest
decreasing stretch of the smoothed loss, which tolerates bumps; ``steepest`` — where
the smoothed loss falls fastest per decade before its minimum (none when the minimum comes first);
``minimum`` — the learning rate of the minimum smoothed loss / 10. As in fastai, the rules read
the curve without its first 10% and last 5 points (``window``).

``find_lr`` leaves the session as it found it: model weights and buffers, which parameters are
trainable, their gradients, train/eval mode, and every random generator are restored afterwards,
and the sweep's optimizer is its own (the session's optimizer, if any, is never stepped).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.config import Config, strategy_label
from cellseg.engine.checkpoint import rng_state, set_rng_state
from cellseg.engine.schedule import Cycle, make_optimizer, peak_lrs, set_encoder_frozen
from cellseg.engine.session import TrainingSession
from cellseg.errors import ConfigError
from cellseg.experiments.inputs import check_inputs
from cellseg.experiments.progress import RunsProgress
from cellseg.fileio import json_safe, write_text

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
DIVERGE = 4.0
BETA = 0.98
RULES = {
    "valley": "middle of the longest valley of the smoothed loss (its longest decreasing run; fastai's default)",
    "steepest": "steepest descent of the smoothed loss (most negative slope per decade, before its minimum)",
    "minimum": "learning rate at the minimum of the smoothed loss, divided by 10",
}
PNG_NAME, JSON_NAME = "lr_find.png", "lr_find.json"


@dataclass
class LrCurve:
    """One sweep: learning rates tried, raw and smoothed losses, the suggestion and why."""

    strategy: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # "end of sweep", "diverged" or "non-finite loss"
    suggestions: dict[str, float | None] = field(default_factory=dict)
    rule: str = "valley"

    @property
    def suggestion(self) -> float | None:
        return self.suggestions.get(self.rule)

    def to_dict(self) -> dict[str, Any]:
        shown = window(len(self.smoothed))
        return {**asdict(self), "suggestion": self.suggestion, "rule_text": RULES[self.rule],
                "window": [shown.start, shown.stop]}


@dataclass
class LrFindResult:
    curves: list[LrCurve]
    png: Path
    json: Path
    run_id: str | None = None


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates growing geometrically from ``start`` to ``end``."""
    if not 0 < start < end:
        raise ConfigError(f"--start-lr {start:g} / --end-lr {end:g}: need 0 < start < end")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: need at least 2 steps")
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (so early points are not pulled towards zero)."""
    ema = _Ema(beta)
    return [ema(loss) for loss in losses]


class _Ema:
    """Running bias-corrected EMA: call with each new value, get the smoothed value so far."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def __call__(self, value: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta**self.n)


def window(n: int) -> slice:
    """The points the suggestions read (and the plot shows), as fastai's: without the first 10% (at
    most 10; the first batches' losses say more about those batches than about the learning rate)
    and the last 5 (the blow-up), when that leaves at least 3."""
    skip = min(10, n // 10)
    end = n - 5 if n - 5 - skip >= 3 else n
    return slice(skip, end) if end - skip >= 3 else slice(0, n)


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> dict[str, float | None]:
    """Learning rate per rule of ``RULES``, read in ``window`` (None when the sweep is too short)."""
    if len(smoothed) < 3 or not np.isfinite(smoothed).any():
        return {rule: None for rule in RULES}
    part = window(len(smoothed))
    lrs_arr, loss = np.asarray(lrs, dtype=float)[part], np.asarray(smoothed, dtype=float)[part]
    best = int(np.nanargmin(loss))
    steepest = None
    if best >= 2:  # the slope at the minimum itself is one-sided, so it is not a candidate
        slope = np.gradient(loss[:best + 1], np.log10(lrs_arr[:best + 1]))[:-1]
        steepest = float(lrs_arr[int(np.argmin(slope))])
    return {"valley": float(lrs_arr[_valley(loss)]), "steepest": steepest, "minimum": float(lrs_arr[best] / 10)}


def _valley(loss: np.ndarray) -> int:
    """fastai's ``valley``: the middle of the longest valley, i.e. of the span covered by the longest
    decreasing subsequence of ``loss``. A subsequence may skip bumps, so noise does not cut the valley
    short, and the middle stays clear of the bottom, where the loss is about to blow up."""
    longest = np.ones(len(loss), dtype=int)  # length of the longest decreasing subsequence ending at i
    for i in range(1, len(loss)):
        before = longest[:i][loss[:i] > loss[i]]
        if len(before):
            longest[i] = before.max() + 1
    end = int(np.argmax(longest))
    start = max(end - int(longest[end]), 0)
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"--rule {rule}: unknown rule (known: {', '.join(RULES)})")


@contextlib.contextmanager
def preserved(session: TrainingSession) -> Iterator[None]:
    """Restore the session's model (weights, buffers, trainable flags, gradients, mode) and all RNGs on exit."""
    model = session.model
    state = copy.deepcopy(model.state_dict())
    params = [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    training = model.training
    rng = rng_state()
    try:
        yield
    finally:
        model.load_state_dict(state)
        for param, (flag, grad) in zip(model.parameters(), params, strict=True):
            param.requires_grad_(flag)
            param.grad = grad
        model.train(training)
        set_rng_state(rng)


def find_lr(
    session: TrainingSession,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    unfrozen: bool = False,
    diverge: float = DIVERGE,
    beta: float = BETA,
    rule: str = "valley",
    on_step: Callable[[int, float, float], None] | None = None,
) -> LrCurve:
    """Sweep ``session``'s model (see module doc) and return the curve; the session is left unchanged.

    ``on_step(i, lr, loss)`` is called after every step (progress display).
    """
    _check_rule(rule)
    schedule = lr_schedule(start_lr, end_lr, steps)
    if len(session.train_source) == 0:
        raise ConfigError(f"{session.config.data.store}: fewer training stacks than one batch "
                          f"(--batch-size {session.config.train.batch_size})")
    train = session.config.train
    n_groups = len(session.model.param_groups())
    cycle = Cycle(2 if unfrozen else 1, 1)
    ratios = [lr / train.lr for lr in peak_lrs(cycle, train, n_groups)]  # 1 for every group when frozen
    lrs, losses, smoothed = [], [], []
    stopped = "end of sweep"
    with preserved(session):
        set_encoder_frozen(session.model, not unfrozen)
        optimizer = make_optimizer(session.model, [schedule[0] * r for r in ratios], train.weight_decay)
        ema, best = _Ema(beta), math.inf
        for i, (lr, (x, y)) in enumerate(zip(schedule, _endless(session))):
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = float(lr) * ratio
            loss = float(session.train_step(x, y, optimizer))
            lrs.append(float(lr))
            losses.append(loss)
            if not math.isfinite(loss):
                stopped = "non-finite loss"
                break
            value = ema(loss)
            smoothed.append(value)
            best = min(best, value)
            if on_step is not None:
                on_step(i, float(lr), loss)
            if value > diverge * best:
                stopped = "diverged"
                break
        del optimizer
    points = len(smoothed)
    curve = LrCurve(strategy_label(session.plan.strategy), lrs[:points], losses[:points], smoothed, stopped, rule=rule)
    curve.suggestions = suggest(curve.lrs, curve.smoothed)
    return curve


def _endless(session: TrainingSession) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's augmented training batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from session.train_batches(epoch)
        epoch += 1


def strategy_configs(config: Config, strategies: Sequence[str] | None) -> list[Config]:
    """One config per strategy (the config's own codes/strategy when none are given)."""
    if not strategies:
        return [config]
    return [config.model_copy(update={"data": config.data.model_copy(update={"strategy": s, "codes": None})})
            for s in strategies]


def lr_find(
    config: Config,
    out: str | Path,
    strategies: Sequence[str] | None = None,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    unfrozen: bool = False,
    rule: str = "valley",
    init_from: str | Path | None = None,
    track: bool = True,
    progress: bool = True,
) -> LrFindResult:
    """Sweep each strategy's model (the same seed, split and config otherwise), write
    ``out/lr_find.png`` (curves overlaid) and ``out/lr_find.json``, and log both to one MLflow run.

    ``init_from`` sweeps an earlier model (run folder, checkpoint, MLflow model URI) instead of a
    freshly initialised one; that model is only read.
    """
    from cellseg.plots import lr_finder, save_figure

    out = Path(out)
    configs = strategy_configs(config, strategies)
    lr_schedule(start_lr, end_lr, steps)  # bad sweep options, data or codes fail before any work
    _check_rule(rule)
    check_inputs(configs)
    settings = {"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "phase": "unfrozen" if unfrozen else "frozen",
                "rule": rule, "rule_text": RULES[rule], "diverge": DIVERGE, "beta": BETA}
    curves = []
    with RunsProgress(len(configs), "lr-find", enabled=progress) as bar:
        for cfg in configs:
            session = TrainingSession(cfg, out)
            if init_from is not None:
                _load_initial(session, init_from)
            bar.start_part(strategy_label(session.plan.strategy), steps)
            curves.append(find_lr(session, start_lr, end_lr, steps, unfrozen, rule=rule,
                                  on_step=lambda i, lr, loss: bar.step(i + 1, f"lr {lr:.1e} loss {loss:.4f}")))
            bar.done(_summary(curves[-1]))
            del session
            gc.collect()
    png = save_figure(lr_finder([c.to_dict() for c in curves], RULES[rule]), out / PNG_NAME)
    document = {**settings, "config": config.to_dict(), "curves": {c.strategy: c.to_dict() for c in curves}}
    json_path = write_text(out / JSON_NAME, json.dumps(json_safe(document), indent=1) + "\n")
    run_id = None
    if track:  # one run for the whole sweep, opened once there is something to log
        from cellseg.tracking.studies import tracked_run

        with tracked_run("lr-find", "lr-find", config.tracking.uri, config.tracking.experiment,
                         tags={"strategies": ",".join(c.strategy for c in curves)}) as run:
            run.log_params({**config.flat(), **{f"lr_find.{k}": v for k, v in settings.items()}})
            run.log_metrics({f"suggested_lr.{c.strategy}": c.suggestion for c in curves if c.suggestion})
            run.log_artifacts([png, json_path])
            run_id = run.run_id
    return LrFindResult(curves, png, json_path, run_id)


def _load_initial(session: TrainingSession, source: str | Path) -> None:
    from cellseg.engine.restore import check_compatible, load_initial_model
    from cellseg.tracking.models import model_resolver

    state, metadata = load_initial_model(source, model_resolver(session.config.tracking.uri))
    cfg = session.config
    check_compatible(metadata, source, session.plan.in_channels, cfg.model.encoder, cfg.model.num_classes)
    session.model.load_state_dict(state)


def _summary(curve: LrCurve) -> str:
    shown = f"{curve.suggestion:.2e}" if curve.suggestion else "none"
    return f"{curve.strategy}: suggested lr {shown} ({curve.rule}; {len(curve.lrs)} steps, {curve.stopped})"
