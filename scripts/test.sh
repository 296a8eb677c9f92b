#!/usr/bin/env bash
# Runs every test: first the lint gate (rustfmt, clippy with warnings as errors), then
# Rust unit and integration tests, then the interop suite that drives the zeors binary
# with the real Python ZODB/ZEO from PyPI (installed into ./.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

# The gate comes first and is cheap (clippy only checks, no codegen): a formatting slip
# or a lint stops the run in a minute instead of after the whole suite.
echo "== cargo fmt --check"
if ! cargo fmt --all --check; then
    echo "test.sh: code is not formatted; run \`cargo fmt --all\` and commit the result" >&2
    exit 1
fi
echo "== cargo clippy"
if ! cargo clippy --workspace --all-targets --quiet -- -D warnings; then
    echo "test.sh: clippy reported the problems above (warnings are errors)" >&2
    exit 1
fi

source scripts/venv.sh
source scripts/venv-zrs.sh
# PostgreSQL's server programs, for the tests that start throwaway clusters.
source scripts/postgres.sh

export ZEORS_PYTHON="$PWD/$VENV/bin/python"
# Property tests draw their cases from a fixed seed here, so that the same commit gives the
# same run; `PROPTEST_RNG_SEED=random scripts/test.sh` (or any number) explores others.
if [ "${PROPTEST_RNG_SEED:-}" = random ]; then
    unset PROPTEST_RNG_SEED
else
    export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261205}"
fi

echo "== cargo build"
cargo build --workspace --quiet
echo "== cargo test"
cargo test --workspace --quiet
echo "== interop tests (Python ZODB/ZEO against target/debug/zeors)"
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
ZEORS_BIN="$TARGET_DIR/debug/zeors" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o tmp_path_retention_policy=failed interop "$@"
