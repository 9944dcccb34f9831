#!/usr/bin/env bash
# Installs the servers the test suite starts itself but pip cannot provide: PostgreSQL (initdb,
# pg_ctl, postgres) for Optuna's RDB storage tests. `mlflow server` and moto come with `.[dev]`.
# Idempotent: does nothing when the binaries are already there (looked up where tests/servers.py
# looks). Without the binaries the PostgreSQL tests skip, and pytest's summary ends with a red "servers"
# section counting them; with CELLSEG_REQUIRE_SERVICES=1 (CI: .ci/run) this script fails instead, and
# so does every server test that cannot run (tests/conftest.py).
set -euo pipefail

have_postgres() {
  local dir
  if command -v pg_ctl >/dev/null 2>&1; then
    dir=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
    [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && return 0
  fi
  for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin /usr/pgsql-*/bin; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && return 0
  done
  return 1
}

warn() {
  if [ "${CELLSEG_REQUIRE_SERVICES:-}" = 1 ]; then
    echo "ensure_services: $*; CELLSEG_REQUIRE_SERVICES=1, so this is an error (the PostgreSQL tests cannot run)" >&2
    exit 1
  fi
  echo "ensure_services: WARNING: $*; the PostgreSQL tests will be SKIPPED (see the end of pytest's summary)" >&2
  exit 0
}

have_postgres && exit 0
command -v apt-get >/dev/null 2>&1 || warn "PostgreSQL not found and no apt-get to install it"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || warn "PostgreSQL not found and not root (no sudo) to install it"
  sudo=(sudo -n)
fi
echo "ensure_services: installing PostgreSQL (apt-get install postgresql)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq || warn "apt-get update failed"
"${sudo[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null || warn "apt-get install postgresql failed"
have_postgres || warn "postgresql installed but initdb/pg_ctl still not found"
