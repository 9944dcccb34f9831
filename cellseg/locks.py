"""Advisory locks: one cellseg process at a time writes a given store or run folder.

``hold(path, what)`` locks ``<path>.lock``, a file beside the target (the target may not exist yet
and is replaced by rename, so it cannot carry the lock itself). The lock is the kernel's ``flock``
through filelock's ``UnixFileLock``: the kernel drops it when the holder ends, however it ends
(SIGKILL included), so a stale lock never needs clearing. The file stays after release: deleting
it would let a waiter and a newcomer lock two different files.

File systems: every local one; NFSv4 and NFSv3 with lockd (Linux maps ``flock`` to NFS byte-range
locks, so processes on different hosts exclude each other); Lustre mounted with ``-o flock``. SMB/CIFS
mounts and Lustre without ``flock`` may not support it: ``hold`` then stops with one line rather than
fall back to an existence lock that a killed process would leave behind.

The lock file holds the holder's pid, host, start time and task, so a second process can name it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import Timeout, UnixFileLock

from cellseg.errors import BadInputError
from cellseg.fileio import check_writable_dir


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, wait: bool | None = False) -> Iterator[None]:
    """Hold the lock of ``path`` for the block; ``what`` says what this process does with it
    ("writing it"), for the message another process gets.

    Held elsewhere: BadInputError naming the holder, or with ``wait`` one line on stderr and block
    until it is free. ``wait`` None: the command offers no ``--wait``, so the message does not suggest it.
    """
    path = Path(path)
    check_writable_dir(path.parent)
    lock = UnixFileLock(lock_path(path), fallback_to_soft=False, on_acquired=lambda fd: _write_holder(fd, what))
    try:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            busy = f"{path}: another cellseg process {_holder(lock_path(path))}"
            if not wait:
                advice = "wait for it to end" if wait is None else "wait for it or pass --wait"
                raise BadInputError(f"{busy}; {advice}") from None
            print(f"{busy}; waiting for it", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError as exc:
        unsupported = exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
        hint = "; this file system lacks flock locks: write to a local or NFS folder" if unsupported else ""
        raise BadInputError(f"{lock_path(path)}: cannot lock ({exc.strerror or exc}){hint}") from None
    try:
        yield
    finally:
        lock.release()


def _write_holder(fd: int, what: str) -> None:
    """Record who holds the lock in the lock file, through the locked descriptor (on NFS, closing any
    other descriptor of the file would drop the lock). Best effort: a full disk must not stop the work."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)


def _holder(lock_file: Path) -> str:
    """'(pid 123 on host h, since …) is writing it', from the lock file; vaguer when it is unreadable
    (the holder may not have written it yet)."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"(pid {info['pid']} on host {info['host']}, since {since}) is {info['what']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "is using it"
