#!/usr/bin/env bash
# Installs what pgwarden needs on a Debian machine, only what is missing (idempotent):
# PostgreSQL 15 server and clients (psql, pgbench, pg_basebackup), psycopg 3 (a libpq 17+
# client for the tests) and the `postgres` OS user that nodes run as when pgwarden runs as root.
# With --bench, also PgBouncer and HAProxy.
set -euo pipefail

want=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || want+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/psql ] || want+=(postgresql-client-15)
command -v openssl >/dev/null || want+=(openssl)
if [ "${1:-}" = "--bench" ]; then
  command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || want+=(pgbouncer)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
fi

if [ ${#want[@]} -gt 0 ]; then
  echo "setup: installing ${want[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${want[@]}" >/dev/null
fi

# A libpq 17+ client for the tests (psycopg 3's binary wheel bundles a recent libpq).
if command -v python3 >/dev/null && ! python3 -c 'import psycopg' 2>/dev/null; then
  echo "setup: installing psycopg (PyPI) for the tests' libpq 17+ client"
  python3 -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.2'
fi

if [ "$(id -u)" = 0 ] && ! id -u "${PGWARDEN_NODE_USER:-postgres}" >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash "${PGWARDEN_NODE_USER:-postgres}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: a Rust toolchain (cargo, Rust 1.80 or newer) is required: https://rustup.rs" >&2
  exit 1
fi
