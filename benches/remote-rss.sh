#!/usr/bin/env bash
# Peak memory of a remote stash and a streaming remote unstash, for a
# 2.5 GB image and for a stream ten times as large: ferry must stream, so
# the two peaks should be about the same.
#
#   benches/remote-rss.sh [DATA_DIR]      (default /work/bench-data)
#
# The large stream is v1 v2 v3 v1 v2 v3 v1 v2 v3 v1 of benches/make_image.py
# concatenated on standard input (25 GB, ~3 GB of distinct content: the
# repeats exercise chunks that occur many times in one stash). Output goes
# to /dev/null, then (empty cache again) into files, which a remote unstash
# writes by offset. Peak RSS from /usr/bin/time; client and server on loopback.
#
# Environment: FERRY=path (else target/release/ferry is built), PORT=47463.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=$(cd "${1:-/work/bench-data}" && pwd)
PORT=${PORT:-47463}
W=$DATA/rss-work
die() { printf 'remote-rss.sh: error: %s\n' "$*" >&2; exit 1; }

[ -x /usr/bin/time ] || die "needs /usr/bin/time (apt-get install time)"
for f in v1 v2 v3; do [ -f "$DATA/$f.tar" ] || die "missing $DATA/$f.tar (run benches/e2e.sh first)"; done
if [ -z "${FERRY:-}" ]; then
    (cd "$REPO" && cargo build --release -p ferry-cli)
    FERRY=$REPO/target/release/ferry
fi

rm -rf "$W"
# shellcheck source=benches/server.sh
. "$HERE/server.sh"
cleanup() {
    server_stop
    rm -rf "$W"
}
trap cleanup EXIT

server_configure "$W" "$PORT"
server_start "$W" || exit 1

big() { for f in v1 v2 v3 v1 v2 v3 v1 v2 v3 v1; do cat "$DATA/$f.tar"; done; }
BIG_BYTES=$(( $(stat -c %s "$DATA/v1.tar") * 4 + $(stat -c %s "$DATA/v2.tar") * 3 + $(stat -c %s "$DATA/v3.tar") * 3 ))

measure() { # label, command...
    local label=$1
    shift
    /usr/bin/time -f "%e %M" -o "$W/$label.time" "$@"
    read -r secs kib <"$W/$label.time"
    printf '%-34s %8.1f s  %6d MiB peak RSS\n' "$label" "$secs" $((kib / 1024))
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
measure "remote stash v1 (2.5 GB file)" "$FERRY" -q --store "$W/builder" stash bench/v1 "$DATA/v1.tar"
measure "remote stash big (25 GB stdin)" bash -c "$(declare -f big); DATA='$DATA' big | '$FERRY' -q --store '$W/builder' stash bench/big -"
measure "remote unstash v1 (2.5 GB)" bash -c "'$FERRY' -q --store '$W/node' unstash bench/v1 - >/dev/null"
rm -rf "$W/node"
measure "remote unstash big (25 GB)" bash -c "'$FERRY' -q --store '$W/node' unstash bench/big - | wc -c >'$W/big.count'"
[ "$(cat "$W/big.count")" = "$BIG_BYTES" ] || die "big: $(cat "$W/big.count") bytes out, expected $BIG_BYTES"
echo "big stream: $BIG_BYTES bytes, all written back"
# Into a file: written by offset as chunks arrive (no reordering buffer).
rm -rf "$W/node"
measure "remote unstash v1 to a file" "$FERRY" -q --store "$W/node" unstash bench/v1 "$W/v1.out"
cmp -s "$W/v1.out" "$DATA/v1.tar" || die "the unstashed v1 file differs from v1.tar"
rm -rf "$W/node" "$W/v1.out"
measure "remote unstash big to a file" "$FERRY" -q --store "$W/node" unstash bench/big "$W/big.out"
[ "$(stat -c %s "$W/big.out")" = "$BIG_BYTES" ] || die "big file: $(stat -c %s "$W/big.out") bytes, expected $BIG_BYTES"
rm -f "$W/big.out"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
