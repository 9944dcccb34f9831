"""Advisory locks: a second holder is told who holds the lock, waits with ``wait``, and a killed
holder leaves nothing to clean up."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import UnixFileLock

from cellseg.errors import BadInputError
from cellseg.locks import hold, lock_path

HOLDER = """
import sys
from cellseg.locks import hold
with hold(sys.argv[1], "training into it"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """Another process holding the lock of runs/a until its stdin closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, "runs/a"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_second_holder_gets_one_line_naming_the_first(holder):
    with pytest.raises(BadInputError) as caught:
        with hold("runs/a", "training into it"):
            pass
    message = str(caught.value)
    host = socket.gethostname()
    assert message.startswith(f"runs/a: another cellseg process (pid {holder.pid} on host {host}, since ")
    assert message.endswith(") is training into it; wait for it or pass --wait")
    assert json.loads(lock_path("runs/a").read_text())["pid"] == holder.pid
    assert not Path("runs/a").exists()  # the lock sits beside the target, which need not exist
    with pytest.raises(BadInputError, match=r"is training into it; wait for it to end$"):
        with hold("runs/a", "training into it", wait=None):  # a command without --wait: not suggested
            pass


def test_a_killed_holder_leaves_no_stale_lock(holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with hold("runs/a", "training into it"):
        assert json.loads(lock_path("runs/a").read_text())["pid"] == os.getpid()


def test_wait_blocks_until_the_holder_is_done(capfd):
    started, released = threading.Event(), threading.Event()

    def first():
        with hold("s.zarr", "writing it"):
            started.set()
            time.sleep(0.5)
            released.set()

    thread = threading.Thread(target=first)
    thread.start()
    started.wait()
    with hold("s.zarr", "writing it", wait=True):
        assert released.is_set()
    thread.join()
    assert "s.zarr: another cellseg process" in capfd.readouterr().err


def test_file_system_without_flock_is_one_line(monkeypatch):
    def no_flock(self, *args, **kwargs):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(UnixFileLock, "acquire", no_flock)
    expected = r"^s.zarr.lock: cannot lock \(Function not implemented\); this file system lacks flock locks"
    with pytest.raises(BadInputError, match=expected):
        with hold("s.zarr", "writing it"):
            pass
