"""Run the ``cellseg`` command with a fault injected where files are written (crash-recovery tests).

    python tests/faults.py disk-full PATTERN -- ARGS...
        every write to a file whose path contains PATTERN fails with ENOSPC, as on a full disk
    python tests/faults.py kill-writing PATTERN N -- ARGS...
        the N-th file opened for writing whose path contains PATTERN gets half of its first write,
        then the process SIGKILLs itself (a crash in the middle of writing that file)

Works under ``torchrun`` too (``torchrun … tests/faults.py …``). The fault sits in ``open`` (Python's
file objects, which torch.save, zarr, PIL and cellseg.fileio all write through), so the code under
test runs unchanged and has no test hooks of its own.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys


class _FaultyFile:
    """A file opened for writing whose next write fails (``kill`` False) or kills the process."""

    def __init__(self, fh, path: str, kill: bool):
        self._fh, self._path, self._kill = fh, path, kill

    def write(self, data) -> int:
        if self._kill:
            view = memoryview(data).cast("B")
            self._fh.write(view[: len(view) // 2])
            self._fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def install(kind: str, pattern: str, nth: int = 1) -> None:
    real_open = builtins.open
    opened = 0

    def faulty_open(file, mode="r", *args, **kwargs):
        nonlocal opened
        fh = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, (str, os.PathLike)) or not set("wax+") & set(mode) or pattern not in os.fspath(file):
            return fh
        if kind == "disk-full":
            return _FaultyFile(fh, os.fspath(file), kill=False)
        opened += 1
        return _FaultyFile(fh, os.fspath(file), kill=True) if opened == nth else fh

    builtins.open = io.open = faulty_open


def main(argv: list[str]) -> None:
    split = argv.index("--")
    spec, args = argv[:split], argv[split + 1 :]
    if spec[0] == "disk-full":
        install("disk-full", spec[1])
    elif spec[0] == "kill-writing":
        install("kill-writing", spec[1], int(spec[2]))
    else:
        raise SystemExit(f"unknown fault {spec[0]!r}")
    from cellseg.cli.main import main as cellseg

    sys.argv = ["cellseg", *args]
    cellseg()


if __name__ == "__main__":
    main(sys.argv[1:])
