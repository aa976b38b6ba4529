#!/usr/bin/env bash
# Sets up a Debian machine (scripts/setup.sh), builds pgwarden in release mode and runs it.
# Arguments go to `pgwarden-proxy`; default: the example configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p pgwarden-proxy
if [ $# -eq 0 ]; then set -- --config examples/proxy.toml; fi
exec target/release/pgwarden-proxy "$@"
