#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests, then the interop suite that drives the
# zeors binary with the real Python ZODB/ZEO from PyPI (installed into ./.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv.sh
source scripts/venv-zrs.sh
# PostgreSQL's server programs, for the tests that start throwaway clusters.
source scripts/postgres.sh

export ZEORS_PYTHON="$PWD/$VENV/bin/python"

echo "== cargo build"
cargo build --workspace --quiet
echo "== cargo test"
cargo test --workspace --quiet
echo "== interop tests (Python ZODB/ZEO against target/debug/zeors)"
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
ZEORS_BIN="$TARGET_DIR/debug/zeors" "$VENV/bin/python" -m pytest -q -p no:cacheprovider interop "$@"
