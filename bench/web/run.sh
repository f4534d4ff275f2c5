#!/usr/bin/env bash
# The web page against a bare RTCDataChannel, same run (bench/web/bench.mjs): starts its own
# Tern on free loopback ports (TURN relay to loopback allowed, bandwidth cap off like the
# other benches), runs the benchmark, stops the daemon by its PID.
#
# usage: bench/web/run.sh [--mib 200] [--rounds 3] [--paths direct,turn] [--kinds bare,file,page] [--web web] [--pin] [--profile]
#        env: TERN_BIN (default: build one)
#             NICE (0): run Tern and the browsers at this nice value, e.g. -10 on a box busy
#             with other work. With the kernel's autogroups nice only ranks processes within
#             a session: run as `setsid env NICE=-10 bench/web/run.sh` and, as root, the
#             script sets its own autogroup's nice too (restored at exit).
# Needs Debian's chromium and `npm ci` in tests/browser. Results: bench/out/web-<time>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
if [ -z "${TERN_BIN:-}" ]; then
    cargo build --release --bin tern
    TERN_BIN=$ROOT/target/release/tern
fi
OUT=$ROOT/bench/out/web-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
TURN=$(free_port); API=$(free_port)
MIN=$((40000 + RANDOM % 20000))
cat > "$OUT/tern.toml" <<CFG
[turn]
listen = ["127.0.0.1:$TURN"]
relay_ip = ["127.0.0.1"]
min_port = $MIN
max_port = $((MIN + 199))
auth_secrets = ["$(head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9)"]
allowed_peer_ranges = ["127.0.0.0/8"]
max_bytes_per_sec = 0
[api]
listen = "127.0.0.1:$API"
[metrics]
enabled = false
[log]
level = "warn"
[daemon]
pid_file = "$OUT/tern.pid"
CFG
NICE=${NICE:-0}
AUTOGROUP_NICE=""
if [ "$NICE" != 0 ] && [ -w /proc/self/autogroup ]; then
    AUTOGROUP_NICE=$(awk '{print $3}' /proc/self/autogroup)
    echo "$NICE" >/proc/self/autogroup || AUTOGROUP_NICE=""
fi
nice -n "$NICE" "$TERN_BIN" serve --config "$OUT/tern.toml" 2> "$OUT/tern.log" &
TERN_PID=$!
cleanup() {
    kill "$TERN_PID" 2>/dev/null || true
    wait "$TERN_PID" 2>/dev/null || true
    if [ -n "$AUTOGROUP_NICE" ]; then echo "$AUTOGROUP_NICE" >/proc/self/autogroup || true; fi
}
trap cleanup EXIT
for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$API/api/ice" > /dev/null && break
    sleep 0.2
done
nice -n "$NICE" node "$ROOT/bench/web/bench.mjs" --url "http://127.0.0.1:$API" --tern-pid "$TERN_PID" "$@" | tee "$OUT/results.md"
