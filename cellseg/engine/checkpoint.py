"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

``checkpoint_last.pt`` in the run folder holds (keys of the saved dict):
``format``, ``metadata`` (the model metadata of docs/contracts.md: codes, layout, classes, size, …),
``model`` (state dict, on the CPU), ``optimizer``/``scheduler`` (of the cycle in progress; None at the end of a cycle),
``cycles`` (list of {phase, epochs}), ``epoch`` (epochs completed), ``history`` (metric curves),
``rng`` (python, numpy, torch, cuda; ``rng_ranks`` the same for ranks 1.. of a distributed run of
``world_size`` processes), ``callbacks`` (state per callback key, e.g. the MLflow run id),
``store_hash`` and ``config`` (the resolved config as a dict).
Everything is plain tensors/containers, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.errors import BadInputError
from cellseg.fileio import atomic_path
from cellseg.run_folder import CHECKPOINT_NAME

FORMAT = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` so that ``path`` is always either the previous or the new complete file
    (a full disk is a one-line BadInputError naming ``path``, and the previous file stays)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        sink = _Sink(fh)
        try:
            torch.save({"format": FORMAT, **state}, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
    return Path(path)


class _Sink:
    """The file torch.save writes to, remembering the OSError of a failed write: torch reports it as
    a RuntimeError ("unexpected pos …"), which would hide e.g. "No space left on device"."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (a file, or a run folder holding ``checkpoint_last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise BadInputError(f"{path}: not a readable cellseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a cellseg checkpoint (format {FORMAT} expected)")
    return state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """``random.setstate`` wants tuples; a round trip through some loaders yields lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
