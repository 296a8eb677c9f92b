#!/usr/bin/env bash
# Profiles zeors under one benchmark workload: perf samples of the server process while
# zeo-bench drives it, a text report of the hottest symbols, and a flamegraph when inferno
# is installed (`cargo install inferno`). Also counts the server's system calls (strace).
#
#   bench/server/profile.sh loads --connections 64 --duration 5
#   bench/server/profile.sh fanout --clients 1000 --rounds 50
#   bench/server/profile.sh commits --writers 8 --duration 5
#
# Needs the release binaries and the generated database (run bench/server/run.sh once).
# Output: bench/out/profile-<timestamp>/{perf.data,report.txt,strace.txt,flamegraph.svg}.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }

target=${CARGO_TARGET_DIR:-target}
zeors=${ZEORS_BIN:-$target/release/zeors}
tool=${ZEO_BENCH_BIN:-$target/release/zeo-bench}
db=$(ls -d bench/out/db-* 2>/dev/null | head -1)
[ -n "$db" ] || { echo "no generated database in bench/out: run bench/server/run.sh first" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf not found (Debian: apt-get install linux-perf)" >&2; exit 1; }

out=bench/out/profile-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
cp "$db/Data.fs" "$db/Data.fs.index" "$out/"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$zeors" serve -a "127.0.0.1:$port" -f "$out/Data.fs" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

# No hardware counters in most VMs: sample the CPU clock.
perf record -e cpu-clock -F 1999 -g -p "$pid" -o "$out/perf.data" 2>"$out/perf.log" &
perf_pid=$!
sleep 0.3
"$tool" "$@" --address "127.0.0.1:$port" --meta "$db/meta.json" --server-pid "$pid" | tee "$out/result.json"
kill -INT $perf_pid; wait $perf_pid 2>/dev/null || true

if command -v strace >/dev/null; then
    timeout -s INT 3 strace -c -f -p "$pid" -o "$out/strace.txt" 2>/dev/null &
    sleep 0.2
    "$tool" "$@" --address "127.0.0.1:$port" --meta "$db/meta.json" >/dev/null
    wait || true
fi

perf report -i "$out/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
    | grep -v '^$' | head -60 > "$out/report.txt"
if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph > "$out/flamegraph.svg"
fi
rm -f "$out/Data.fs" "$out/Data.fs.index"
echo "== $out"; head -25 "$out/report.txt"
[ -f "$out/strace.txt" ] && head -12 "$out/strace.txt"
