#!/usr/bin/env bash
# Remote stash / unstash over QUIC on loopback, against the status quo.
#
#   benches/remote.sh [DATA_DIR]          (default /work/bench-data)
#
# Uses the same docker-save archives as benches/e2e.sh (benches/make_image.py,
# generated if missing). One run of each, client and server on this machine:
#
#   local cold stash of v1            vs  remote cold stash of v1 (stash + push)
#   remote unstash of v1, empty cache vs  curl of v1.tar.zst (zstd -3) from a
#                                         local nginx | zstd -d > file
#   remote unstash of v2 on a node holding v1: bytes on the wire (client stats)
#                                         vs the stored size of v2's new chunks
#   a second remote unstash of v2 on that node: chunks transferred
#
# Environment:
#   FERRY=path     use this ferry binary instead of building target/release/ferry
#   SIZE_GB=2.5    size of generated images (only when DATA_DIR has none)
#   PORT=47443     UDP port of the server (TCP PORT+1: nginx)
#   KEEP=1         keep DATA_DIR/remote-work afterwards
#   ROUNDS=2       rounds of the two comparisons with the status quo
#   WARM_GIB=N     before every timed command (both contenders alike), touch
#                  N GiB of fresh memory (benches/touch_memory.py): on this
#                  VM the host takes freed guest memory back, and the first
#                  write to it is a host page fault, so a 2.5 GB page-cache
#                  write costs 1 to 10 s of system time depending on what
#                  the host still backs. Touched memory writes at the cost
#                  a machine without a balloon pays. Off by default.
#   PLACEMENT=shared  client and server share every core (the default), or
#                  split: every client command (ferry, curl | zstd) on CPU 0,
#                  ferry serve and nginx on CPU 1 -- the same client core for
#                  both contenders, the server's work on a core of its own
#                  (a stand-in for a server on another host); results then go
#                  to DATA_DIR/remote-split-results.json
#
# The two comparisons with the status quo run ROUNDS times (default 2), the
# contenders alternating (A B B A ...), and the best time of each counts:
# on this VM, page-cache writes cost what the host makes them cost (freed
# guest memory is handed back to the host and is slow to touch again), and
# a single run of each can land either one on the slow side. The client
# command's user and system CPU of every round are printed too: the system
# time is where that cost shows.
#
# Writes DATA_DIR/remote-results.json and prints a table with the ratios the
# targets in issue 4 name. Every input is read once untimed first (the page
# cache cannot be dropped here): all runs read warm; and `sync` runs before
# each timed command, so none pays for the previous one's writeback. The machine may be shared:
# the load average at start and end is recorded.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=$(mkdir -p "${1:-/work/bench-data}" && cd "${1:-/work/bench-data}" && pwd)
PORT=${PORT:-47443}
ROUNDS=${ROUNDS:-2}
HTTP_PORT=$((PORT + 1))
W=$DATA/remote-work
PLACEMENT=${PLACEMENT:-shared}
CLIENT=() SERVER_CPU= NGINX_PIN=() RESULTS=remote-results.json
case $PLACEMENT in
shared) ;;
split)
    (($(nproc) >= 2)) || { echo "remote.sh: PLACEMENT=split needs two CPUs" >&2; exit 1; }
    CLIENT=(taskset -c 0) SERVER_CPU=1 NGINX_PIN=(taskset -c 1) RESULTS=remote-split-results.json
    ;;
*) echo "remote.sh: PLACEMENT must be shared or split, not $PLACEMENT" >&2; exit 1 ;;
esac

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'remote.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'printf "remote.sh: failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# --- tools -------------------------------------------------------------------
need=()
command -v zstd >/dev/null || need+=(zstd)
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/bin/time ] || need+=(time)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    say "installing ${need[*]}"
    SUDO=
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${FERRY:-}" ]; then
    say "building ferry (cargo build --release -p ferry-cli)"
    (cd "$REPO" && cargo build --release -p ferry-cli)
    FERRY=$REPO/target/release/ferry
fi
[ -x "$FERRY" ] || die "no ferry binary at $FERRY"
"$FERRY" serve --help >/dev/null 2>&1 || die "$FERRY has no 'serve' command"

# --- data --------------------------------------------------------------------
if [ ! -f "$DATA/images.json" ]; then
    say "generating images (${SIZE_GB:-2.5} GB) in $DATA"
    python3 "$HERE/make_image.py" "$DATA" --size-gb "${SIZE_GB:-2.5}"
fi
V1=$DATA/v1.tar V2=$DATA/v2.tar
for f in "$V1" "$V2"; do [ -f "$f" ] || die "missing $f (delete $DATA/images.json to regenerate)"; done

rm -rf "$W"
mkdir -p "$W"
RES=$W/results.tsv
: >"$RES"
rec() { printf '%s\t%s\n' "$1" "$2" >>"$RES"; }
timed() {
    local key=$1
    shift
    # Each timed command starts with no dirty pages left by the one before:
    # otherwise it pays for their writeback (sync is outside the timing).
    sync
    if [ "${WARM_GIB:-0}" != 0 ]; then python3 "$HERE/touch_memory.py" "$WARM_GIB"; fi
    /usr/bin/time -f '%e %M %U %S' -o "$W/$key.time" "${CLIENT[@]}" "$@"
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
rec loadavg_start "$(loadavg)"

# shellcheck source=benches/server.sh
. "$HERE/server.sh"
NGINX_PID=
cleanup() {
    server_stop
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$W/stores" "$W/www" "$W/out" "$W/server/store"; fi
}
trap cleanup EXIT

say "warming the page cache"
cat "$V1" "$V2" >/dev/null

# --- server ------------------------------------------------------------------
mkdir -p "$W/stores" "$W/out"
server_configure "$W" "$PORT"
say "starting ferry serve on 127.0.0.1:$PORT"
server_start "$W" "$SERVER_CPU" || die "no server"

# --- stash -------------------------------------------------------------------
local_cold() {
    say "round $1: local cold stash of v1"
    rm -rf "$W/stores/local"
    timed "local_cold_$1" "$FERRY" --json --store "$W/stores/local" stash bench/v1 "$V1" --remote "" >"$W/local_cold_$1.json"
}
remote_cold() {
    say "round $1: remote cold stash of v1 (local stash into an empty cache, then push to an empty server)"
    server_stop
    rm -rf "$W/server/store" "$W/stores/builder"
    server_start "$W" "$SERVER_CPU" || die "no server"
    timed "remote_cold_$1" "$FERRY" --json --store "$W/stores/builder" stash bench/v1 "$V1" >"$W/remote_cold_$1.json"
}
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then local_cold "$r"; remote_cold "$r"; else remote_cold "$r"; local_cold "$r"; fi
done
rm -rf "$W/stores/local"

say "remote stash of v2 from the same builder"
timed remote_v2 "$FERRY" --json --store "$W/stores/builder" stash bench/v2 "$V2" >"$W/remote_v2.json"

# --- unstash -----------------------------------------------------------------
say "status quo: zstd -3 file over HTTP from nginx"
mkdir -p "$W/www" "$W/nginx"
zstd -q -3 -T0 -f "$V1" -o "$W/www/v1.tar.zst"
rec zstd3_bytes "$(stat -c %s "$W/www/v1.tar.zst")"
cat >"$W/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
user root root;
events { worker_connections 64; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    server {
        listen 127.0.0.1:$HTTP_PORT;
        root $W/www;
    }
}
EOF
"${NGINX_PIN[@]}" "$NGINX" -c "$W/nginx/nginx.conf" -p "$W/nginx" &
NGINX_PID=$!
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/v1.tar.zst" -r 0-0 && break; sleep 0.1; done
cat "$W/www/v1.tar.zst" >/dev/null

unstash_cold() {
    say "round $1: remote unstash of v1 into an empty cache"
    rm -rf "$W/stores/node"
    timed "unstash_cold_$1" "$FERRY" --json --store "$W/stores/node" unstash bench/v1 "$W/out/v1.tar" >"$W/unstash_cold_$1.json"
    cmp -s "$W/out/v1.tar" "$V1" || die "remote unstash of v1 is not byte-exact"
    rm -f "$W/out/v1.tar"
}
curl_zstd() {
    say "round $1: status quo, curl | zstd -d"
    timed "curl_zstd_$1" bash -c "curl -sf http://127.0.0.1:$HTTP_PORT/v1.tar.zst | zstd -q -d -o '$W/out/v1-http.tar'"
    cmp -s "$W/out/v1-http.tar" "$V1" || die "curl | zstd -d is not byte-exact"
    rm -f "$W/out/v1-http.tar"
}
# The last round ends with an unstash: the node then holds v1 for the next step.
for r in $(seq "$ROUNDS"); do
    if (((ROUNDS - r) % 2)); then unstash_cold "$r"; curl_zstd "$r"; else curl_zstd "$r"; unstash_cold "$r"; fi
done

say "remote unstash of v2 on the node that holds v1"
timed unstash_v2 "$FERRY" --json --store "$W/stores/node" unstash bench/v2 "$W/out/v2.tar" >"$W/unstash_v2.json"
cmp -s "$W/out/v2.tar" "$V2" || die "remote unstash of v2 is not byte-exact"
rm -f "$W/out/v2.tar"

say "second remote unstash of v2 on the same node"
timed unstash_again "$FERRY" --json --store "$W/stores/node" unstash bench/v2 "$W/out/v2.tar" >"$W/unstash_again.json"
rm -f "$W/out/v2.tar"

rec loadavg_end "$(loadavg)"

# --- report ------------------------------------------------------------------
W=$W DATA=$DATA ROUNDS=$ROUNDS PLACEMENT=$PLACEMENT RESULTS=$RESULTS WARM_GIB=${WARM_GIB:-0} python3 - <<'PY'
import json, os

W, DATA = os.environ["W"], os.environ["DATA"]

def docs(path):
    """The JSON documents a command printed, in order."""
    text, out, dec, i = open(path).read(), [], json.JSONDecoder(), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        doc, i = dec.raw_decode(text, i)
        out.append(doc)

def secs(key):
    return float(open(f"{W}/{key}.time").read().split()[0])

def rss_mib(key):
    return int(open(f"{W}/{key}.time").read().split()[1]) / 1024

def cpu(key):
    """User and system CPU seconds of the timed client command."""
    user, system = open(f"{W}/{key}.time").read().split()[2:4]
    return float(user), float(system)

tsv = dict(l.rstrip("\n").split("\t", 1) for l in open(f"{W}/results.tsv"))
v1 = os.path.getsize(f"{DATA}/v1.tar")
rounds = int(os.environ["ROUNDS"])
paired = ["local_cold", "remote_cold", "unstash_cold", "curl_zstd"]
times = {k: [secs(f"{k}_{r}") for r in range(1, rounds + 1)] for k in paired}
# The best round of each contender counts (see the header).
best = {k: 1 + min(range(rounds), key=lambda i: times[k][i]) for k in paired}
local = docs(f"{W}/local_cold_{best['local_cold']}.json")[0]
cold_stash, cold_push = docs(f"{W}/remote_cold_{best['remote_cold']}.json")
v2_stash, v2_push = docs(f"{W}/remote_v2.json")
# A remote unstash prints one document; its transfer statistics are under
# "transfer" (the pull and the restore overlap: there is no separate time).
cold_unstash = docs(f"{W}/unstash_cold_{best['unstash_cold']}.json")[0]
cold_pull = {"stats": cold_unstash["transfer"]}
v2_pull = {"stats": docs(f"{W}/unstash_v2.json")[0]["transfer"]}
again_pull = {"stats": docs(f"{W}/unstash_again.json")[0]["transfer"]}

t = {k: secs(f"{k}_{best[k]}") if k in best else secs(k)
     for k in ["local_cold", "remote_cold", "remote_v2", "unstash_cold",
               "curl_zstd", "unstash_v2", "unstash_again"]}
v2_new_stored = v2_stash["stored_bytes"]
wire_v2 = v2_pull["stats"]["wire_bytes_received"] + v2_pull["stats"]["wire_bytes_sent"]
limit_v2 = 1.05 * v2_new_stored + (1 << 20)
res = {
    "env": {"loadavg_start": tsv["loadavg_start"], "loadavg_end": tsv["loadavg_end"],
            "nproc": os.cpu_count(), "placement": os.environ["PLACEMENT"],
            "warm_gib": float(os.environ["WARM_GIB"])},
    "v1_bytes": v1,
    "seconds": t,
    "rounds": times,
    # Client command only (ferry serve and nginx are not in it).
    "rounds_user_sys_cpu": {k: [cpu(f"{k}_{r}") for r in range(1, rounds + 1)] for k in paired},
    "peak_rss_mib": {k: rss_mib(f"{k}_{best[k]}" if k in best else k) for k in t},
    "local_cold_stash_mb_s": v1 / t["local_cold"] / 1e6,
    "remote_cold_stash_mb_s": v1 / t["remote_cold"] / 1e6,
    "remote_vs_local_stash_throughput": t["local_cold"] / t["remote_cold"],
    "push_v1": cold_push["stats"],
    "pull_v1": cold_pull["stats"],
    "unstash_v1_seconds": cold_unstash["seconds"],
    "zstd3_bytes": int(tsv["zstd3_bytes"]),
    "remote_unstash_vs_curl_zstd_time": t["unstash_cold"] / t["curl_zstd"],
    "v2_new_chunks_stored_bytes": v2_new_stored,
    "push_v2": v2_push["stats"],
    "pull_v2": v2_pull["stats"],
    "v2_wire_bytes": wire_v2,
    "v2_wire_limit": limit_v2,
    "v2_wire_vs_limit": wire_v2 / limit_v2,
    "second_unstash_chunks_received": again_pull["stats"]["chunks_received"],
    "second_unstash_wire_bytes": again_pull["stats"]["wire_bytes_received"]
                                 + again_pull["stats"]["wire_bytes_sent"],
}
json.dump(res, open(f"{DATA}/{os.environ['RESULTS']}", "w"), indent=1)

mb = lambda b: f"{b / 2**20:.1f} MiB"
rows = [
    ("local cold stash v1", f"{t['local_cold']:.2f} s", f"{res['local_cold_stash_mb_s']:.0f} MB/s"),
    ("remote cold stash v1 (stash + push)", f"{t['remote_cold']:.2f} s",
     f"{res['remote_cold_stash_mb_s']:.0f} MB/s"),
    ("  of which push", f"{cold_push['stats']['seconds']:.2f} s",
     f"{mb(cold_push['stats']['bytes_sent'])} of chunks, {mb(cold_push['stats']['wire_bytes_sent'])} on the wire"),
    ("remote unstash v1, empty cache", f"{t['unstash_cold']:.2f} s",
     f"streaming: {mb(cold_pull['stats']['bytes_received'])} of chunks fetched while writing"),
    ("curl (nginx, zstd -3) | zstd -d", f"{t['curl_zstd']:.2f} s", mb(res["zstd3_bytes"])),
    ("remote unstash v2 on a node with v1", f"{t['unstash_v2']:.2f} s",
     f"{v2_pull['stats']['chunks_received']} chunks, {mb(wire_v2)} on the wire"),
    ("second remote unstash of v2", f"{t['unstash_again']:.2f} s",
     f"{res['second_unstash_chunks_received']} chunks, {res['second_unstash_wire_bytes']} B on the wire"),
]
w = max(len(r[0]) for r in rows)
print()
for a, b, c in rows:
    print(f"{a:<{w}}  {b:>9}  {c}")
print("\nevery round, s (the best counts): " + "; ".join(
    f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in times.items()))
# System time is where this VM's page-cache cost shows (see the header).
print("client CPU user+sys, s: " + "; ".join(
    f"{k} " + " ".join(f"{u:.1f}+{y:.1f}" for u, y in v)
    for k, v in res["rounds_user_sys_cpu"].items()))
print()
checks = [
    ("remote cold stash >= 0.7x local throughput", res["remote_vs_local_stash_throughput"], ">= 0.7",
     res["remote_vs_local_stash_throughput"] >= 0.7),
    ("remote unstash v1 faster than curl | zstd -d", res["remote_unstash_vs_curl_zstd_time"], "< 1.0 (time ratio)",
     res["remote_unstash_vs_curl_zstd_time"] < 1.0),
    ("v2 wire bytes <= 1.05x new stored + 1 MiB", res["v2_wire_vs_limit"], "<= 1.0",
     res["v2_wire_vs_limit"] <= 1.0),
    ("second unstash transfers no chunk", res["second_unstash_chunks_received"], "== 0",
     res["second_unstash_chunks_received"] == 0),
]
for what, v, target, ok in checks:
    print(f"{'PASS' if ok else 'MISS'}  {what}: {v:.3f} (target {target})" if isinstance(v, float)
          else f"{'PASS' if ok else 'MISS'}  {what}: {v} (target {target})")
print(f"\nload average {res['env']['loadavg_start']} -> {res['env']['loadavg_end']} "
      f"on {res['env']['nproc']} cores, placement {os.environ['PLACEMENT']}, "
      f"memory touched before each command: {res['env']['warm_gib']:g} GiB; "
      f"results in {DATA}/{os.environ['RESULTS']}")
PY
