"""MLflow's side of trained models: resolve a model URI to a local folder, list registered versions,
promote one. Building the network from what was saved is ``cellseg.model.loading``'s job; this
module's ``load_trained_model`` is that loader with MLflow URIs resolved here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellseg.errors import tracking_errors
from cellseg.model import loading
from cellseg.model.loading import Resolver, TrainedModel
from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri

KEY_METRICS = ("accuracy", "background_accuracy", "cell_accuracy", "dice", "iou")

if TYPE_CHECKING:
    import torch


def use_tracking_uri(tracking_uri: str | None = None) -> str:
    """Point MLflow's tracking and registry clients at the resolved URI (checked first); returns it."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def model_resolver(tracking_uri: str | None = None) -> Resolver:
    """A ``Resolver`` downloading ``models:/…``, ``runs:/…`` or any MLflow model URI from the tracking
    server at ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``), which is checked only when a URI comes."""

    def resolve(uri: str, scratch: Path) -> Path:
        import mlflow

        use_tracking_uri(tracking_uri)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tracking_errors(uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))

    return resolve


def load_trained_model(source: str | os.PathLike, device: str | torch.device = "cpu",
                       tracking_uri: str | None = None) -> TrainedModel:
    """``cellseg.model.loading.load_trained_model`` with model URIs resolved by MLflow at ``tracking_uri``:
    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model``, a local MLflow model folder,
    a run folder or a checkpoint file."""
    return loading.load_trained_model(source, device, resolve=model_resolver(tracking_uri))


# --- registry -----------------------------------------------------------------------------------


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One dict per registered model version (newest first per model): aliases, training codes,
    strategy, encoder, size and the final validation metrics of the run that trained it."""
    import mlflow

    uri = use_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    rows = []
    with tracking_errors(uri):
        for registered in _all_registered(client):
            aliases: dict[str, list[str]] = {}
            for alias, version in (registered.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            versions = client.search_model_versions(f"name = '{registered.name}'")
            for version in sorted(versions, key=lambda v: -int(v.version)):
                own = sorted(aliases.get(str(version.version), []))
                rows.append(_version_row(client, registered.name, version, own))
    return rows


def _all_registered(client) -> Iterator:
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        yield from sorted(page, key=lambda r: r.name)
        token = page.token
        if not token:
            return


def _version_row(client, name: str, version, aliases: list[str]) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        metadata = mlflow.models.get_model_info(f"models:/{name}/{version.version}").metadata or {}
    except (MlflowException, OSError):
        metadata = {}
    try:
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    except MlflowException:
        metrics = {}
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=timezone.utc)
    return {
        "name": name,
        "version": int(version.version),
        "aliases": aliases,
        "uri": f"models:/{name}/{version.version}",
        "run_id": version.run_id,
        "created": created.isoformat(timespec="seconds"),
        "strategy": metadata.get("strategy"),
        "codes": metadata.get("codes"),
        "encoder": metadata.get("encoder"),
        "size": metadata.get("size"),
        "metrics": {key: metrics[key] for key in KEY_METRICS if key in metrics},
    }


def promote(name: str, version: int | str, alias: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Point ``alias`` (e.g. champion, challenger) at ``name`` version ``version``; returns the version."""
    import mlflow

    use_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    target = f"models:/{name}/{version}"
    with tracking_errors(target):
        found = client.get_model_version(name, str(version))
    with tracking_errors(f"alias '{alias}'"):
        client.set_registered_model_alias(name, alias, str(found.version))
    return {"name": name, "version": int(found.version), "alias": alias, "uri": f"models:/{name}@{alias}"}
