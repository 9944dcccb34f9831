"""Real servers for tests, started by the tests themselves on loopback ports (session-scoped).

``mlflow_server``  the ``mlflow server`` CLI (SQLite backend, proxied artifact store) -> its http URI
``postgres_url``   a throwaway PostgreSQL cluster (initdb + pg_ctl)                  -> postgresql:// URL
``s3_endpoint``    moto's S3 server                                                 -> S3Endpoint

Engines, not mocks: the scale-out paths (tracking server, Optuna RDB storage, DVC remote) fail in
ways only a real server shows. Each server is started once per test process (one per xdist worker)
and stopped at the end of the session. Registered by ``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
# Where Debian/Ubuntu (postgresql-NN) and source builds put the server binaries; PATH is searched first.
PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/pgsql-*/bin")


def free_port() -> int:
    """A loopback TCP port free right now (a server started on it may still lose a race: retry)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _bypass_proxy_for_loopback() -> None:
    """Clients (requests, botocore) must not send loopback traffic to a proxy set for the CI machine."""
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(name, "").split(",") if h]
        os.environ[name] = ",".join(hosts + [h for h in (LOOPBACK, "localhost") if h not in hosts])


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server started in its own session, children included (mlflow server spawns uvicorn)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------- MLflow


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow_server(root: Path, timeout: float = 180.0) -> tuple[str, subprocess.Popen]:
    """``mlflow server`` on a free loopback port; returns (http URI, process) once /health answers."""
    _bypass_proxy_for_loopback()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
    env.pop("MLFLOW_TRACKING_URI", None)
    for _attempt in range(3):
        port = free_port()
        log = root / f"server-{port}.log"
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        with open(log, "wb") as out:  # own session: teardown stops mlflow's uvicorn child too
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
            )
        uri = f"http://{LOOPBACK}:{port}"
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _http_ok(f"{uri}/health") and proc.poll() is None:
                return uri, proc
            time.sleep(0.2)
        _stop_group(proc)
        if "address already in use" not in _tail(log).lower():
            break
    raise RuntimeError(f"mlflow server did not answer {uri}/health within {timeout:.0f} s; log:\n{_tail(log)}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI (http://127.0.0.1:PORT) of a real MLflow tracking server with artifact proxying."""
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    _stop_group(proc)


# ----------------------------------------------------------------------------------- PostgreSQL


def find_postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first (symlinks resolved), then distro locations."""
    candidates = []
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(os.path.realpath(found)).parent)
    for pattern in PG_BIN_GLOBS:  # newest major version first
        candidates += sorted(map(Path, glob.glob(pattern)), key=lambda p: _version_key(p.parent.name), reverse=True)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version_key(name: str) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return tuple(int(d) for d in digits)


def _server_account() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as `postgres` (or `nobody`); else as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


class PostgresCluster:
    """One initdb'd cluster in a private folder, listening on loopback TCP and a private socket dir."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.account = _server_account()
        # Not under pytest's basetemp: that is mode 0700 for root, unreadable to the server account.
        self.base = Path(tempfile.mkdtemp(prefix="cellseg-pg-"))
        self.data, self.sockets, self.log = self.base / "data", self.base / "sockets", self.base / "server.log"
        self.sockets.mkdir()
        if self.account:
            for path in (self.base, self.sockets):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        self.port: int | None = None

    def _run_as_server(self, *args: str) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.account:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], cwd=self.base, capture_output=True, text=True, **kwargs
        )

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.strip()}\n{_tail(self.log)}")

    def start(self) -> None:
        self._check(
            self._run_as_server("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale",
                                "-E", "UTF8", "--no-sync"),
            "initdb",
        )  # fmt: skip
        for _attempt in range(3):
            self.port = free_port()
            # -F: no fsync (a throwaway cluster); max_connections covers a few workers' pools.
            options = f"-h {LOOPBACK} -p {self.port} -k {self.sockets} -F -c max_connections=50"
            result = self._run_as_server("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                                         "-o", options, "start")  # fmt: skip
            if result.returncode == 0:
                break
            if "could not bind" not in _tail(self.log).lower():
                self._check(result, "pg_ctl start")
        else:
            self._check(result, "pg_ctl start")

    def createdb(self, name: str) -> str:
        createdb = self.bindir / "createdb"
        if not os.access(createdb, os.X_OK):
            createdb = Path(shutil.which("createdb") or "createdb")
        result = subprocess.run(
            [str(createdb), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", name],
            capture_output=True, text=True,
        )  # fmt: skip
        self._check(result, "createdb")
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{name}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run_as_server("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:PORT/cellseg_test`` on a real server started for this session."""
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            f"{', '.join(PG_BIN_GLOBS)}; run scripts/ensure_services.sh"
        )
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
        yield cluster.createdb("cellseg_test")
    finally:
        cluster.stop()


# ------------------------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible endpoint and the (fake) credentials it accepts."""

    url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3/s3fs/DVC at this endpoint's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
        )  # fmt: skip


@pytest.fixture(scope="session")
def s3_endpoint():
    """An in-memory S3 server (moto) on a loopback port; buckets live until the session ends."""
    from moto.server import ThreadedMotoServer

    _bypass_proxy_for_loopback()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Endpoint(url=f"http://{host}:{port}")
    server.stop()
