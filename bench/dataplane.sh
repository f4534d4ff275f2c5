#!/usr/bin/env bash
# Data-plane benchmark (issue 15): Tern beside coturn (the Debian package, and coturn built
# from source with its defaults and with `--multiplex-peer --udp-gso`) and beside the
# batched bare forwarder (`tern-loadgen forward`: recvmmsg/sendmmsg + UDP GSO, no TURN
# logic) under the same loads, in one run, servers interleaved:
#   closed  closed loop, ALLOCS allocations x INFLIGHT packets in flight, SIZE-byte payloads
#   video   per allocation bursts of 20-40 packets of 1200 bytes at 30 bursts/s, echoed back
#   video-gso  the same, each burst and each echo sent as one UDP GSO message (a GSO-capable
#           sender such as a QUIC stack): a server with UDP GRO receives a burst as one buffer
# Every allocation has its own echo peer (coturn --multiplex-peer demultiplexes its shared
# relay socket by peer address, so it refuses a second allocation binding the same peer);
# the forwarder, which has no allocations, echoes through one peer.
# For each server and load: relayed packets/s (both directions), loss, server CPU per
# relayed packet (utime+stime from /proc/PID/stat around the load) and Tern's packets/s as
# a fraction of the forwarder's. ONECORE=1 adds the one-core mode: the server pinned to CPU 0
# with taskset, the load generator to CPU 1, a rate search for the highest zero-loss rate.
# PROFILE=1 records Tern under each load with perf and writes one flame graph per load.
#
# coturn from source: COTURN_GIT (a git dir, e.g. from the fetch tool) or COTURN_SRC (a
# source tree); built by bench/coturn_build.sh in bench/out/. Absent: that anchor is
# skipped with a message. All traffic on 127.0.0.1; every load bounded; only PIDs this
# script started are stopped. Results: bench/out/dataplane-<time>/.
#
# env: ALLOCS (32) INFLIGHT (8) SIZE (100) SECS (10) VIDEO_ALLOCS (32) ROUNDS (1)
#      LOADS ("closed video video-gso")
#      SERVERS ("forwarder tern coturn-deb coturn-src coturn-src-fast")
#      ONECORE (0) ONECORE_SECS (4) PROFILE (0) FLAME_DIR (bench/docs/flame)
#      TERN_BIN (a tern binary instead of building one)
#      TERN_BASE_BIN (another tern binary, e.g. before a change: adds server "tern-base")
#      NICE (0; e.g. -10: the run's scheduler autogroup gets that niceness, so a busy shared
#      box's other work takes less of its CPU. It starves every other session: never while
#      anything else on the box measures (a soak beside a NICE=-10 run lost packets))
# The run is its own session (setsid), so with kernel.sched_autogroup_enabled it is its own
# CFS group: its CPU share does not depend on what else runs in the caller's session (a
# build beside it took most of the share of earlier runs).
set -euo pipefail
if [ -z "${DATAPLANE_SESSION:-}" ] && command -v setsid >/dev/null; then
    DATAPLANE_SESSION=1 exec setsid -w "$0" "$@"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
ALLOCS=${ALLOCS:-32}
INFLIGHT=${INFLIGHT:-8}
SIZE=${SIZE:-100}
SECS=${SECS:-10}
VIDEO_ALLOCS=${VIDEO_ALLOCS:-32}
ROUNDS=${ROUNDS:-1}
SERVERS=${SERVERS:-forwarder tern coturn-deb coturn-src coturn-src-fast}
ONECORE=${ONECORE:-0}
ONECORE_SECS=${ONECORE_SECS:-4}
PROFILE=${PROFILE:-0}
NICE=${NICE:-0}
LOADS=${LOADS:-closed video video-gso}
if [ "$NICE" != 0 ] && [ -w /proc/self/autogroup ]; then
    echo "$NICE" >/proc/self/autogroup
fi
FLAME_DIR=${FLAME_DIR:-$ROOT/bench/docs/flame}
RELAY_PORTS=2000

OUT="$ROOT/bench/out/dataplane-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
echo "results and logs: $OUT"
# PIDS, cleanup on exit, free_port.
. "$ROOT/bench/lib.sh"

if [ -z "${TERN_BIN:-}" ]; then
    cargo build --release --quiet --bin tern
fi
TERN=${TERN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tern}
LOADGEN_TARGET="$ROOT/bench/out/target-loadgen"
CARGO_TARGET_DIR="$LOADGEN_TARGET" cargo build --release --quiet --manifest-path bench/loadgen/Cargo.toml
LOADGEN="$LOADGEN_TARGET/release/tern-loadgen"

if [ -n "${TERN_BASE_BIN:-}" ] && [[ " $SERVERS " != *" tern-base "* ]]; then
    SERVERS="$SERVERS tern-base"
fi
COTURN_SRC_BIN=""
if [[ " $SERVERS " == *" coturn-src"* ]]; then
    if COTURN_SRC_BIN=$(bench/coturn_build.sh); then
        echo "coturn from source: $COTURN_SRC_BIN ($($COTURN_SRC_BIN --version 2>&1 | head -1))"
    else
        echo "SKIPPING coturn-src and coturn-src-fast: no coturn source (set COTURN_GIT or COTURN_SRC)" >&2
        SERVERS=$(tr ' ' '\n' <<<"$SERVERS" | grep -v '^coturn-src' | tr '\n' ' ')
    fi
fi
if [[ " $SERVERS " == *" coturn-deb "* ]] && ! command -v turnserver >/dev/null; then
    echo "SKIPPING coturn-deb: no turnserver (apt-get install coturn)" >&2
    SERVERS=$(tr ' ' '\n' <<<"$SERVERS" | grep -v '^coturn-deb$' | tr '\n' ' ')
fi

SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
printf '%s\n' "$SECRET" >"$OUT/secret"
chmod 600 "$OUT/secret"
: >"$OUT/empty.conf"
TICKS=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }


wait_ready() { # port pid name
    for _ in $(seq 1 300); do
        kill -0 "$2" 2>/dev/null || { echo "$3 exited; see $OUT/$3.log" >&2; return 1; }
        if [ "$3" = forwarder ]; then
            grep -q 'forwarder ready' "$OUT/forwarder.log" 2>/dev/null && return 0
        elif timeout 2 turnutils_stunclient -p "$1" 127.0.0.1 2>/dev/null | grep -q 'reflexive addr'; then
            return 0
        fi
        sleep 0.1
    done
    echo "$3 did not come up on port $1" >&2
    return 1
}

# start_server NAME PORT MIN_PORT PEER_PORT [PIN] -> SERVER_PID
start_server() {
    local name=$1 port=$2 min=$3 peer_port=$4 pin=${5:-}
    local max=$((min + RELAY_PORTS - 1)) pre=() threads=2
    # Pinned to one core, every server runs one data-path thread (coturn would otherwise
    # start one relay thread per online CPU whatever its affinity, the forwarder two).
    [ -n "$pin" ] && pre=(taskset -c "$pin") threads=1
    case $name in
    forwarder)
        "${pre[@]}" "$LOADGEN" forward --listen "127.0.0.1:$port" --peer "127.0.0.1:$peer_port" \
            --threads "$threads" --max-secs 900 >"$OUT/forwarder.log" 2>&1 &
        ;;
    tern | tern-base)
        local tbin=$TERN
        [ "$name" = tern-base ] && tbin=$TERN_BASE_BIN
        "${pre[@]}" "$tbin" serve \
            --set "turn.listen=[\"127.0.0.1:$port\"]" --set 'turn.relay_ip=["127.0.0.1"]' \
            --set "turn.min_port=$min" --set "turn.max_port=$max" \
            --set "turn.secret_file=[\"$OUT/secret\"]" \
            --set 'turn.allowed_peer_ranges=["127.0.0.0/8"]' \
            --set turn.user_quota=100000 --set turn.total_quota=100000 \
            --set turn.max_bytes_per_sec=0 \
            --set turn.unauth_rate_per_sec=1000000 --set turn.unauth_burst=1000000 \
            --set turn.socket_buffer_bytes=4194304 \
            --set api.enabled=false --set metrics.enabled=false --set log.level=warn \
            --set "turn.workers=$threads" \
            >"$OUT/$name.log" 2>&1 &
        ;;
    coturn-deb | coturn-src | coturn-src-fast)
        local bin=turnserver extra=()
        [ "$name" != coturn-deb ] && bin=$COTURN_SRC_BIN
        if [ "$name" = coturn-src-fast ]; then
            extra=(--multiplex-peer --udp-gso --multiplex-peer-port "$(free_port)")
        fi
        extra+=(--relay-threads "$threads")
        "${pre[@]}" "$bin" -c "$OUT/empty.conf" --no-cli --allow-loopback-peers \
            --use-auth-secret --static-auth-secret="$SECRET" --realm tern \
            --listening-ip 127.0.0.1 --listening-port "$port" --relay-ip 127.0.0.1 \
            --min-port "$min" --max-port "$max" --no-tls --no-dtls \
            --log-file "$OUT/$name.log" --simple-log --pidfile "$OUT/$name.pid" "${extra[@]}" \
            >"$OUT/$name.stdout" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_ready "$port" "$SERVER_PID" "$name"
}

stop_server() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# loadgen SERVER PORT PEER_PORT LABEL [PIN] ARGS... -> JSON on stdout
loadgen() {
    local server=$1 port=$2 peer_port=$3 label=$4 pin=$5
    shift 5
    local pre=() bare=()
    [ -n "$pin" ] && pre=(taskset -c "$pin")
    [ "$server" = forwarder ] && bare=(--bare --peer-port "$peer_port")
    "${pre[@]}" "$LOADGEN" --server "127.0.0.1:$port" --secret-file "$OUT/secret" \
        --user-prefix "$label-" "${bare[@]}" "$@" 2>>"$OUT/$server-$label.stderr" | tail -1
}

json() { grep -o "\"$1\":[0-9.]*" <<<"$2" | cut -d: -f2; }

# server_cores: the server's CPU seconds over the load's seconds; client_cpu_s: the load
# generator's (near one core per busy thread: the clients set the pace, not the server);
# loadavg: the box's 1-minute load average after the load (other work on a shared box).
printf 'round\tserver\tload\trelayed_pps\tloss_pct\tcpu_us_per_pkt\trelayed_packets\tcpu_s\tavg_rtt_us\tserver_cores\tclient_cpu_s\tloadavg\n' >"$OUT/results.tsv"

# The loads, by name.
load_args() {
    case $1 in
    closed) echo "--allocations $ALLOCS --inflight $INFLIGHT --size $SIZE --duration $SECS --packets 100000000 --distinct-peers" ;;
    video) echo "--allocations $VIDEO_ALLOCS --video --size 1200 --duration $SECS --packets 100000000 --distinct-peers" ;;
    video-gso) echo "$(load_args video) --gso" ;;
    esac
}

profile_start() { # pid load
    PERF_PID=""
    if [ "$PROFILE" = 1 ]; then
        perf record -F 299 -g --call-graph dwarf,16384 -p "$1" -o "$OUT/perf-$2.data" >"$OUT/perf-$2.log" 2>&1 &
        PERF_PID=$!
        sleep 0.5
    fi
}
profile_stop() { # load
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        mkdir -p "$FLAME_DIR"
        perf script -i "$OUT/perf-$1.data" 2>/dev/null | inferno-collapse-perf >"$OUT/perf-$1.folded" &&
            inferno-flamegraph --title "Tern, $1 load ($(date -u +%F))" <"$OUT/perf-$1.folded" >"$FLAME_DIR/tern-$1.svg" &&
            echo "    flame graph: $FLAME_DIR/tern-$1.svg"
    fi
}

port_base=$((30000 + RANDOM % 8000))
for round in $(seq 1 "$ROUNDS"); do
    for load in $LOADS; do
        for server in $SERVERS; do
            port=$(free_port)
            peer_port=$(free_port)
            min=$((port_base + RELAY_PORTS * (RANDOM % 3)))
            start_server "$server" "$port" "$min" "$peer_port" || continue
            pid=$SERVER_PID
            [ "$server" = tern ] && profile_start "$pid" "$load"
            c0=$(cpu_ticks "$pid")
            # shellcheck disable=SC2046
            j=$(loadgen "$server" "$port" "$peer_port" "$load" "" $(load_args "$load")) || true
            c1=$(cpu_ticks "$pid")
            [ "$server" = tern ] && profile_stop "$load"
            stop_server "$pid"
            if ! grep -q '"ok":true' <<<"$j"; then
                echo "    $server $load: loadgen failed: $j" >&2
                continue
            fi
            relayed=$(json relayed_packets "$j")
            secs=$(json duration_s "$j")
            awk -v r="$round" -v s="$server" -v l="$load" -v n="$relayed" -v d="$secs" \
                -v loss="$(json loss_pct "$j")" -v t=$((c1 - c0)) -v hz="$TICKS" -v rtt="$(json avg_rtt_us "$j")" \
                -v ccpu="$(json client_cpu_s "$j")" -v la="$(cut -d' ' -f1 /proc/loadavg)" \
                'BEGIN { printf "%s\t%s\t%s\t%.0f\t%s\t%.3f\t%s\t%.2f\t%s\t%.2f\t%s\t%s\n", r, s, l, n / d, loss, (n > 0 ? t / hz / n * 1e6 : 0), n, t / hz, rtt, t / hz / d, ccpu, la }' \
                | tee -a "$OUT/results.tsv" | awk -F'\t' '{ printf "    %-16s %-7s %9s pkt/s  loss %5s%%  %6s us CPU/pkt  rtt %s us  server %s cores  client %s s  load %s\n", $2, $3, $4, $5, $6, $9, $10, $11, $12 }'
        done
    done
done

# One-core mode: the highest rate (packets/s sent by the clients) with zero loss.
if [ "$ONECORE" = 1 ]; then
    printf 'server\tzero_loss_rate_pps\trelayed_pps_at_rate\tprobes\n' >"$OUT/onecore.tsv"
    echo "==> one-core mode: server on CPU 0, load generator on CPU 1, ${ONECORE_SECS} s per probe"
    for server in $SERVERS; do
        port=$(free_port)
        peer_port=$(free_port)
        start_server "$server" "$port" "$port_base" "$peer_port" 0 || continue
        pid=$SERVER_PID
        probe() { # rate -> sets LOSS, RELAYED_PPS
            local j
            j=$(loadgen "$server" "$port" "$peer_port" "onecore$1" 1 --allocations "$ALLOCS" --distinct-peers \
                --rate "$1" --size "$SIZE" --duration "$ONECORE_SECS" --packets 100000000) || true
            LOSS=$(json loss_pct "$j")
            LOSS=${LOSS:-100}
            RELAYED_PPS=$(json relayed_pps "$j")
            SENT_PPS=$(json send_pps "$j")
            # Zero loss counts only when the clients kept the rate (a starved load
            # generator sends less than asked).
            KEPT=$(awk -v s="${SENT_PPS:-0}" -v r="$1" 'BEGIN { print (s >= 0.95 * r) ? 1 : 0 }')
            if [ "$KEPT" = 1 ] && { [ "$LOSS" = 0 ] || [ "$LOSS" = 0.0 ]; }; then ZERO=1; else ZERO=0; fi
            echo "    $server rate $1: sent ${SENT_PPS} pkt/s, loss ${LOSS}%, relayed ${RELAYED_PPS} pkt/s" >>"$OUT/onecore.log"
        }
        good=0 good_pps=0 bad=0 rate=20000 probes=0
        # Doubling until loss, then bisection to within 10%.
        while [ "$rate" -le 1600000 ]; do
            probe "$rate"
            probes=$((probes + 1))
            if [ "$ZERO" = 1 ]; then good=$rate good_pps=$RELAYED_PPS; rate=$((rate * 2)); else bad=$rate; break; fi
        done
        if [ "$bad" -gt 0 ]; then
            while [ $((bad - good)) -gt $((good / 10 + 1000)) ]; do
                mid=$(((good + bad) / 2))
                probe "$mid"
                probes=$((probes + 1))
                if [ "$ZERO" = 1 ]; then good=$mid good_pps=$RELAYED_PPS; else bad=$mid; fi
            done
        fi
        stop_server "$pid"
        printf '%s\t%s\t%s\t%s\n' "$server" "$good" "$good_pps" "$probes" | tee -a "$OUT/onecore.tsv"
    done
fi

echo
echo "==> summary (medians over $ROUNDS round(s); box: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
awk -F'\t' '
NR == 1 { next }
{ k = $2 SUBSEP $3; n[k]++; pps[k, n[k]] = $4; cpu[k, n[k]] = $6; loss[k, n[k]] = $5
  if (!($2 in seen_s)) { seen_s[$2] = 1; srv[++ns] = $2 }
  if (!($3 in seen_l)) { seen_l[$3] = 1; lds[++nl] = $3 } }
function med(a, k, m,   i, j, t, v) { for (i = 1; i <= m; i++) v[i] = a[k, i]
  for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
  return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2 }
END {
  for (l = 1; l <= nl; l++) {
    ld = lds[l]
    fk = "forwarder" SUBSEP ld; fp = (fk in n) ? med(pps, fk, n[fk]) : 0
    best = 0
    for (s = 1; s <= ns; s++) { k = srv[s] SUBSEP ld
      if (srv[s] ~ /^coturn/ && (k in n)) { c = med(cpu, k, n[k]); if (best == 0 || c < best) best = c } }
    printf "\n%s load\n%-16s %12s %8s %14s %12s %14s\n", ld, "server", "relayed pkt/s", "loss %", "CPU us/pkt", "x forwarder", "CPU x best coturn"
    for (s = 1; s <= ns; s++) { k = srv[s] SUBSEP ld; if (!(k in n)) continue
      p = med(pps, k, n[k]); c = med(cpu, k, n[k])
      printf "%-16s %12.0f %8s %14.3f %12s %14s\n", srv[s], p, med(loss, k, n[k]), c,
        (fp > 0 ? sprintf("%.2f", p / fp) : "-"), (best > 0 ? sprintf("%.2f", c / best) : "-") }
  }
}' "$OUT/results.tsv" | tee "$OUT/summary.txt"
[ -f "$OUT/onecore.tsv" ] && { echo; echo "one-core zero-loss rates (client packets/s):"; column -t "$OUT/onecore.tsv" | tee -a "$OUT/summary.txt"; }
true
