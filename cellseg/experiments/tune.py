"""Optuna study over the learning rate and the cross-entropy class weights (optionally the channel
and merge dropout), every trial one ``fit`` of the engine.

- **Storage** (``storage``): a plain path is an Optuna journal file (default ``./optuna.journal``:
  safe for several processes on one machine or on a shared filesystem), any other value an RDB URL
  (``sqlite:///…`` for one process — concurrent SQLite writers hit "database is locked";
  ``postgresql://…`` for workers on several machines). Re-running continues the study
  (``load_if_exists``); ``trials`` is the number of trials *this* process runs, so two workers with
  ``trials=5`` add 10.
- **A killed worker** (RDB storage): each running trial beats every ``heartbeat`` seconds; the next
  worker to start a trial fails one silent for 3 heartbeats and Optuna enqueues it once more with the
  same parameters. The retry continues the dead trial's run folder from its last checkpoint (and its
  MLflow run) when this machine sees that folder, so a trial killed at epoch 90 does not start over.
  The journal file has no heartbeat: there a killed worker's trial stays RUNNING.
- **A study keeps its settings**: objective, search space and sampler seed are stored as study user
  attrs when it is created and reused by later invocations (``None`` = the study's value); so are the
  trained-for settings (epochs, size, strategy …), which every trial must share to be comparable.
- **Sampler**: TPE seeded with the study's seed plus this worker's index (0 for the first process
  that joined the study, 1 for the next …), so one process is reproducible and concurrent workers do
  not propose the same startup trials.
- **Pruning**: each epoch's validation value is reported to a MedianPruner (no pruning during the
  frozen phase nor before 5 trials completed); a pruned fit raises ``optuna.TrialPruned`` from the
  engine callback, after its checkpoint and metrics of that epoch were written.
- **Split, parent run, progress** are the runner's (cellseg.experiments.runner): every trial trains
  on ``RUNS_DIR/split.json``, refused once the store's content changed (a new ``--study`` then).
- **MLflow**: one parent run per study (found again by its ``study`` tag, so every invocation and
  every worker shares it); each trial a child run tagged ``study``, ``trial``, ``strategy`` and
  ``param.*``; the parent gets the objective per trial, the trials table, the optimisation-history
  figure and ``best.yaml``. Trials log no model (train the best config with ``cellseg train``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cellseg.config import Config
from cellseg.engine.checkpoint import checkpoint_path
from cellseg.errors import CellsegError, ConfigError, TrackingError, one_line
from cellseg.experiments.runner import Runner, experiment, plan
from cellseg.fileio import write_text
from cellseg.tracking.runs import redact

log = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou", "val_loss")
DEFAULT_STORAGE = "optuna.journal"
KIND = "tune"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name and an MLflow filter value
HEARTBEAT_S = 60  # RDB storage: a trial silent for 3 heartbeats belongs to a dead worker
TABLE_RACE_RETRIES = 3
STARTUP_TRIALS = 5  # MedianPruner: complete this many trials before pruning any
DROPOUT_RANGE = (0.0, 0.9)
SETTINGS_ATTR, CONFIG_ATTR, WORKER_ATTR = "cellseg.settings", "cellseg.fixed_config", "cellseg.worker."
# Keys a trial may differ in without being a different experiment: tuned ones, and where/how it runs.
FREE_KEYS = ("train.lr", "train.ce_weights", "data.channel_dropout", "data.merge_dropout", "data.store",
             "data.residency", "data.num_workers", "train.device", "tracking.")


@dataclass(frozen=True)
class StudySettings:
    """What a study optimises, over which space, with which sampler seed (fixed at creation)."""

    objective: str = "accuracy"
    lr_range: tuple[float, float] = (1e-5, 1e-1)
    ratio_range: tuple[float, float] = (0.01, 100.0)  # background:cell cross-entropy weight ratio
    tune_dropout: bool = False
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective}: unknown (choose from {', '.join(OBJECTIVES)})")
        for option, (low, high) in (("--lr-range", self.lr_range), ("--ratio-range", self.ratio_range)):
            if not 0 < low < high:
                raise ConfigError(f"{option} {low},{high}: need 0 < low < high")

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "val_loss" else "maximize"

    def suggest(self, trial, num_classes: int) -> dict[str, Any]:
        """Sample a trial's parameters; returns them as dotted config overrides."""
        lr = trial.suggest_float("lr", *self.lr_range, log=True)
        ratio = trial.suggest_float("ce_ratio", *self.ratio_range, log=True)
        overrides = {"train.lr": lr, "train.ce_weights": [ratio] + [1.0] * (num_classes - 1)}
        if self.tune_dropout:
            overrides["data.channel_dropout"] = trial.suggest_float("channel_dropout", *DROPOUT_RANGE)
            overrides["data.merge_dropout"] = trial.suggest_float("merge_dropout", *DROPOUT_RANGE)
        return overrides


@dataclass
class TuneResult:
    study: str
    storage: str
    trials: int  # in the study, all workers and invocations
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_config: Config
    parent_run_id: str
    out: Path
    table: Path
    figure: Path
    settings: StudySettings


def tune(
    config: Config,
    study: str,
    trials: int,
    storage: str | None = None,
    out: str | Path = "best.yaml",
    runs_dir: str | Path | None = None,
    objective: str | None = None,
    lr_range: tuple[float, float] | None = None,
    ratio_range: tuple[float, float] | None = None,
    tune_dropout: bool | None = None,
    sampler_seed: int | None = None,
    prune: bool = True,
    heartbeat: int = HEARTBEAT_S,
    show_progress: bool = True,
) -> TuneResult:
    """Run ``trials`` trials of study ``study`` (created or continued) and write the best trial's full
    config to ``out``; trial run folders go to ``runs_dir`` (default ``runs/tune/<study>``)."""
    import optuna

    if not NAME.match(study):
        raise ConfigError(f"--study {study!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
    if trials < 1:
        raise ConfigError(f"--trials {trials}: must be at least 1")
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat {heartbeat}: must be at least 1 second")
    storage = storage or DEFAULT_STORAGE
    # Everything that can be checked before a study, a journal file or a run exists:
    given = {"objective": objective, "lr_range": lr_range, "ratio_range": ratio_range,
             "tune_dropout": tune_dropout, "sampler_seed": sampler_seed}
    _new_settings(given, config)
    runs_dir = Path(runs_dir or Path("runs") / "tune" / study)
    planned = plan([config], runs_dir, "use a new --study (or --runs-dir)")  # one split for every trial
    with _optuna_quiet():
        backend = open_storage(storage, heartbeat)
        settings = _study_settings(backend, study, given, config)
        worker = _join(backend, study)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS,
                                              n_warmup_steps=config.train.epochs_frozen + 1)
                  if prune else optuna.pruners.NopPruner())
        sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed + worker)
        optuna_study = optuna.load_study(study_name=study, storage=backend, sampler=sampler, pruner=pruner)
    _check_fixed(optuna_study, config, settings, study)

    params = {"objective": settings.objective, "direction": settings.direction, "lr_range": settings.lr_range,
              "ratio_range": settings.ratio_range, "tune_dropout": settings.tune_dropout,
              "sampler_seed": settings.sampler_seed, "storage": redact(storage),
              "strategy": config.data.label}
    with experiment(planned, KIND, "study", study, trials, "trials", params, show_progress=show_progress) as runner:
        optuna_study.set_user_attr("mlflow_parent_run_id", runner.parent.run_id)
        with _optuna_quiet():
            optuna_study.optimize(_Objective(config, settings, runs_dir, runner), n_trials=trials,
                                  callbacks=[_Report(settings, runner)], catch=())
        result = _finish(optuna_study, settings, study, storage, Path(out), runs_dir, runner.parent)
    if isinstance(result, str):
        raise CellsegError(result)
    return result


def open_storage(url: str, heartbeat: int = HEARTBEAT_S):
    """A plain path → JournalStorage on that file; anything with ``://`` → RDBStorage with a heartbeat
    every ``heartbeat`` seconds (see module doc)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" not in url:
        path = Path(url)
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise ConfigError(f"--storage {url}: cannot use the journal file ({exc.strerror or exc})") from None
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(TABLE_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():  # the heartbeat has been "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (IntegrityError, ProgrammingError) as exc:
            # Workers starting together on an empty database race to create Optuna's tables; the
            # loser sees "already exists"/a duplicate key and finds the tables there on a retry.
            if attempt == TABLE_RACE_RETRIES:
                raise TrackingError(f"--storage {redact(url)}: cannot set up the study database "
                                    f"({one_line(exc)})") from None
            time.sleep(0.5 + attempt)
        except Exception as exc:  # noqa: BLE001 — SQLAlchemy/driver errors: the user needs one line
            raise TrackingError(f"--storage {redact(url)}: cannot open the study database ({one_line(exc)})") from None


# --- study set-up ------------------------------------------------------------------------------


def _study_settings(storage, study: str, given: dict[str, Any], config: Config) -> StudySettings:
    """The study's stored settings, or the given ones (defaults for None) stored with a new study."""
    import optuna

    new = _new_settings(given, config)
    handle = optuna.create_study(study_name=study, storage=storage, direction=new.direction, load_if_exists=True)
    stored = handle.user_attrs.get(SETTINGS_ATTR)
    if stored is None:  # a new study (or one created elsewhere without cellseg): record ours
        if handle.direction.name.lower() != new.direction:
            raise ConfigError(f"--study {study}: exists and {handle.direction.name.lower()}s, but "
                              f"--objective {new.objective} needs {new.direction}")
        handle.set_user_attr(SETTINGS_ATTR, asdict(new))
        handle.set_user_attr("sampler_seed", new.sampler_seed)
        handle.set_user_attr(CONFIG_ATTR, _fixed_part(config))
        return new
    settings = StudySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    for key, value in given.items():
        if value is not None and value != getattr(settings, key):
            raise ConfigError(f"--{key.replace('_', '-')} {value}: study {study} was created with "
                              f"{getattr(settings, key)} (a study keeps its objective, search space and seed; "
                              "use a new --study)")
    return settings


def _new_settings(given: dict[str, Any], config: Config) -> StudySettings:
    """The settings a new study gets: those given, defaults for None, the sampler seed from ``config``."""
    return StudySettings(**{"sampler_seed": config.seed, **{k: v for k, v in given.items() if v is not None}})


def _fixed_part(config: Config) -> dict[str, Any]:
    return {k: v for k, v in config.flat().items() if not k.startswith(FREE_KEYS)}


def _check_fixed(study, config: Config, settings: StudySettings, name: str) -> None:
    """Trials of one study must differ only in what is tuned (and where they run)."""
    stored = study.user_attrs.get(CONFIG_ATTR, {})
    for key, value in _fixed_part(config).items():
        if key in stored and stored[key] != value:
            raise ConfigError(f"study {name}: {key} is {value} here but {stored[key]} in the study's trials "
                              "(trials must differ only in the tuned parameters; use a new --study)")


def _join(storage, study: str) -> int:
    """This process's index among all workers that ever joined the study (0 for the first).

    Each worker adds a time-ordered key then reads them all back: two that join at once both see
    both keys (or the later sees the earlier), so their indices differ."""
    import optuna

    handle = optuna.load_study(study_name=study, storage=storage)
    key = f"{WORKER_ATTR}{time.time_ns():020d}.{uuid.uuid4().hex[:8]}"
    handle.set_user_attr(key, f"{socket.gethostname()}:{os.getpid()}")
    return sorted(k for k in handle.user_attrs if k.startswith(WORKER_ATTR)).index(key)


# --- trials ------------------------------------------------------------------------------------


class _Objective:
    """One trial = one fit in ``runs_dir/trial-<n>``, a child run of the study's parent run; the retry
    of a killed trial continues the dead trial's run folder (the runner resumes its checkpoint)."""

    def __init__(self, config: Config, settings: StudySettings, runs_dir: Path, runner: Runner):
        self.config, self.settings, self.runs_dir, self.runner = config, settings, runs_dir, runner

    def __call__(self, trial) -> float:
        overrides = self.settings.suggest(trial, self.config.model.num_classes)
        config = self.config.with_overrides(overrides)
        stored = _stored(trial)
        retry_of = stored.system_attrs.get("failed_trial")
        killed_run = _checkpointed_run_of(stored) if retry_of is not None else None
        run_dir = killed_run or self.runs_dir / f"trial-{trial.number}"
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        tags = {"trial": trial.number, **({"retry_of": retry_of} if retry_of is not None else {}),
                **{f"param.{k}": _fmt(v) for k, v in trial.params.items()}}
        mlflow_cb = self.runner.child(f"trial-{trial.number}", tags)
        try:  # pruning comes after the runner's callbacks: the epoch is logged before a prune stops the fit
            result = self.runner.fit(config, run_dir, mlflow_cb, [_Pruning(trial, self.settings.objective)])
        finally:
            if mlflow_cb.run_id:
                trial.set_user_attr("mlflow_run_id", mlflow_cb.run_id)
        value = result.final.get(self.settings.objective, math.nan)
        return float("nan") if value is None else float(value)


def _stored(trial):
    """The trial as stored (system attrs included: Optuna marks a retry there); only running trials
    are read, not the whole study."""
    from optuna.trial import TrialState

    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next(t for t in running if t.number == trial.number)


def _checkpointed_run_of(retry) -> Path | None:
    """The run folder of the dead trial that ``retry`` repeats (its user attrs are copied over), when
    it holds a checkpoint this machine can read; None → the retry starts afresh."""
    run_dir = retry.user_attrs.get("run_dir")
    if run_dir and checkpoint_path(Path(run_dir)).is_file():
        return Path(run_dir)
    return None


class _Pruning:
    """Engine callback: report the objective each epoch; raise TrialPruned when the pruner says so."""

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective

    def on_epoch_end(self, session, epoch: int, metrics: dict[str, Any]) -> None:
        import optuna

        value = metrics.get(self.objective)
        if value is None or not math.isfinite(value):
            return  # nothing to compare (e.g. no cell in the validation split); never prune on it
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.objective} {value:.4f})")


class _Report:
    """Optuna callback after each trial of this process: one line, the bar, the parent's metrics."""

    def __init__(self, settings: StudySettings, runner: Runner):
        self.settings, self.runner = settings, runner

    def __call__(self, study, trial) -> None:
        objective = self.settings.objective
        params = " · ".join(f"{k} {_fmt(v)}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else math.nan
        state = trial.state.name.lower()
        if trial.state.name == "COMPLETE":
            what = f"{objective} {trial.value:.4f}"
        elif trial.state.name == "PRUNED":
            what = f"at epoch {trial.user_attrs.get('pruned_at_epoch', '?')}"
        else:
            what = f"({objective} not finite)"
        best = _best(study)
        best_text = f" · best {best.value:.4f} (trial {best.number})" if best else ""
        if trial.state.name == "COMPLETE":
            self._log({objective: trial.value, **({f"best_{objective}": best.value} if best else {})}, trial.number)
        retry_of = trial.system_attrs.get("failed_trial")
        retried = f" · retry of trial {retry_of}" if retry_of is not None else ""
        line = f"trial {trial.number} {state} {what} · {params} · {seconds:.0f} s{retried}{best_text}"
        self.runner.done(line)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.runner.parent.log_metrics(metrics, step=step)
        except TrackingError as exc:  # tracking trouble must not stop the study
            log.warning("%s; the study continues", exc)


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


# --- results -----------------------------------------------------------------------------------


def _finish(study, settings: StudySettings, name: str, storage: str, out: Path, runs_dir: Path,
            parent) -> TuneResult | str:
    """Trials table, history figure and best.yaml, written locally and logged on the parent run
    (the reason instead, when no trial has completed yet: not a failure of the parent run)."""
    from cellseg.plots import save_figure

    trials = study.get_trials(deepcopy=False)
    table = trials_table(trials)
    table_path = runs_dir / "trials.csv"
    write_text(table_path, table.to_csv(index=False))
    figure_path = save_figure(history_figure(trials, settings), runs_dir / "history.png")
    parent.log_artifacts([table_path, figure_path], "study")
    best = _best(study)
    if best is None:
        counts = {s: sum(t.state.name == s for t in trials) for s in ("PRUNED", "FAIL", "RUNNING")}
        return (f"study {name}: no completed trial yet ({counts['PRUNED']} pruned, {counts['FAIL']} failed, "
                f"{counts['RUNNING']} running); {out} not written")
    best_config = Config.model_validate(best.user_attrs["config"])
    write_text(out, best_config.to_yaml())
    parent.log_artifacts([out], "study")
    parent.set_tags({"best_trial": best.number, f"best_{settings.objective}": f"{best.value:.6g}",
                     **{f"best.{k}": _fmt(v) for k, v in best.params.items()}})
    return TuneResult(study=name, storage=storage, trials=len(trials), best_trial=best.number,
                      best_value=best.value, best_params=dict(best.params), best_config=best_config,
                      parent_run_id=parent.run_id, out=out, table=table_path, figure=figure_path,
                      settings=settings)


def trials_table(trials):
    """One row per trial: number, state, value, params, timing, run folder and MLflow run id."""
    import pandas as pd

    rows = []
    for t in trials:
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value,
            **{f"param_{k}": v for k, v in t.params.items()},
            "epochs_reported": len(t.intermediate_values),
            "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
            "seconds": t.duration.total_seconds() if t.duration else None,
            "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
            "run_dir": t.user_attrs.get("run_dir"), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        })
    return pd.DataFrame(rows)


def history_figure(trials, settings: StudySettings):
    """Objective per trial with the best so far, and objective vs learning rate and vs CE ratio."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    sign = -1 if settings.direction == "minimize" else 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    history, by_lr, by_ratio = axes
    history.plot([t.number for t in done], [t.value for t in done], "o", label="complete")
    history.plot([t.number for t in pruned], [_last(t) for t in pruned], "x", color="grey",
                 label="pruned (last report)")
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or sign * t.value > sign * best:
            best = t.value
        xs.append(t.number)
        ys.append(best)
    history.step(xs, ys, where="post", color="C3", label="best so far")
    history.set_xlabel("trial")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, param, label, limits in ((by_lr, "lr", "learning rate", settings.lr_range),
                                     (by_ratio, "ce_ratio", "CE weight background:cell", settings.ratio_range)):
        ax.scatter([t.params[param] for t in done], [t.value for t in done], label="complete")
        ax.scatter([t.params[param] for t in pruned], [_last(t) for t in pruned], marker="x", color="grey",
                   label="pruned")
        ax.set_xscale("log")
        ax.set_xlim(*limits)  # the whole search range: where the trials went is part of the picture
        ax.set_xlabel(label)
    for ax in axes:
        ax.set_ylabel(settings.objective.replace("_", " "))
        ax.grid(alpha=0.3)
    history.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _last(trial) -> float:
    return trial.intermediate_values[max(trial.intermediate_values)]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """cellseg prints its own line per trial; Optuna's INFO lines, tracebacks of failed trials (the
    error itself reaches the caller) and experimental-argument warnings would only repeat it."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)
