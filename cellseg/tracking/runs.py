"""MLflow run logging for the training engine: one run per fit, continued on resume, model registered.

``MlflowCallback`` opens the run when the fit starts (or reopens the run whose id the checkpoint
stored, so a resumed run continues the SAME MLflow run; or, under ``mlflow run``, the run named by
``MLFLOW_RUN_ID``, so the project run holds the training), logs every resolved parameter, the
config and the split, per-epoch metrics with ``step=epoch``, and at the end the learning curves,
example prediction overlays and the model in the ``mlflow.pytorch`` flavour, registered under
``--register-as`` (default ``cellseg-<strategy>``). The engine writes each checkpoint before it
calls the callback, and a failure to log an epoch is a warning, so tracking trouble never costs
training. ``check_tracking_uri`` tries an http(s) server or opens a SQLite store up front, so an
unreachable or unopenable store fails in seconds rather than after an hour of training.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import logging
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.config import strategy_label
from cellseg.errors import TrackingError, one_line, tracking_errors
from cellseg.locks import hold
from cellseg.run_folder import CONFIG_NAME, METRICS_NAME, SPLIT_NAME

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
MODEL_NAME = "model"  # artifact name of the logged model (docs/contracts.md)
NEW_VERSION_ALIAS = "challenger"  # a freshly trained version is a candidate …
DEFAULT_ALIAS = "champion"  # … and also the default one while the registered model has none
MODEL_EPOCH_TAG = "cellseg.model_epoch"
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run`: a fit outside any study logs into that run
CHECK_TIMEOUT_S = 5.0
_opened: set[str] = set()  # SQLite stores this process has opened (and created if new)


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """CLI value > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (MLflow's default store), with a
    relative SQLite path made absolute: MLflow caches one store per URI, so ``sqlite:///mlflow.db``
    would keep writing to the file of the first working directory it was used in."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, query = uri[len(prefix):].partition("?")[::2]
    if not path or path == ":memory:" or Path(path).is_absolute() or re.match(r"[A-Za-z]:[/\\]", path):
        return uri
    return prefix + (Path.cwd() / path).as_posix() + (f"?{query}" if query else "")


def check_tracking_uri(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """TrackingError (one line, in seconds) if ``uri`` cannot work: an http(s) server that does not
    answer, or a SQLite database that cannot be opened (a new one is created here, under a lock: see
    ``_open_sqlite_store``). Also caps MLflow's HTTP retries so an outage mid-training costs seconds
    per epoch (values set in the environment win)."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"--tracking-uri {uri}: MLflow server not reachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        _open_sqlite_store(uri)


def _open_sqlite_store(uri: str) -> None:
    """Open a SQLite store, once per process: a file SQLite cannot open fails here in milliseconds
    (MLflow retries opening it for ~100 s, with a warning each time). Then MLflow creates or checks its
    tables under the lock ``<db>.lock``: processes starting together on a new store would otherwise
    create and migrate it at once ("duplicate column name"). A read-only folder needs no lock (nobody
    can create a store there) and gets none (a lock file could not be made)."""
    path = uri[len("sqlite:///"):].partition("?")[0]
    if uri in _opened or path in ("", ":memory:"):
        return
    path = Path(path)
    if not path.parent.is_dir():
        raise TrackingError(f"--tracking-uri {uri}: folder {path.parent} does not exist")
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:  # waits out another's commit
            db.execute("PRAGMA schema_version")  # reads the header: a file that is not a database fails too
    except sqlite3.Error as exc:
        raise TrackingError(f"--tracking-uri {uri}: cannot open the SQLite database ({exc})") from None
    lock = hold(path, "setting up the MLflow store", wait=True) if os.access(path.parent, os.W_OK) else None
    with lock or contextlib.nullcontext(), tracking_errors(f"MLflow at {uri}"):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking and registry stores each create
        client.search_registered_models(max_results=1)  # MLflow's tables if missing
    _opened.add(uri)


def experiment_id(client, name: str) -> str:
    """Id of experiment ``name``, created when missing (a parallel process may create it meanwhile)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def redact(url: str) -> str:
    """``url`` (or any text holding one) without the password of ``scheme://user:password@host``."""
    return re.sub(r"(://[^:/@\s]+):[^@\s]*@", r"\1:***@", url)


def run_label(strategy: str | None, codes, data) -> str:
    """What a training run trains on, for its MLflow run name: ``fluorescence · 0,3,6 · 96px stacks``
    (the strategy, or ``codes …`` when explicit codes replace it; the network input from ``data``,
    a ``DataConfig``: whole stacks resized to ``size``, or crops of ``size`` at ``scale``)."""
    codes = ",".join(map(str, codes))
    inputs = f"{data.size}px stacks" if data.resize == "stack" else f"{data.size}px crops"
    if data.resize != "stack" and data.scale != 1:
        inputs += f" ×{data.scale:g}"
    return f"{strategy} · {codes} · {inputs}" if strategy else f"codes {codes} · {inputs}"


SOURCE_NAME_MAX = 1000  # characters of the command line kept in mlflow.source.name


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as typed (``cellseg train --data …``), passwords in URLs redacted:
    the program is named by its file name (``python -m cellseg`` for a package's ``__main__``)."""
    argv = list(sys.argv if argv is None else argv) or ["cellseg"]
    program = Path(argv[0]).name
    if program == "__main__.py":  # python -m PACKAGE
        program = f"python -m {Path(argv[0]).parent.name}"
    text = " ".join([program, *(shlex.quote(redact(arg)) for arg in argv[1:])])
    return text if len(text) <= SOURCE_NAME_MAX else text[:SOURCE_NAME_MAX - 1] + "…"


def source_tags() -> dict[str, str]:
    """MLflow's standard run tags (the UI's "Created by" and "Source") for a run of this process.
    ``MlflowClient.create_run`` sets none of them (``mlflow.start_run`` would, naming the source by the
    script's path only): ``mlflow.source.type``/``name`` (the command line, see ``command_line``),
    ``mlflow.user``, and ``mlflow.source.git.commit`` when the working directory is in a git checkout."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 — no login name (e.g. a container's uid without a passwd entry)
        user = "unknown"
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": command_line(), "mlflow.user": user}
    commit = _git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout holding ``folder``; None outside one, without git, or if git hangs."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit) else None


def registered_name(register_as: str | None, strategy: str | None) -> str:
    """``--register-as`` or ``cellseg-<strategy>`` (``cellseg-custom`` for explicit codes)."""
    return register_as or f"cellseg-{strategy_label(strategy)}"


class MlflowCallback:
    """Engine callback logging one fit as one MLflow run (see module docstring).

    ``register=False`` logs the model without registering it; ``log_model=False`` logs no model
    (e.g. trials of a study); ``parent_run_id`` nests the run under a study/comparison run and
    ``tags`` are set on it (strategy, replicate, trial …).
    """

    state_key = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "cellseg", register_as: str | None = None,
                 register: bool = True, log_model: bool = True, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_name: str | None = None, examples: int = 4):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.register_as, self.register, self.log_model = register_as, register, log_model
        self.parent_run_id, self.tags, self.run_name, self.examples = parent_run_id, dict(tags or {}), run_name, examples
        self.run_id: str | None = None
        self.model_uri: str | None = None
        self.registered: tuple[str, int] | None = None  # (name, version)
        self._client = None
        self._logged_epochs: set[int] = set()  # already in the run when this fit started

    # --- checkpointed state: the run id, so --resume continues the same run ---------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    # --- engine hooks ----------------------------------------------------------------------------
    def on_fit_start(self, session) -> None:
        check_tracking_uri(self.uri)
        with tracking_errors(f"MLflow at {self.uri}"):
            experiment_id = self._experiment_id()
            origin = "of the checkpoint"
            if self.run_id is None and self.parent_run_id is None and os.environ.get(PROJECT_RUN_ENV):
                self.run_id, origin = os.environ[PROJECT_RUN_ENV], f"in ${PROJECT_RUN_ENV}"
            if self.run_id and not self._reopen(session, origin):
                self.run_id = None
            if self.run_id is None:
                tags = {**source_tags(), **self._tags(session),
                        **({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {})}
                name = self.run_name or self._run_name(session, experiment_id)
                run = self.client.create_run(experiment_id, run_name=name, tags=tags)
                self.run_id = run.info.run_id
            self._log_params(session)
            for name in (CONFIG_NAME, SPLIT_NAME):
                self.client.log_artifact(self.run_id, str(session.run_dir / name))
            self._log_missing_epochs(session.history)

    def on_epoch_end(self, session, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch in self._logged_epochs:  # logged before a crash, recomputed from an older checkpoint
            return
        try:
            self._log_metrics([metrics])
        except Exception as exc:  # noqa: BLE001 — tracking trouble must not stop training
            log.warning("MLflow: could not log epoch %d (%s); the checkpoint is saved, training continues",
                        epoch, one_line(exc))

    def on_fit_end(self, session, result) -> None:
        try:
            self._log_figures(session)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log the figures (%s)", one_line(exc))
        with tracking_errors(f"MLflow: logging the model of {session.run_dir} (saved in its checkpoint; "
                              "--resume logs it again)"):
            if self.log_model:
                self._log_and_register(session, result)
            self.client.set_terminated(self.run_id, "FINISHED")

    def on_fit_error(self, session, exc: BaseException) -> None:
        if self.run_id is None:
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned" else "FAILED"
        try:
            if type(exc).__name__ == "TrialPruned":
                self.client.set_tag(self.run_id, "cellseg.pruned", "true")
            self.client.set_terminated(self.run_id, status)
        except Exception as err:  # noqa: BLE001 — already failing; do not mask the cause
            log.warning("MLflow: could not mark run %s as %s (%s)", self.run_id, status, one_line(err))

    # --- helpers -----------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        return experiment_id(self.client, self.experiment)

    def _reopen(self, session, origin: str) -> bool:
        """Continue run ``self.run_id`` (``origin`` says where the id came from, for the warnings)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.run_id)
        except MlflowException:
            log.warning("MLflow: run %s %s is not in %s; starting a new run", self.run_id, origin, self.uri)
            return False
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow: run %s %s was deleted; starting a new run", self.run_id, origin)
            return False
        from mlflow.entities import RunTag

        self.client.update_run(self.run_id, status="RUNNING")
        # the caller's tags again: e.g. a retried trial continuing a dead trial's run gets its new number;
        # a run opened by `mlflow run` gets what this fit trains on
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._tags(session).items()])
        return True

    def _run_name(self, session, experiment_id: str) -> str:
        """What ran (``run_label``), and the run folder's name after it when the experiment already
        has a run of that name (MLflow allows duplicates; the folder tells them apart)."""
        data = session.config.data
        name = run_label(session.plan.strategy, session.plan.codes, data)
        quote = "'" if "'" not in name else '"'  # MLflow's filter has no escapes: the other quote
        try:
            taken = quote in name or self.client.search_runs(
                [experiment_id], filter_string=f"attributes.run_name = {quote}{name}{quote}", max_results=1)
        except Exception as exc:  # noqa: BLE001 — a name is not worth a failed run
            log.debug("MLflow: could not look for runs named %r (%s)", name, one_line(exc))
            taken = True
        return f"{name} · {session.run_dir.name}" if taken else name

    def _tags(self, session) -> dict[str, str]:
        plan = session.plan
        return {"strategy": strategy_label(plan.strategy), "codes": ",".join(map(str, plan.codes)),
                "cellseg.run_dir": str(session.run_dir.resolve()), **self.tags}

    def _log_params(self, session) -> None:
        """All resolved params; on resume, changed values (e.g. train.epochs) become tags (params are immutable)."""
        from mlflow.entities import Param, RunTag

        plan, store, split = session.plan, session.store, session.split
        params = {
            **session.config.flat(),
            "data.codes": ",".join(map(str, plan.codes)),  # the resolved codes, also when a strategy named them
            "codes": ",".join(map(str, plan.codes)),
            "strategy": plan.strategy,
            "in_channels": plan.in_channels,
            "store.content_hash": store.content_hash,
            "store.layout": store.layout.name,
            "split.train": len(split.train),
            "split.val": len(split.val),
            "model.parameters": sum(p.numel() for p in session.model.parameters()),
            "device": str(session.device),
            "world_size": session.world.size,  # processes of a data-parallel run (global batch = × batch_size)
        }
        params = {k: str(v) for k, v in params.items()}
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"cellseg.resumed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        for start in range(0, max(len(new), len(changed)), 100):
            self.client.log_batch(self.run_id, params=new[start:start + 100], tags=changed[start:start + 100])

    def _log_metrics(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(record["epoch"]))
                   for record in records for key, value in record.items()
                   if key != "epoch" and isinstance(value, (int, float))]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def _log_missing_epochs(self, history: list[dict[str, Any]]) -> None:
        """After a resume: epochs the checkpoint has but the run lacks (a crash between the two)."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        missing = [record for record in history if record["epoch"] not in logged]
        if missing:
            self._log_metrics(missing)
        self._logged_epochs = logged | {record["epoch"] for record in missing}

    def _log_figures(self, session) -> None:
        import tempfile

        from cellseg.plots import image_grid, learning_curves, save_figure
        from cellseg.visualize import PREDICTION_COLOUR, TRUTH_COLOUR, overlay

        with tempfile.TemporaryDirectory(prefix="cellseg-plots-") as tmp:
            if session.history:
                save_figure(learning_curves(session.history), Path(tmp) / "learning_curves.png")
            x, y, ids = _example_batch(session, self.examples)
            prediction = session.predict(x)
            images = [overlay(x[i], prediction[i], y[i]) for i in range(len(x))]
            legend = [("ground truth", TRUTH_COLOUR), ("prediction", PREDICTION_COLOUR)]
            save_figure(image_grid(images, ids, legend=legend), Path(tmp) / "predictions.png")
            self.client.log_artifacts(self.run_id, tmp, artifact_path="plots")
        self.client.log_artifact(self.run_id, str(session.run_dir / METRICS_NAME))

    def _log_and_register(self, session, result) -> None:
        import mlflow
        import mlflow.pytorch
        import torch

        epoch = str(session.history[-1]["epoch"]) if session.history else "0"
        run = self.client.get_run(self.run_id)
        if run.data.tags.get(MODEL_EPOCH_TAG) == epoch:  # resumed a finished run with nothing to add
            self.model_uri = run.data.tags.get("cellseg.model_uri")
            return
        model = copy.deepcopy(result.model).float().cpu().to(memory_format=torch.contiguous_format).eval()
        example = _input_example(session)
        name = registered_name(self.register_as, session.plan.strategy) if self.register else None
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None), _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                signature=_signature(result.metadata),
                input_example=example,
                metadata=result.metadata,
                pip_requirements=_requirements(),
                registered_model_name=name,
                serialization_format="pickle",  # an nn.Module that takes any image size, not an export
            )
        self.model_uri = info.model_uri
        tags = {MODEL_EPOCH_TAG: epoch, "cellseg.model_uri": info.model_uri}
        if name is not None:
            version = int(info.registered_model_version)
            self.registered = (name, version)
            self.client.set_registered_model_alias(name, NEW_VERSION_ALIAS, str(version))
            if DEFAULT_ALIAS not in (self.client.get_registered_model(name).aliases or {}):
                self.client.set_registered_model_alias(name, DEFAULT_ALIAS, str(version))
            tags["cellseg.registered"] = f"models:/{name}/{version}"
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def _example_batch(session, n: int):
    """Up to ``n`` validation samples and their stack ids (fit refuses a split without validation stacks)."""
    x, y = next(iter(session.val_source.epoch(0)))
    return x[:n], y[:n], [session.store.ids[i] for i in session.val_source.indices[:n]]


def _input_example(session) -> np.ndarray:
    x, _, _ = _example_batch(session, 1)
    return x.float().cpu().numpy()


def _signature(metadata: dict[str, Any]):
    """(batch, in_channels, H, W) float32 -> (batch, num_classes, H, W) logits; any H and W."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, metadata["in_channels"], -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, metadata["num_classes"], -1, -1))]),
    )


def _requirements() -> list[str]:
    """Stated, not inferred (MLflow's inference re-imports the model in a subprocess: slow)."""
    import timm
    import torch

    import cellseg

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", f"cellseg=={cellseg.__version__}"]


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a logger's warnings (pickle is chosen on purpose; MLflow warns about it every time)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)

