"""Atomic writes: a file or folder appears complete under its final name, or not at all.

A file is flushed to disk before it is renamed into place (and the rename after), so even a
machine that loses power leaves the previous or the new complete file, never a torn one. A
killed process can leave its temporary beside the target; ``remove_leftovers`` clears those.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cellseg.errors import BadInputError


def check_writable_dir(directory: Path) -> None:
    """Create ``directory`` if needed; BadInputError (one line) when it cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror
        raise BadInputError(f"{directory}: cannot create output folder ({reason})") from exc
    if not os.access(directory, os.W_OK):
        raise BadInputError(f"{directory}: output folder is not writable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Works for files and folders. On error the temporary is removed and ``path`` is untouched.
    """
    final = Path(path)
    check_writable_dir(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise BadInputError(f"{final}: could not write ({exc.strerror or exc})") from exc
    tmp.rmdir()  # the caller creates a file or a folder under this name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync(final.parent)
    except OSError as exc:
        _remove(tmp)
        raise BadInputError(f"{final}: could not write ({exc.strerror or exc})") from exc
    except BaseException:
        _remove(tmp)
        raise


def remove_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries ``atomic_path`` left beside ``path`` when a process was killed while
    writing it; returns their names. Call it holding the target's lock (``cellseg.locks.hold``): another
    process's working copy looks the same."""
    final = Path(path)
    removed = []
    for pattern in (f".{final.name}.*.tmp", f".{final.name}.old-*"):
        for leftover in sorted(final.parent.glob(pattern)):
            _remove(leftover)
            removed.append(leftover.name)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file, None when it does not exist (an optional result); BadInputError naming it
    when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise BadInputError(f"{path}: not valid JSON") from None


def json_safe(value: Any) -> Any:
    """NaN (e.g. a class absent from validation) becomes null, so the JSON written is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
