# Sourced by the remote benchmarks: one `ferry serve` on 127.0.0.1 with a
# read-write token, its files in DIR/server, and the client environment
# (FERRY_REMOTE, FERRY_TOKEN_FILE, FERRY_SERVER_CERT) pointing at it.
#
#   server_configure DIR PORT [METRICS_PORT]
#                               token in DIR/token, config in DIR/server
#                               (metrics over HTTP on METRICS_PORT if given)
#   server_start DIR [CPU]      starts it (pinned to CPU with taskset if
#                               given), waits until it answers; SERVER_PID
#   server_stop                 stops it (SIGTERM) and waits
#
# Needs FERRY (the binary) and python3.

server_configure() {
    local dir=$1 port=$2 metrics= hash
    if [ -n "${3:-}" ]; then metrics="metrics_listen = \"127.0.0.1:$3\""; fi
    mkdir -p "$dir/server"
    "$FERRY" -q serve --new-token "$dir/token" >/dev/null
    hash=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1]).read().strip().encode()).hexdigest())' "$dir/token")
    cat >"$dir/server/ferry.toml" <<TOML
listen = "127.0.0.1:$port"
store = "store"
cert = "cert.pem"
key = "key.pem"
$metrics
[[token]]
name = "bench"
sha256 = "$hash"
read = ["*"]
write = ["*"]
TOML
    export FERRY_REMOTE=quic://127.0.0.1:$port FERRY_TOKEN_FILE=$dir/token \
        FERRY_SERVER_CERT=$dir/server/cert.pem
}

SERVER_PID=
server_start() {
    local dir=$1 cpu=${2:-}
    if [ -n "$cpu" ]; then
        taskset -c "$cpu" "$FERRY" serve --config "$dir/server/ferry.toml" 2>>"$dir/server/log" &
    else
        "$FERRY" serve --config "$dir/server/ferry.toml" 2>>"$dir/server/log" &
    fi
    SERVER_PID=$!
    local _
    for _ in $(seq 100); do
        "$FERRY" --store "$dir/probe" ls >/dev/null 2>&1 && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break # it exited (port taken?)
        sleep 0.1
    done
    echo "the server did not come up; see $dir/server/log" >&2
    return 1
}

server_stop() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
