#!/usr/bin/env bash
# Garbage collection at scale and beside stashes.
#
#   benches/gc.sh [DATA_DIR]     (default /work/bench-data; uses its v1.tar/v2.tar
#                                 from benches/make_image.py when present)
#
# 1. A synthetic store of 1,000,000 chunks (store/examples/synth_store.rs):
#    time and peak RSS of `ferry gc` (retention removing half the names,
#    then the deleting pass) and of `ferry fsck`.
# 2. Stash throughput with `ferry gc` running in a loop on the same store,
#    against the same stash without it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=${1:-/work/bench-data}
W=$(mktemp -d /tmp/ferry-gc-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time; }

cargo build --release -q -p ferry-cli -p ferry-store --example synth_store --manifest-path "$REPO/Cargo.toml"
F=${FERRY:-$REPO/target/release/ferry}
SYNTH=$REPO/target/release/examples/synth_store

measure() { # label, command...
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$W/t" "$@" >/dev/null
    read -r secs kb <"$W/t"
    printf '%-44s %8.2f s %8d MiB peak RSS\n' "$label" "$secs" $((kb / 1024))
}

echo "== 1,000,000 chunks"
"$SYNTH" "$W/big" 1000000 100 >/dev/null
measure "gc --dry-run (retention: keep 50 of 100)" "$F" --store "$W/big" gc --prefix synth --keep-last 50 --dry-run
measure "gc (retention, condemn, repack)" "$F" --store "$W/big" gc --prefix synth --keep-last 50 --grace 0
measure "gc (delete)" "$F" --store "$W/big" gc --grace 0
measure "fsck" "$F" --store "$W/big" fsck

if [ -f "$DATA/v1.tar" ] && [ -f "$DATA/v2.tar" ]; then
    echo "== stash throughput beside a gc loop: v1 again and v2, into a store holding v1 and dead data"
    cat "$DATA/v1.tar" "$DATA/v2.tar" >/dev/null
    for mode in alone with-gc alone with-gc; do
        rm -rf "$W/s" && "$F" --store "$W/s" -q stash base "$DATA/v1.tar"
        # Dead data for the collector to chew on while the stash runs.
        "$F" --store "$W/s" -q stash junk "$DATA/v2.tar" && "$F" --store "$W/s" -q rm junk
        loop=
        if [ "$mode" = with-gc ]; then
            (while :; do "$F" --store "$W/s" -q gc --grace 0 || exit 1; done) &
            loop=$!
        fi
        start=$(date +%s.%N)
        "$F" --store "$W/s" -q stash again "$DATA/v1.tar"
        "$F" --store "$W/s" -q stash v2 "$DATA/v2.tar"
        end=$(date +%s.%N)
        [ -n "$loop" ] && kill "$loop" && wait "$loop" 2>/dev/null || true
        bytes=$(( $(stat -c %s "$DATA/v1.tar") + $(stat -c %s "$DATA/v2.tar") ))
        python3 -c "import sys; b,s,e,m=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),sys.argv[4]; print(f'stash v1+v2 {m:<8} {e-s:7.2f} s  {b/(e-s)/1e6:6.0f} MB/s')" "$bytes" "$start" "$end" "$mode"
        "$F" --store "$W/s" fsck >/dev/null
    done
fi
