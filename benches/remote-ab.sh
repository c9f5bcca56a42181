#!/usr/bin/env bash
# Two ferry binaries, alternating, on the same remote unstashes: a quick A/B
# of a client-side change (the server is A's, and stays up throughout).
#
#   benches/remote-ab.sh A_BINARY B_BINARY [DATA_DIR]   (default /work/bench-data)
#
# Each round: an unstash of v1 into a file from an empty node cache, then
# of v2 into a file on that node (which then holds v1: most chunks are read
# from its packs). Both outputs are compared with the originals. Rounds run
# in the order ORDER gives (default "a b b a a b b a": each binary goes
# first as often as second). Prints elapsed s, peak RSS KiB, user and
# system s of each command (`/usr/bin/time`). PORT=47543 (UDP). WARM_GIB=N
# touches N GiB of fresh memory before each command (see remote.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
DATA=$(cd "${3:-/work/bench-data}" && pwd)
W=$DATA/ab-work
for f in v1 v2; do [ -f "$DATA/$f.tar" ] || { echo "missing $DATA/$f.tar (run benches/remote.sh first)" >&2; exit 1; }; done

rm -rf "$W"
mkdir -p "$W/out"
FERRY=$A
# shellcheck source=benches/server.sh
. "$HERE/server.sh"
trap 'server_stop; rm -rf "$W"' EXIT
server_configure "$W" "${PORT:-47543}"
server_start "$W"
for v in v1 v2; do "$FERRY" -q --store "$W/builder" stash "bench/$v" "$DATA/$v.tar"; done
cat "$DATA/v1.tar" "$DATA/v2.tar" >/dev/null

warm() { if [ "${WARM_GIB:-0}" != 0 ]; then python3 "$HERE/touch_memory.py" "$WARM_GIB"; fi; }

echo "binary  v1 into an empty cache: s KiB user sys   v2 on a node with v1: s KiB user sys"
for which in ${ORDER:-a b b a a b b a}; do
    case $which in a) bin=$A ;; b) bin=$B ;; *) echo "ORDER: a or b, not $which" >&2; exit 2 ;; esac
    rm -rf "$W/node" "$W/out"/*
    sync
    warm
    /usr/bin/time -f '%e %M %U %S' -o "$W/t1" "$bin" -q --store "$W/node" unstash bench/v1 "$W/out/v1.tar"
    cmp "$W/out/v1.tar" "$DATA/v1.tar"
    sync
    warm
    /usr/bin/time -f '%e %M %U %S' -o "$W/t2" "$bin" -q --store "$W/node" unstash bench/v2 "$W/out/v2.tar"
    cmp "$W/out/v2.tar" "$DATA/v2.tar"
    echo "$which       $(cat "$W/t1")          $(cat "$W/t2")"
done
