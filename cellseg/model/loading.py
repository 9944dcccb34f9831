"""Trained models from any source, in one dispatch: a checkpoint file, a run folder, a local MLflow
model folder, or a model URI (``models:/NAME@ALIAS``, ``runs:/ID/model`` …), which a ``Resolver``
fetches into a local MLflow model folder (MLflow's is ``cellseg.tracking.models.model_resolver``;
this module never talks to a server).

Whatever the source, the network is rebuilt with ``build_model`` from the saved metadata and the
saved weights are loaded into it, so every source gives the same module of today's code. That also
makes models saved in MLflow's default ``pt2`` format usable: a ``torch.export`` program is fixed to
its input example's shape (batch 1, the training size), while tiled prediction needs any batch and
any tile size. (cellseg's trainer logs the ``pickle`` format, which loads as the module itself.)
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellseg.errors import TrackingError, one_line, tracking_errors
from cellseg.run_folder import CHECKPOINT_NAME

if TYPE_CHECKING:  # torch is imported where a model is built: `models list` and store checks need none
    import torch
    from torch import nn

REQUIRED_METADATA = ("codes", "layout", "classes", "size", "in_channels", "num_classes", "encoder")
MLMODEL_NAME = "MLmodel"  # the file that makes a folder an MLflow model
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")

Resolver = Callable[[str, Path], Path]
"""``resolve(uri, scratch)``: fetch the model at ``uri`` into the folder ``scratch``, return its local
MLflow model folder (one-line TrackingError when it cannot)."""


@dataclass
class TrainedModel:
    """A network in eval mode on its device, with the metadata it was logged with (docs/contracts.md)."""

    model: nn.Module
    metadata: dict[str, Any]
    uri: str
    model_id: str | None = None  # the MLflow LoggedModel id, when loaded from MLflow
    run_id: str | None = None  # the run that trained it, when known

    @property
    def in_channels(self) -> int:
        return int(self.metadata["in_channels"])

    @property
    def size(self) -> int:
        return int(self.metadata["size"])


def load_trained_model(source: str | os.PathLike, device: str | torch.device = "cpu",
                       resolve: Resolver | None = None) -> TrainedModel:
    """The model at ``source`` (see module doc) on ``device``; a URI needs ``resolve``.

    A source that does not exist or is not a cellseg model is a one-line TrackingError naming it.
    """
    import torch

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and (path / MLMODEL_NAME).is_file():
        trained = _from_mlflow_folder(path, text)
    elif path.is_file() or (path.is_dir() and (path / CHECKPOINT_NAME).is_file()):
        trained = _from_checkpoint(path, text)
    elif path.is_dir():
        raise TrackingError(f"{text}: neither an MLflow model folder ({MLMODEL_NAME}) nor a run folder "
                            f"({CHECKPOINT_NAME})")
    elif _URI.match(text):
        if resolve is None:
            raise TrackingError(f"{text}: a model URI, but nothing here resolves model URIs "
                                "(pass a resolver, e.g. cellseg.tracking.models.model_resolver())")
        with tempfile.TemporaryDirectory(prefix="cellseg-model-") as scratch:
            folder = resolve(text, Path(scratch))
            if not (folder / MLMODEL_NAME).is_file():
                raise TrackingError(f"{text}: not an MLflow model (no {MLMODEL_NAME} file there)")
            trained = _from_mlflow_folder(folder, text)
    else:
        raise TrackingError(
            f"{text}: no such model (not a file or folder, nor a models:/NAME@ALIAS, models:/NAME/VERSION "
            "or runs:/ID/model URI)"
        )
    # channels-last: ~14% faster U-Net forward on this CPU (oneDNN), the fast layout on CUDA too
    trained.model.to(device, memory_format=torch.channels_last).eval()
    return trained


def _from_mlflow_folder(folder: Path, uri: str) -> TrainedModel:
    import mlflow.pytorch
    from mlflow.models import Model

    with tracking_errors(uri):
        info = Model.load(str(folder))
        if "pytorch" not in info.flavors:
            raise TrackingError(f"{uri}: not a PyTorch model (flavours: {', '.join(info.flavors)})")
        metadata = _check_metadata(dict(info.metadata or {}), uri)
        loaded = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    model = _rebuild(metadata, loaded.state_dict(), uri)
    return TrainedModel(model, metadata, uri, model_id=info.model_id, run_id=info.run_id)


def _from_checkpoint(path: Path, source: str) -> TrainedModel:
    from cellseg.engine.checkpoint import load_checkpoint  # a leaf module: torch and the file format only

    state = load_checkpoint(path)
    metadata = _check_metadata(dict(state.get("metadata") or {}), source)
    model = _rebuild(metadata, state["model"], source)
    run_id = (state.get("callbacks") or {}).get("mlflow", {}).get("run_id")
    return TrainedModel(model, metadata, source, run_id=run_id)


def _check_metadata(metadata: dict[str, Any], uri: str) -> dict[str, Any]:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise TrackingError(f"{uri}: model metadata lacks {', '.join(missing)} (not a model logged by cellseg?)")
    return metadata


def _rebuild(metadata: dict[str, Any], state_dict: dict[str, torch.Tensor], uri: str) -> nn.Module:
    from cellseg.model import build_model

    model = build_model(
        encoder=metadata["encoder"],
        in_channels=int(metadata["in_channels"]),
        num_classes=int(metadata["num_classes"]),
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise TrackingError(f"{uri}: weights do not fit a {metadata['encoder']} U-Net ({one_line(exc)})") from None
    return model
