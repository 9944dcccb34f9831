"""Starting from saved state: resuming a run from its checkpoint, or initialising from an earlier model.

A resumed run must be the run it continues, so its config may differ from the checkpoint's only
in keys that do not change what is computed (where it runs, how data is held, where it is
logged) and in ``train.epochs``, which may grow (schedule.py says how). Anything else is refused
with the keys named: start a new run, perhaps ``--init-from`` the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from cellseg.config import Config
from cellseg.errors import ConfigError, TrackingError
from cellseg.model.loading import Resolver, load_trained_model

RESUMABLE_KEYS = ("train.epochs", "train.device", "train.checkpoint_every", "data.store", "data.residency",
                  "data.num_workers")
RESUMABLE_PREFIXES = ("tracking.",)


def check_resume_config(saved: dict[str, Any], config: Config) -> None:
    """ConfigError naming the keys (other than the resumable ones) that differ from the checkpoint's."""
    if "resize" not in (saved.get("data") or {}):
        raise ConfigError("--resume: this run was trained before cellseg recorded its input geometry and "
                          "normalisation (whole stacks squashed to data.size, per-channel maximum) and cannot continue "
                          "unchanged; start a new run with --init-from it")
    try:
        old = Config.model_validate(saved).flat()
    except ValidationError:
        raise ConfigError("--resume: the checkpoint's config does not fit this cellseg version; "
                          "start a new run with --init-from it") from None
    new = config.flat()
    changed = [
        key for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and key not in RESUMABLE_KEYS and not key.startswith(RESUMABLE_PREFIXES)
    ]
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        raise ConfigError(
            f"--resume: the config differs from the checkpoint in {shown}; start a new run "
            "(optionally --init-from this one) instead"
        )


def load_initial_model(source: str | Path, resolve: Resolver | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of an earlier model: any source ``load_trained_model`` takes (a model URI
    needs ``resolve``), its errors prefixed with ``--init-from``."""
    try:
        trained = load_trained_model(source, resolve=resolve)
    except TrackingError as exc:
        raise TrackingError(f"--init-from {exc}") from None
    return trained.model.state_dict(), dict(trained.metadata)


def check_compatible(metadata: dict[str, Any], source: str | Path, in_channels: int, encoder: str,
                     num_classes: int) -> None:
    """One-line error when an earlier model cannot take this run's inputs or architecture."""
    if metadata.get("in_channels") != in_channels:
        raise ConfigError(
            f"--init-from {source}: the model takes {metadata.get('in_channels')} input channels, "
            f"but the loading codes give {in_channels}"
        )
    if metadata.get("encoder") != encoder:
        raise ConfigError(
            f"--init-from {source}: the model's encoder is {metadata.get('encoder')!r}, the config's "
            f"{encoder!r} (set model.encoder)"
        )
    if metadata.get("num_classes") != num_classes:
        raise ConfigError(
            f"--init-from {source}: the model predicts {metadata.get('num_classes')} classes, "
            f"this run {num_classes}"
        )
