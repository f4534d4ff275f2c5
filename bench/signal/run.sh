#!/usr/bin/env bash
# Signaling benchmark: Tern's PeerJS endpoint and the `peer` npm server (PeerJS 1.0) in the
# same run, under the same load, each server started fresh for each shape, Tern and `peer`
# alternating. The load client is bench/signal/client (Rust, CLIENT=rust, the default: a few
# microseconds of CPU per message, so the server is what saturates) or load.mjs (CLIENT=node:
# Node `ws` worker processes, as a PeerJS app's clients; it saturates first on 2 cores).
# Shapes:
#   offer:  HELD peers connected (the connect ramp: BATCH at a time), PAIRS sender->receiver
#           pairs with WINDOW OFFERs in flight and BYTES of SDP, answered (the issue's shape);
#   bounce: PEERS peers in pairs bouncing CANDIDATEs, BWINDOW in flight (the original shape);
#   Each of offer and bounce also runs against two Tern nodes sharing one redis-server
#   (TWO_NODE=1, the default; `tern2` in the tables): each pair's sender on node A, its
#   receiver on node B, so every message crosses Redis; Redis CPU per message is reported.
#   idle:   Tern alone holding IDLE peers (spread over processes and 127.0.0.x), for memory
#           per peer at scale (`peer` stops at its concurrent_limit of 5000).
# Reports messages/s, per-second min/max, p50/p99 latency, server CPU (cores, and
# microseconds per message), RSS per connected peer, opens/s, and Tern/peer ratios.
#
# Loopback only; bounded in peers and seconds; only PIDs started here are killed.
# usage: bench/signal/run.sh
#   env: HELD (5000) PAIRS (200) WINDOW (8) BYTES (1000) SECS (15) BATCH (200) PROCS (2)
#        PEERS (2000) BWINDOW (4) IDLE (15000, 0 to skip) ROUNDS (1) CLIENT (rust|node)
#        TWO_NODE (1; 0 to skip the two-node runs; needs redis-server and CLIENT=rust)
#        NICE (0): run servers and client at this nice value, e.g. -10 on a box busy with
#        other work (both servers get the same). With the kernel's autogroups, nice only
#        ranks processes within a session: run as `setsid bench/signal/run.sh` and, as
#        root, the script sets its own autogroup's nice to NICE too (restored at exit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
HELD=${HELD:-5000}
PAIRS=${PAIRS:-200}
WINDOW=${WINDOW:-8}
BYTES=${BYTES:-1000}
SECS=${SECS:-15}
BATCH=${BATCH:-200}
PROCS=${PROCS:-2}
PEERS=${PEERS:-2000}
BWINDOW=${BWINDOW:-4}
IDLE=${IDLE:-15000}
ROUNDS=${ROUNDS:-1}
CLIENT=${CLIENT:-rust}
NICE=${NICE:-0}
TWO_NODE=${TWO_NODE:-1}
OUT="$ROOT/bench/out/signal-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
[ -d tests/browser/node_modules/peer ] || (cd tests/browser && npm ci --no-audit --no-fund)

SERVER_PID=""
EXTRA_PIDS=()
EXTRA_ARGS=()
AUTOGROUP_NICE=""
if [ "$NICE" != 0 ] && [ -w /proc/self/autogroup ]; then
    AUTOGROUP_NICE=$(awk '{print $3}' /proc/self/autogroup)
    echo "$NICE" >/proc/self/autogroup || AUTOGROUP_NICE=""
fi
cleanup() {
    for pid in $SERVER_PID "${EXTRA_PIDS[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    if [ -n "$AUTOGROUP_NICE" ]; then
        echo "$AUTOGROUP_NICE" >/proc/self/autogroup || true
    fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
    for _ in $(seq 1 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2
    return 1
}

echo "==> building tern (release)"
cargo build --release --quiet --bin tern
TERN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tern"
if [ "$CLIENT" = rust ]; then
    echo "==> building the load client (release)"
    cargo build --release --quiet --manifest-path bench/signal/client/Cargo.toml
    LOADER=(nice -n "$NICE" bench/signal/client/target/release/tern-sigload --threads 2 --addrs 4)
else
    LOADER=(nice -n "$NICE" node bench/signal/load.mjs --procs "$PROCS")
fi

start_tern() { # [cluster section] [config name] [relay port base]
    local api turn cfg=${2:-tern} base=${3:-40000}
    api=$(free_port)
    turn=$(free_port)
    cat >"$OUT/$cfg.toml" <<TOML
[turn]
listen = ["127.0.0.1:$turn"]
relay_ip = ["127.0.0.1"]
auth_secrets = ["bench-secret-$RANDOM$RANDOM"]
min_port = $base
max_port = $((base + 999))
[api]
listen = "127.0.0.1:$api"
# The load comes from a few loopback addresses.
max_connections = 40000
max_connections_per_ip = 40000
[signal]
# Same conditions as the peer server, which has no per-connection rate limit.
rate_per_sec = 100000
burst = 100000
peerjs_rate_per_sec = 100000
peerjs_burst = 100000
peerjs_concurrent_limit = 40000
[metrics]
enabled = false
[log]
level = "warn"
${1:-}
TOML
    nice -n "$NICE" "$TERN" serve --config "$OUT/$cfg.toml" 2>>"$OUT/$cfg.log" &
    SERVER_PID=$!
    URL="ws://127.0.0.1:$api/peerjs/peerjs"
    wait_http "http://127.0.0.1:$api/peerjs"
}

# Two nodes and one redis-server (private, free port, no persistence): URL and SERVER_PID
# are node A's; node B and Redis go to the loader as --url2, --pid2, --redis-pid.
start_tern2() {
    local rport rpid
    rport=$(free_port)
    nice -n "$NICE" redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
        >>"$OUT/redis.log" 2>&1 &
    rpid=$!
    EXTRA_PIDS=("$rpid")
    for _ in $(seq 1 100); do
        redis-cli -p "$rport" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    local cluster="[cluster]
redis_url = \"redis://127.0.0.1:$rport\"
lease_secs = 10"
    start_tern "$cluster
node_id = \"bench-b\"" tern-b 41000
    local url2=$URL pid2=$SERVER_PID
    EXTRA_PIDS+=("$pid2")
    start_tern "$cluster
node_id = \"bench-a\"" tern-a 42000
    # Let each node read the other from the registry before peers arrive.
    sleep 2
    EXTRA_ARGS=(--url2 "$url2" --pid2 "$pid2" --redis-pid "$rpid")
}

start_peer() {
    local port
    port=$(free_port)
    nice -n "$NICE" node tests/browser/node_modules/peer/dist/bin/peerjs.js --port "$port" --path /myapp \
        >>"$OUT/peer.log" 2>&1 &
    SERVER_PID=$!
    URL="ws://127.0.0.1:$port/myapp/peerjs"
    wait_http "http://127.0.0.1:$port/myapp"
}

stop_server() {
    for pid in "$SERVER_PID" "${EXTRA_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PID=""
    EXTRA_PIDS=()
    EXTRA_ARGS=()
    sleep 2 # let the sockets of the last run leave TIME_WAIT's way
}

run() { # server shape round args...
    local server=$1 shape=$2 round=$3
    shift 3
    "start_$server"
    echo "==> $server $shape (round $round)"
    "${LOADER[@]}" --url "$URL" --key peerjs --pid "$SERVER_PID" "${EXTRA_ARGS[@]}" "$@" |
        tee "$OUT/$server-$shape-$round.json"
    stop_server
}

SERVERS=(tern peer)
if [ "$TWO_NODE" = 1 ] && [ "$CLIENT" = rust ] && command -v redis-server >/dev/null; then
    SERVERS=(tern tern2 peer)
fi
for round in $(seq 1 "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
        run "$server" offer "$round" --kind offer --peers "$HELD" \
            --batch "$BATCH" --pairs "$PAIRS" --window "$WINDOW" --bytes "$BYTES" --secs "$SECS"
    done
    for server in "${SERVERS[@]}"; do
        run "$server" bounce "$round" --kind bounce --peers "$PEERS" \
            --batch "$BATCH" --window "$BWINDOW" --bytes 60 --secs "$SECS"
    done
done
if [ "$IDLE" -gt 0 ]; then
    # One process holds them all with the Rust client (under this box's 20,000 files); the
    # Node client takes one worker per 5000.
    run tern idle 1 --kind idle --peers "$IDLE" --batch "$BATCH" $([ "$CLIENT" = node ] && echo --procs $(((IDLE + 4999) / 5000)))
fi

node bench/signal/summary.mjs "$OUT" | tee "$OUT/summary.md"
echo "results: $OUT"
