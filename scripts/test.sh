#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests, then the interop suite that drives the
# zeors binary with the real Python ZODB/ZEO from PyPI (installed into ./.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
REQS=interop/requirements.txt
STAMP=$VENV/.requirements.sha

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "== installing Python test dependencies"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" > "$STAMP"
fi

export ZEORS_PYTHON="$PWD/$VENV/bin/python"

echo "== cargo build"
cargo build --workspace --quiet
echo "== cargo test"
cargo test --workspace --quiet
echo "== interop tests (Python ZODB/ZEO against target/debug/zeors)"
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
ZEORS_BIN="$TARGET_DIR/debug/zeors" "$VENV/bin/python" -m pytest -q -p no:cacheprovider interop "$@"
