#!/usr/bin/env bash
# Load: one `ferry serve` on loopback, many concurrent clients for a while.
#
#   benches/load.sh [DATA_DIR]          (default /work/bench-data)
#
# Builds ferry (release), makes the shared images with benches/make_image.py
# (v1, v2, v3: related images of real files, SHARED_GB each; reused when
# DATA_DIR/load-shared has them), starts one server, and runs benches/load.py:
# CLIENTS clients, each with its own local store, for DURATION seconds, mixing
# `ferry stash --remote` and `ferry unstash --remote` of the shared images and
# of distinct ones (fresh content made per stash; unstashed by other clients).
# Every unstash is checked against the source's SHA-256. Reports operations
# per second, p50 / p99 latency per kind and overall, errors, the bytes the
# server moved (its Prometheus metrics) and its peak RSS (VmHWM); then stops
# the server and runs `ferry fsck` on its store.
#
# Environment:
#   DURATION=60      seconds of load
#   CLIENTS=32       concurrent clients
#   SHARED_GB=0.04   size of each shared image (GB)
#   DISTINCT_MB=8    fresh content per distinct image (MiB)
#   RESET=0.1        chance that a client starts an operation on a wiped store
#   MIX=stash_shared=1,stash_distinct=1,unstash_shared=1,unstash_distinct=1
#   FERRY=path       use this ferry binary instead of building one
#   PORT=47453       UDP port of the server (TCP PORT+1: its metrics)
#   KEEP=1           keep DATA_DIR/load-work afterwards
#
# Exits non-zero if any operation failed, returned wrong bytes, or fsck found
# a problem. Results also in DATA_DIR/load-work/load-results.json (moved to
# DATA_DIR/load-results.json).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=$(mkdir -p "${1:-/work/bench-data}" && cd "${1:-/work/bench-data}" && pwd)
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-32}
SHARED_GB=${SHARED_GB:-0.04}
DISTINCT_MB=${DISTINCT_MB:-8}
RESET=${RESET:-0.1}
MIX=${MIX:-stash_shared=1,stash_distinct=1,unstash_shared=1,unstash_distinct=1}
PORT=${PORT:-47453}
METRICS_PORT=$((PORT + 1))
SHARED=$DATA/load-shared
W=$DATA/load-work

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'load.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'printf "load.sh: failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR
command -v python3 >/dev/null || die "python3 is needed"

if [ -z "${FERRY:-}" ]; then
    say "building ferry (cargo build --release -p ferry-cli)"
    (cd "$REPO" && nice cargo build --release -p ferry-cli)
    FERRY=$REPO/target/release/ferry
fi
[ -x "$FERRY" ] || die "no ferry binary at $FERRY"

if [ ! -f "$SHARED/images.json" ] \
    || ! python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["size_gb"] != float(sys.argv[2]))' \
        "$SHARED/images.json" "$SHARED_GB"; then
    say "generating the shared images (${SHARED_GB} GB each) in $SHARED"
    python3 "$HERE/make_image.py" "$SHARED" --size-gb "$SHARED_GB"
fi

rm -rf "$W"
# shellcheck source=benches/server.sh
. "$HERE/server.sh"
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$W/clients" "$W/server/store"; fi
}
trap cleanup EXIT

server_configure "$W" "$PORT" "$METRICS_PORT"
say "starting ferry serve on 127.0.0.1:$PORT (metrics on TCP $METRICS_PORT)"
server_start "$W" || die "no server"
rm -rf "$W/probe"

say "$CLIENTS clients for $DURATION s (load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores)"
status=0
python3 "$HERE/load.py" --ferry "$FERRY" --work "$W" --shared "$SHARED" \
    --server-pid "$SERVER_PID" --metrics "http://127.0.0.1:$METRICS_PORT/metrics" \
    --clients "$CLIENTS" --duration "$DURATION" --distinct-mb "$DISTINCT_MB" \
    --reset "$RESET" --mix "$MIX" || status=$?

say "stopping the server; ferry fsck of its store"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || die "ferry serve exited with status $?; see $W/server/log"
SERVER_PID=
warns=$(grep -c -E ' (WARN|ERROR) ' "$W/server/log" || true)
echo "server log: $warns warnings or errors ($W/server/log)"
"$FERRY" --store "$W/server/store" fsck || { echo "load.sh: fsck found problems" >&2; status=1; }
du -sh "$W/server/store" | awk '{print "server store: " $1}'
[ -f "$W/load-results.json" ] && cp "$W/load-results.json" "$DATA/load-results.json"
exit "$status"
