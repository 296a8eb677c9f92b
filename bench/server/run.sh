#!/usr/bin/env bash
# The server benchmark suite: zeors against the stock Python ZEO server (runzeo), side by
# side on this machine, loopback only. One command, bounded in time:
#
#   bench/server/run.sh            # --quick: every workload once, a few minutes
#   bench/server/run.sh --full     # three repetitions, medians, about half an hour
#
#   bench/server/run.sh --parts postgresql   # one part alone (servers, proxies, postgresql, replication)
#
# Extra arguments go to bench.py (see `bench/server/run.sh --help`). Writes
# bench/out/<timestamp>.json and updates bench/server/latest.md, latest.svg and the README's
# Benchmarks block. The Python side (runzeo, ClientStorage) comes from ./.venv, installed
# from interop/requirements.txt as scripts/test.sh does; the postgresql part's server
# programs from scripts/postgres.sh (which installs Debian's package when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=quick
limit=900
args=()
parts=servers,proxies,postgresql,replication
prev=
for a in "$@"; do
    case "$a" in
        --quick) mode=quick; limit=900 ;;
        --full) mode=full; limit=2700 ;;
        --parts=*) parts=${a#--parts=}; args+=("$a") ;;
        *) args+=("$a"); [ "$prev" = --parts ] && parts=$a ;;
    esac
    prev=$a
done

source scripts/venv.sh
case ",$parts," in
    *,postgresql,*) source scripts/postgres.sh ;;
esac

echo "== cargo build --release (zeors, zeo-bench)"
cargo build --release --quiet -p zeors -p zeo-bench

# Many idle clients need file descriptors on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== benchmark ($mode, at most ${limit}s)"
exec timeout --signal=INT --kill-after=30 "$limit" \
    "$VENV/bin/python" bench/server/bench.py --mode "$mode" ${args[@]+"${args[@]}"}
