#!/usr/bin/env bash
# Signaling benchmark: Tern's PeerJS endpoint and the `peer` npm server (PeerJS 1.0), one
# after the other in the same run, under the same load (bench/signal/load.mjs: N WebSocket
# peers in pairs bouncing CANDIDATE messages). Reports connections held, messages/s, RSS of
# each server and the Tern/peer ratios.
#
# Loopback only; bounded in peers (<= 5000) and seconds; only PIDs started here are killed.
# usage: bench/signal/run.sh        env: PEERS (2000) SECS (15) WINDOW (4)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PEERS=${PEERS:-2000}
SECS=${SECS:-15}
WINDOW=${WINDOW:-4}
OUT="$ROOT/bench/out/signal-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
[ -d tests/browser/node_modules/peer ] || (cd tests/browser && npm ci --no-audit --no-fund)

PIDS=()
cleanup() {
    for pid in "${PIDS[@]-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
    for _ in $(seq 1 100); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2
    return 1
}

echo "==> building tern (release)"
cargo build --release --quiet --bin tern
TERN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tern"

TURN_PORT=$(free_port)
API_PORT=$(free_port)
PEER_PORT=$(free_port)
cat >"$OUT/tern.toml" <<TOML
[turn]
listen = ["127.0.0.1:$TURN_PORT"]
relay_ip = ["127.0.0.1"]
auth_secrets = ["bench-secret-$RANDOM$RANDOM"]
min_port = 40000
max_port = 40999
[api]
listen = "127.0.0.1:$API_PORT"
[signal]
# Same conditions as the peer server, which has no per-connection rate limit.
rate_per_sec = 100000
burst = 100000
peerjs_concurrent_limit = 5000
[metrics]
enabled = false
[log]
level = "warn"
TOML

run_load() { # name url pid
    node bench/signal/load.mjs --url "$2" --key peerjs --peers "$PEERS" --secs "$SECS" \
        --window "$WINDOW" --pid "$3" | tee "$OUT/$1.json"
}

echo "==> tern: $PEERS peers, $SECS s"
"$TERN" serve --config "$OUT/tern.toml" 2>"$OUT/tern.log" &
TERN_PID=$!
PIDS+=("$TERN_PID")
wait_http "http://127.0.0.1:$API_PORT/peerjs"
echo "tern idle RSS: $(awk '/VmRSS/{print $2}' /proc/$TERN_PID/status) KiB" | tee "$OUT/tern-idle.txt"
run_load tern "ws://127.0.0.1:$API_PORT/peerjs/peerjs" "$TERN_PID"
kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true

echo "==> peer (npm, PeerJS server 1.0): $PEERS peers, $SECS s"
node tests/browser/node_modules/peer/dist/bin/peerjs.js --port "$PEER_PORT" --path /myapp \
    >"$OUT/peer.log" 2>&1 &
PEER_PID=$!
PIDS+=("$PEER_PID")
wait_http "http://127.0.0.1:$PEER_PORT/myapp"
echo "peer idle RSS: $(awk '/VmRSS/{print $2}' /proc/$PEER_PID/status) KiB" | tee "$OUT/peer-idle.txt"
run_load peer "ws://127.0.0.1:$PEER_PORT/myapp/peerjs" "$PEER_PID"

node -e '
const fs = require("fs");
const t = JSON.parse(fs.readFileSync(process.argv[1])), p = JSON.parse(fs.readFileSync(process.argv[2]));
const r = (a, b) => (b ? (a / b).toFixed(2) : "n/a");
const rows = [
  ["connections held", t.held, p.held, r(t.held, p.held)],
  ["messages/s", t.msgs_per_sec, p.msgs_per_sec, r(t.msgs_per_sec, p.msgs_per_sec)],
  ["RSS connected (KiB)", t.rss_kib_connected, p.rss_kib_connected, r(t.rss_kib_connected, p.rss_kib_connected)],
  ["RSS end (KiB)", t.rss_kib_end, p.rss_kib_end, r(t.rss_kib_end, p.rss_kib_end)],
  ["peak RSS (KiB)", t.hwm_kib, p.hwm_kib, r(t.hwm_kib, p.hwm_kib)],
];
console.log("\n| metric | tern | peer | tern/peer |\n|---|---|---|---|");
for (const x of rows) console.log(`| ${x.join(" | ")} |`);
' "$OUT/tern.json" "$OUT/peer.json" | tee "$OUT/summary.md"
echo "results: $OUT"
