#!/usr/bin/env bash
# Sets up a Debian machine (scripts/setup.sh), builds pgwarden in release mode and runs
# `pgwarden up`: control API on 127.0.0.1:9180, two proxies on 127.0.0.1:6432, one database.
# Arguments go to `pgwarden up` (e.g. --plan postgresql-sandbox --name shop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --workspace --bins
exec target/release/pgwarden up "$@"
