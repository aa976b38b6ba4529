#!/usr/bin/env bash
# Sets up a Debian machine (scripts/setup.sh, with the test engines and the browser) and runs every check CI runs: formatting, clippy,
# and the whole test suite against real PostgreSQL 15 nodes the tests start themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --engines --browser --etcd
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
