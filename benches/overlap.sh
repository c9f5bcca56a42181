#!/usr/bin/env bash
# Remote cold stash with the upload overlapping the stash, against a ferry
# that uploads only after its stash (the baseline), on the same data in one
# run.
#
#   benches/overlap.sh [DATA_DIR]          (default /work/bench-data)
#
# Two placements, ROUNDS runs each (default 2), the binaries alternating:
#   shared  client and server share both cores (as in benches/remote.sh);
#   split   client on CPU 0, server on CPU 1 (taskset): the server takes no
#           CPU from the client, as when it runs on a machine of its own.
# Each run: a fresh server store and client store, then
# `ferry stash bench/v1 v1.tar` with --remote, timed (sync before). The
# server of each run is the same binary as its client, so the ratio covers
# server-side changes between the two versions too.
#
# Environment:
#   FERRY=path       the ferry to test (default: build target/release/ferry)
#   BASELINE=path    the baseline ferry; default: built from BASELINE_REV
#                    (default 3482e38~1, the last commit without early
#                    uploads) in a git worktree under DATA_DIR
#   ROUNDS=2  PORT=47453
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=$(mkdir -p "${1:-/work/bench-data}" && cd "${1:-/work/bench-data}" && pwd)
PORT=${PORT:-47453}
ROUNDS=${ROUNDS:-2}
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "overlap.sh: ROUNDS must be 1 or more" >&2; exit 1; }
W=$DATA/overlap-work
die() { printf 'overlap.sh: error: %s\n' "$*" >&2; exit 1; }

command -v taskset >/dev/null || die "needs taskset (util-linux)"
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs for the split placement"
[ -f "$DATA/v1.tar" ] || python3 "$HERE/make_image.py" "$DATA" --size-gb "${SIZE_GB:-2.5}"

if [ -z "${FERRY:-}" ]; then
    (cd "$REPO" && cargo build --release -p ferry-cli)
    FERRY=$REPO/target/release/ferry
fi
if [ -z "${BASELINE:-}" ]; then
    rev=${BASELINE_REV:-3482e38~1}
    base=$DATA/overlap-baseline
    if [ ! -d "$base" ]; then
        git -C "$REPO" worktree add --detach "$base" "$rev"
    fi
    (cd "$base" && git checkout -q --detach "$rev" && cargo build --release -p ferry-cli)
    BASELINE=$base/target/release/ferry
fi
NEW=$FERRY

rm -rf "$W"
mkdir -p "$W"
# shellcheck source=benches/server.sh
. "$HERE/server.sh"
trap 'server_stop' EXIT
server_configure "$W" "$PORT"
cat "$DATA/v1.tar" >/dev/null # warm: every run reads from the page cache

run() { # label binary placement
    local label=$1 bin=$2 placement=$3 client_cpu= server_cpu=
    if [ "$placement" = split ]; then client_cpu="taskset -c 0" server_cpu=1; fi
    FERRY=$bin
    server_stop
    rm -rf "$W/server/store" "$W/client"
    server_start "$W" $server_cpu
    sync
    /usr/bin/time -f '%e' -o "$W/time" $client_cpu "$bin" --json --store "$W/client" \
        stash bench/v1 "$DATA/v1.tar" >"$W/out.json"
    python3 - "$label" "$placement" "$(cat "$W/time")" "$W/out.json" >>"$W/runs.tsv" <<'PY'
import json, sys
label, placement, wall, path = sys.argv[1:]
text, dec, docs, i = open(path).read(), json.JSONDecoder(), [], 0
while i < len(text):
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text):
        d, i = dec.raw_decode(text, i)
        docs.append(d)
stash, push = docs
print(f"{label}\t{placement}\t{wall}\t{stash['seconds']:.2f}\t{push['stats']['seconds']:.2f}")
PY
    tail -1 "$W/runs.tsv"
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$W/runs.tsv"
for placement in shared split; do
    for _ in $(seq "$ROUNDS"); do
        run baseline "$BASELINE" "$placement"
        run overlap "$NEW" "$placement"
    done
done
server_stop
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$W/runs.tsv" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"\n{'placement':9} {'ferry':9} {'wall s':>7} {'stash s':>8} {'push after s':>13}   (medians)")
for placement in ["shared", "split"]:
    wall = {}
    for label in ["baseline", "overlap"]:
        r = [x for x in rows if x[0] == label and x[1] == placement]
        med = [statistics.median(float(x[i]) for x in r) for i in (2, 3, 4)]
        wall[label] = med[0]
        print(f"{placement:9} {label:9} {med[0]:7.2f} {med[1]:8.2f} {med[2]:13.2f}")
    print(f"{placement:9} overlap / baseline wall time: {wall['overlap'] / wall['baseline']:.3f}")
PY
