"""MLflow runs that cellseg opens itself rather than through a fit.

Two uses: the **parent run** of a study, sweep or comparison, whose children are the fits (each an
``MlflowCallback`` nested with ``parent_run_id``; ``TrackedRun.child_callback`` builds one), and the
single run of a command that trains no model (lr-find, augment preview). ``tracked_run`` creates
the run (or reopens one by id, e.g. a study continued by a second invocation), yields a
``TrackedRun`` to log params, metrics and artifacts through, and marks the run FINISHED when the
block ends, KILLED on Ctrl-C and FAILED on any other error (which it re-raises unchanged).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.errors import one_line
from cellseg.tracking.runs import (
    MlflowCallback,
    check_tracking_uri,
    experiment_id,
    resolve_tracking_uri,
    source_tags,
    tracking_errors,
)

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "cellseg.kind"  # lr-find, sweep-ce, tune, compare, augment-preview
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@dataclass
class TrackedRun:
    """An open MLflow run; every method raises a one-line TrackingError on failure."""

    client: Any  # mlflow.MlflowClient
    uri: str
    experiment: str
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not logged yet (params are immutable, so a reopened run keeps its first values)."""
        from mlflow.entities import Param

        with tracking_errors(f"MLflow at {self.uri}"):
            logged = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in logged]
            for start in range(0, len(new), 100):
                batch = new[start:start + 100]
                try:
                    self.client.log_batch(self.run_id, params=batch)
                except Exception:
                    # another worker of the same study logged them between our read and write
                    logged = self.client.get_run(self.run_id).data.params
                    if any(p.key not in logged for p in batch):
                        raise

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with tracking_errors(f"MLflow at {self.uri}"):
            for start in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with tracking_errors(f"MLflow at {self.uri}"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: list[str | Path], artifact_path: str | None = None) -> None:
        with tracking_errors(f"MLflow at {self.uri}: logging artifacts"):
            for path in paths:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def child_callback(self, tags: dict[str, Any] | None = None, run_name: str | None = None,
                       **kwargs: Any) -> MlflowCallback:
        """An engine callback whose fit becomes a child run of this one (``kwargs``: MlflowCallback's)."""
        return MlflowCallback(self.uri, self.experiment, parent_run_id=self.run_id,
                              tags={k: str(v) for k, v in (tags or {}).items()}, run_name=run_name, **kwargs)

    def children(self) -> list:
        """The child runs (mlflow ``Run`` objects), oldest first."""
        with tracking_errors(f"MLflow at {self.uri}"):
            exp = self.client.get_experiment_by_name(self.experiment).experiment_id
            runs = self.client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                                           order_by=["attributes.start_time ASC"], max_results=50000)
        return list(runs)


@contextlib.contextmanager
def tracked_run(name: str, kind: str, tracking_uri: str | None = None, experiment: str = "cellseg",
                tags: dict[str, Any] | None = None, run_id: str | None = None) -> Iterator[TrackedRun]:
    """Open (or, given ``run_id``, reopen) a run named ``name`` tagged ``cellseg.kind=kind``; see module doc."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    with tracking_errors(f"MLflow at {uri}"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {**source_tags(), KIND_TAG: kind, **{k: str(v) for k, v in (tags or {}).items()}}
            run_id = client.create_run(experiment_id(client, experiment), run_name=name, tags=all_tags).info.run_id
    run = TrackedRun(client, uri, experiment, run_id)
    try:
        yield run
    except BaseException as exc:
        _terminate(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    with tracking_errors(f"MLflow at {uri}"):
        client.set_terminated(run_id, "FINISHED")


def _terminate(run: TrackedRun, status: str) -> None:
    try:
        run.client.set_terminated(run.run_id, status)
    except Exception as err:  # noqa: BLE001 — already failing; do not mask the cause
        log.warning("MLflow: could not mark run %s as %s (%s)", run.run_id, status, one_line(err))


def shared_run_id(name: str, kind: str, key: str, tracking_uri: str | None = None,
                  experiment: str = "cellseg") -> str:
    """Id of THE run tagged ``cellseg.kind=kind`` and ``key=name`` (e.g. a study's parent run, which
    every worker and every later invocation continues), created when there is none. Processes that
    race to create it agree on one: each re-reads after creating, the oldest run wins and the others
    delete their own. Pass the id to ``tracked_run(run_id=...)``."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    with tracking_errors(f"MLflow at {uri}"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = experiment_id(client, experiment)
        found = _tagged(client, exp, kind, key, name)
        if found:
            return found[0]
        ours = client.create_run(exp, run_name=name, tags={**source_tags(), KIND_TAG: kind, key: name}).info.run_id
        winner = _tagged(client, exp, kind, key, name)[0]
        if winner != ours:
            client.delete_run(ours)
        return winner


def _tagged(client, experiment_id: str, kind: str, key: str, value: str) -> list[str]:
    """Ids of the active runs with both tags, oldest first (ties broken by id, the same for everyone)."""
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"tags.`{KIND_TAG}` = '{kind}' AND tags.`{key}` = '{value}'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]
