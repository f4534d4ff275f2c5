#!/usr/bin/env bash
# Side-by-side TURN benchmark: Tern and coturn's turnserver (Debian package), one after the
# other, under the same loads: coturn's turnutils_uclient over UDP, turnutils_uclient -T (RFC
# 6062 TCP relays: client pairs whose TCP allocations connect to each other, the bytes spliced
# between TCP connections), and bench/loadgen (N allocations
# with channels, its own UDP echo peer, batched sends). For each server and load it measures
# relayed packets/s, loss, server CPU seconds per relayed packet (utime+stime from
# /proc/PID/stat around the load) and peak RSS (VmHWM), and prints Tern/coturn ratios.
#
# All traffic stays on 127.0.0.1; every load is bounded in packets and seconds; only the PIDs
# this script started are killed. Results: bench/out/<time>/ (results.tsv, logs).
#
# usage: bench/run.sh [--quick]
# env:   ALLOCS (200) RATE (20000 packets/s for the steady load) SECS (15)
#        UC_CLIENTS (100) UC_MSGS (1000) UC_INTERVAL_MS (5) SIZE (100 payload bytes)
#        TCP_CLIENTS (50) TCP_MSGS (1000) TCP_SIZE (1000 bytes) for the uclient -T load
#        SERVERS ("tern coturn")   TERN_BIN (use this tern binary instead of building one)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

ALLOCS=${ALLOCS:-200}
RATE=${RATE:-20000}
SECS=${SECS:-15}
MAX_PACKETS=${MAX_PACKETS:-3000000}
UC_CLIENTS=${UC_CLIENTS:-100}
UC_MSGS=${UC_MSGS:-1000}
UC_INTERVAL_MS=${UC_INTERVAL_MS:-5}
SIZE=${SIZE:-100}
SERVERS=${SERVERS:-tern coturn}
TCP_CLIENTS=${TCP_CLIENTS:-50}
TCP_MSGS=${TCP_MSGS:-1000}
TCP_SIZE=${TCP_SIZE:-1000}
if [ "${1:-}" = "--quick" ]; then
    ALLOCS=50 RATE=10000 SECS=5 MAX_PACKETS=300000 UC_CLIENTS=20 UC_MSGS=300
    TCP_CLIENTS=10 TCP_MSGS=300
fi
RELAY_PORTS=2000 # same relay range size for both servers

for tool in turnserver turnutils_uclient turnutils_peer turnutils_stunclient cargo; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install coturn; rustup)" >&2; exit 1; }
done

OUT="$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
echo "results and logs: $OUT"

# PIDS, cleanup on exit, free_port.
. "$ROOT/bench/lib.sh"

echo "==> building tern (release) and bench/loadgen (release)"
TERN_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${TERN_BIN:-}" ] && [[ " $SERVERS " == *" tern "* ]]; then
    cargo build --release --quiet --bin tern
fi
LOADGEN_TARGET="$ROOT/bench/out/target-loadgen"
CARGO_TARGET_DIR="$LOADGEN_TARGET" cargo build --release --quiet --manifest-path bench/loadgen/Cargo.toml
TERN="${TERN_BIN:-$TERN_TARGET/release/tern}"
LOADGEN="$LOADGEN_TARGET/release/tern-loadgen"

SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
printf '%s\n' "$SECRET" >"$OUT/secret"
chmod 600 "$OUT/secret"
: >"$OUT/empty.conf"

# A port that is free for UDP and TCP on 127.0.0.1 right now.

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
TICKS=$(getconf CLK_TCK)

wait_ready() { # port pid name
    for _ in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || { echo "$3 exited; see $OUT/$3.log" >&2; exit 1; }
        if timeout 2 turnutils_stunclient -p "$1" 127.0.0.1 2>/dev/null | grep -q 'reflexive addr'; then
            return
        fi
        sleep 0.1
    done
    echo "$3 did not answer STUN on port $1" >&2
    exit 1
}

start_server() { # name port min_port -> sets SERVER_PID
    local name=$1 port=$2 min=$3 max=$(($3 + RELAY_PORTS - 1))
    if [ "$name" = tern ]; then
        # Quotas, the bandwidth cap and the unauthenticated-request limiter opened to match
        # coturn's defaults (no user quota, no total quota, no max-bps, no per-source
        # limit); HTTP and metrics off.
        "$TERN" serve \
            --set "turn.listen=[\"127.0.0.1:$port\"]" \
            --set 'turn.relay_ip=["127.0.0.1"]' \
            --set "turn.min_port=$min" --set "turn.max_port=$max" \
            --set "turn.secret_file=[\"$OUT/secret\"]" \
            --set 'turn.allowed_peer_ranges=["127.0.0.0/8"]' \
            --set turn.user_quota=100000 --set turn.total_quota=100000 \
            --set turn.max_bytes_per_sec=0 \
            --set turn.unauth_rate_per_sec=1000000 --set turn.unauth_burst=1000000 \
            --set turn.socket_buffer_bytes=4194304 \
            --set api.enabled=false --set metrics.enabled=false \
            --set log.level=warn \
            >"$OUT/tern.log" 2>&1 &
    else
        # coturn sets 4 MB socket buffers itself; -c EMPTYFILE keeps Debian's config (syslog) out.
        turnserver -c "$OUT/empty.conf" --no-cli --allow-loopback-peers \
            --use-auth-secret --static-auth-secret="$SECRET" --realm tern \
            --listening-ip 127.0.0.1 --listening-port "$port" --relay-ip 127.0.0.1 \
            --min-port "$min" --max-port "$max" --no-tls --no-dtls \
            --log-file "$OUT/coturn.log" --simple-log \
            >"$OUT/coturn.stdout" 2>&1 &
    fi
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_ready "$port" "$SERVER_PID" "$name"
}

stop_server() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

printf 'server\tload\trelayed_pps\tloss_pct\tcpu_us_per_pkt\tpeak_rss_kib\trelayed_packets\tcpu_s\n' >"$OUT/results.tsv"

record() { # server load relayed_packets secs loss_pct cpu_ticks pid
    local pps cpu_us cpu_s
    pps=$(awk -v n="$3" -v s="$4" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
    cpu_s=$(awk -v t="$6" -v hz="$TICKS" 'BEGIN { printf "%.2f", t / hz }')
    cpu_us=$(awk -v t="$6" -v hz="$TICKS" -v n="$3" 'BEGIN { printf "%.3f", (n > 0 ? t / hz / n * 1e6 : 0) }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$pps" "$5" "$cpu_us" "$(hwm_kib "$7")" "$3" "$cpu_s" >>"$OUT/results.tsv"
    printf '    %-7s %-16s %9s relayed pkt/s  loss %6s%%  %8s us CPU/pkt  peak RSS %s KiB\n' \
        "$1" "$2" "$pps" "$5" "$cpu_us" "$(hwm_kib "$7")"
}

run_uclient() { # server port pid [label clients msgs size extra-flags...]
    local label=${4:-uclient} clients=${5:-$UC_CLIENTS} msgs=${6:-$UC_MSGS} size=${7:-$SIZE}
    local extra=("${@:8}")
    local peer_port t0 t1 c0 c1 log="$OUT/$1-$label.log"
    peer_port=$(free_port)
    turnutils_peer -p "$peer_port" -L 127.0.0.1 >"$OUT/$1-peer.log" 2>&1 &
    local peer=$!
    PIDS+=("$peer")
    sleep 0.3
    c0=$(cpu_ticks "$3")
    t0=$(date +%s.%N)
    timeout 300 turnutils_uclient -W "$SECRET" -u bench -p "$2" -e 127.0.0.1 -r "$peer_port" \
        -m "$clients" -n "$msgs" -l "$size" -c -z "$UC_INTERVAL_MS" "${extra[@]}" 127.0.0.1 >"$log" 2>&1 || true
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "$3")
    kill "$peer" 2>/dev/null || true
    wait "$peer" 2>/dev/null || true
    local sent recv loss
    sent=$(sed -n 's/.*tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\)$/\1/p' "$log" | tail -1)
    recv=$(sed -n 's/.*tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\)$/\2/p' "$log" | tail -1)
    loss=$(sed -n 's/.*Total lost packets [0-9]* (\([0-9.]*\)%).*/\1/p' "$log" | tail -1)
    if [ -z "$sent" ] || [ -z "$recv" ]; then
        echo "    $1 $label: no totals in $log" >&2
        tail -5 "$log" >&2
        return
    fi
    record "$1" "$label" "$((sent + recv))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
        "$(printf '%.2f' "${loss:-0}")" "$((c1 - c0))" "$3"
}

run_loadgen() { # server port pid label rate packets
    local c0 c1 json log="$OUT/$1-$4.json"
    c0=$(cpu_ticks "$3")
    "$LOADGEN" --server "127.0.0.1:$2" --secret-file "$OUT/secret" --allocations "$ALLOCS" \
        --rate "$5" --packets "$6" --duration "$SECS" --size "$SIZE" --user-prefix "$4-" \
        >"$log" 2>"$OUT/$1-$4.stderr" || true
    c1=$(cpu_ticks "$3")
    json=$(tail -1 "$log")
    if ! grep -q '"ok":true' <<<"$json"; then
        echo "    $1 $4: loadgen failed: $json" >&2
        return
    fi
    local relayed secs loss
    relayed=$(grep -o '"relayed_packets":[0-9]*' <<<"$json" | cut -d: -f2)
    secs=$(grep -o '"duration_s":[0-9.]*' <<<"$json" | cut -d: -f2)
    loss=$(grep -o '"loss_pct":[0-9.]*' <<<"$json" | cut -d: -f2)
    record "$1" "$4" "$relayed" "$secs" "$loss" "$((c1 - c0))" "$3"
}

port_base=$((30000 + RANDOM % 10000))
for server in $SERVERS; do
    port=$(free_port)
    if [ "$server" = tern ]; then min=$port_base; else min=$((port_base + RELAY_PORTS)); fi
    echo "==> $server on 127.0.0.1:$port, relay ports $min-$((min + RELAY_PORTS - 1))"
    start_server "$server" "$port" "$min"
    pid=$SERVER_PID
    echo "    idle RSS $(rss_kib "$pid") KiB"
    run_uclient "$server" "$port" "$pid"
    run_uclient "$server" "$port" "$pid" uclient-tcp-relay "$TCP_CLIENTS" "$TCP_MSGS" "$TCP_SIZE" -T
    run_loadgen "$server" "$port" "$pid" "loadgen-${RATE}pps" "$RATE" "$((RATE * SECS))"
    run_loadgen "$server" "$port" "$pid" "loadgen-max" 0 "$MAX_PACKETS"
    stop_server "$pid"
done

echo
echo "==> Tern / coturn (uclient: $UC_CLIENTS clients x $UC_MSGS msgs every ${UC_INTERVAL_MS} ms;" \
    "uclient-tcp-relay: $TCP_CLIENTS client pairs x $TCP_MSGS msgs of $TCP_SIZE bytes;" \
    "loadgen: $ALLOCS allocations, ${SIZE}-byte payloads, ${SECS} s; relayed = both directions)"
awk -F'\t' '
NR == 1 { next }
{ key = $2; v[$1, key, "pps"] = $3; v[$1, key, "loss"] = $4; v[$1, key, "cpu"] = $5; v[$1, key, "rss"] = $6
  if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
function ratio(a, b) { return (b > 0 && a != "") ? sprintf("%.2f", a / b) : "-" }
END {
  printf "%-18s %-20s %12s %12s %8s\n", "load", "metric", "tern", "coturn", "ratio"
  for (i = 1; i <= n; i++) {
    k = order[i]
    printf "%-18s %-20s %12s %12s %8s\n", k, "relayed pkt/s", v["tern", k, "pps"], v["coturn", k, "pps"], ratio(v["tern", k, "pps"], v["coturn", k, "pps"])
    printf "%-18s %-20s %12s %12s %8s\n", "", "loss %", v["tern", k, "loss"], v["coturn", k, "loss"], ""
    printf "%-18s %-20s %12s %12s %8s\n", "", "CPU us / relayed pkt", v["tern", k, "cpu"], v["coturn", k, "cpu"], ratio(v["tern", k, "cpu"], v["coturn", k, "cpu"])
    printf "%-18s %-20s %12s %12s %8s\n", "", "peak RSS KiB", v["tern", k, "rss"], v["coturn", k, "rss"], ratio(v["tern", k, "rss"], v["coturn", k, "rss"])
  }
}' "$OUT/results.tsv" | tee "$OUT/table.txt"
