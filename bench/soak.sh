#!/usr/bin/env bash
# Soak test (issue 15): Tern under a mixed load for SOAK_SECS (default 600; SOAK_SECS=3600
# for the hour), sampled every 10 s into a CSV: RSS, open fds, server CPU per relayed packet
# and loss; then a PNG of RSS and fds over time (gnuplot) and a summary of how flat they
# stayed after a warm-up (WARMUP).
#
# The mixed load, all at once, each part looping until the end:
#   udp      tern-loadgen: UDP_ALLOCS allocations with channels at UDP_RATE packets/s, a new
#            set of allocations every 60 s (their loss and echo counts are what "loss" is)
#   churn    tern-loadgen: 16 allocations for 2 s at a time (allocate, bind, relay, delete)
#   send     turnutils_uclient -s: Send/Data indications over UDP
#   tcp      turnutils_uclient -t: TURN over TCP with channels
#   tls      turnutils_uclient -t -S: TURN over TLS (self-signed certificate made here)
#   signal   bench/signal/load.mjs: PeerJS peers bouncing CANDIDATEs through /peerjs
# Loopback only; every part bounded by the end time. The daemon, the echo peer and each part
# run as process groups of their own, stopped by group id on exit or interrupt (bench/lib.sh),
# so a part's load client goes with it; nothing is stopped by name.
# Results: bench/out/soak-<time>/ (soak.csv, logs); the CSV, PNG and summary are copied to
# DOCS (bench/docs) unless DOCS is empty.
#
# env: SOAK_SECS (600) UDP_ALLOCS (32) UDP_RATE (5000) UC_CLIENTS (10) SIG_PEERS (100)
#      WARMUP (120 s: the 90 s allocation lifetime set below, plus a margin)
#      TERN_BIN (a tern binary instead of building one) DOCS (bench/docs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SOAK_SECS=${SOAK_SECS:-600}
UDP_ALLOCS=${UDP_ALLOCS:-32}
UDP_RATE=${UDP_RATE:-5000}
WARMUP=${WARMUP:-120}
UC_CLIENTS=${UC_CLIENTS:-10}
SIG_PEERS=${SIG_PEERS:-100}
DOCS=${DOCS-$ROOT/bench/docs}
for tool in turnutils_uclient turnutils_peer openssl gnuplot node curl; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install coturn openssl gnuplot-nox nodejs curl)" >&2; exit 1; }
done
# The signaling part's WebSocket client; without it every signaling run fails at once and the
# soak runs without its signaling load.
[ -d tests/browser/node_modules/ws ] || { echo "missing the ws module: (cd tests/browser && npm ci)" >&2; exit 1; }

OUT="$ROOT/bench/out/soak-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
echo "soak for ${SOAK_SECS} s; results and logs: $OUT"
# in_group, cleanup on exit, free_port.
. "$ROOT/bench/lib.sh"
trap 'exit 143' TERM INT

if [ -z "${TERN_BIN:-}" ]; then
    cargo build --release --quiet --bin tern
fi
TERN=${TERN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tern}
LOADGEN_TARGET="$ROOT/bench/out/target-loadgen"
CARGO_TARGET_DIR="$LOADGEN_TARGET" cargo build --release --quiet --manifest-path bench/loadgen/Cargo.toml
LOADGEN="$LOADGEN_TARGET/release/tern-loadgen"

TURN_PORT=$(free_port)
TLS_PORT=$(free_port)
API_PORT=$(free_port)
METRICS_PORT=$(free_port)
PEER_PORT=$(free_port)
MIN_PORT=$((41000 + RANDOM % 8000))
SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
printf '%s\n' "$SECRET" >"$OUT/secret"
chmod 600 "$OUT/secret"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" >/dev/null 2>&1
cat >"$OUT/tern.toml" <<TOML
[turn]
listen = ["127.0.0.1:$TURN_PORT"]
relay_ip = ["127.0.0.1"]
min_port = $MIN_PORT
max_port = $((MIN_PORT + 1999))
secret_file = ["$OUT/secret"]
allowed_peer_ranges = ["127.0.0.0/8"]
user_quota = 100000
total_quota = 100000
max_bytes_per_sec = 0
unauth_rate_per_sec = 1000000
unauth_burst = 1000000
socket_buffer_bytes = 4194304
# turnutils_uclient never deletes its UDP allocations: they live out their lifetime. At the
# default 600 s the relay sockets of every finished Send-indication run pile up for ten
# minutes before the first expire; 90 s (longer than any run here) reaches steady state soon.
default_lifetime_secs = 90
max_lifetime_secs = 90
[tls]
cert_file = "$OUT/cert.pem"
key_file = "$OUT/key.pem"
listen = ["127.0.0.1:$TLS_PORT"]
[api]
listen = "127.0.0.1:$API_PORT"
max_connections = 40000
max_connections_per_ip = 40000
[signal]
rate_per_sec = 100000
burst = 100000
peerjs_rate_per_sec = 100000
peerjs_burst = 100000
[metrics]
enabled = true
listen = "127.0.0.1:$METRICS_PORT"
[log]
level = "warn"
[daemon]
# On exit the loads stop first; turnutils_uclient's allocations would hold the drain open for
# their 90 s lifetime.
drain_timeout_secs = 5
TOML
in_group "$TERN" serve --config "$OUT/tern.toml" >"$OUT/tern.log" 2>&1
TERN_PID=$!
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >/dev/null 2>&1 && break
    kill -0 "$TERN_PID" 2>/dev/null || { echo "tern exited; see $OUT/tern.log" >&2; exit 1; }
    sleep 0.1
done
in_group turnutils_peer -p "$PEER_PORT" -L 127.0.0.1 >"$OUT/peer.log" 2>&1

START=$(date +%s)
END=$((START + SOAK_SECS))
left() { echo $((END - $(date +%s))); }

# Each part: a loop of bounded runs until the end time.
part_udp() {
    while [ "$(left)" -gt 5 ]; do
        local d=$(($(left) - 3))
        [ "$d" -gt 60 ] && d=60
        "$LOADGEN" --server "127.0.0.1:$TURN_PORT" --secret-file "$OUT/secret" --allocations "$UDP_ALLOCS" \
            --rate "$UDP_RATE" --packets 1000000000 --duration "$d" --size 200 --user-prefix soak- \
            2>>"$OUT/udp.stderr" | tail -1 >>"$OUT/udp.jsonl" || true
    done
}
part_churn() {
    while [ "$(left)" -gt 5 ]; do
        "$LOADGEN" --server "127.0.0.1:$TURN_PORT" --secret-file "$OUT/secret" --allocations 16 \
            --rate 1000 --packets 2000 --duration 2 --size 100 --user-prefix churn- \
            2>>"$OUT/churn.stderr" | tail -1 >>"$OUT/churn.jsonl" || true
    done
}
part_uclient() { # name flags...
    local name=$1
    shift
    while [ "$(left)" -gt 15 ]; do
        timeout --foreground -k 5 60 turnutils_uclient -W "$SECRET" -u soak -e 127.0.0.1 -r "$PEER_PORT" \
            -m "$UC_CLIENTS" -n 300 -l 200 -z 20 "$@" 127.0.0.1 >"$OUT/$name.last" 2>&1 || true
        grep -h 'Total lost packets\|tot_send_msgs' "$OUT/$name.last" | tail -2 >>"$OUT/$name.log" || true
    done
}
part_signal() {
    while [ "$(left)" -gt 20 ]; do
        local d=$(($(left) - 15))
        [ "$d" -gt 60 ] && d=60
        timeout --foreground -k 5 $((d + 60)) node bench/signal/load.mjs --url "ws://127.0.0.1:$API_PORT/peerjs/peerjs" \
            --key peerjs --pid "$TERN_PID" --procs 1 --peers "$SIG_PEERS" --batch 50 --kind bounce \
            --window 1 --secs "$d" >>"$OUT/signal.jsonl" 2>>"$OUT/signal.stderr" || true
    done
}
# `timeout --foreground` in the parts: timeout otherwise moves itself and its command into a
# process group of its own, out of reach of the part's.
PARTS=()
in_group part_udp
PARTS+=("$!")
in_group part_churn
PARTS+=("$!")
in_group part_uclient send -c -s -p "$TURN_PORT"
PARTS+=("$!")
in_group part_uclient tcp -c -t -p "$TURN_PORT"
PARTS+=("$!")
in_group part_uclient tls -c -t -S -p "$TLS_PORT"
PARTS+=("$!")
in_group part_signal
PARTS+=("$!")

# Sampler: every 10 s.
TICKS=$(getconf CLK_TCK)
relayed() {
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" |
        awk '/^tern_relay_packets_total/ { s += $NF } END { printf "%.0f\n", s }'
}
loss_totals() { # cumulative sent and lost of the finished UDP channel runs
    awk -F'[,:]' '{ for (i = 1; i < NF; i++) { if ($i == "\"sent\"") s += $(i + 1); if ($i == "\"lost\"") l += $(i + 1) } }
        END { printf "%d %d\n", s, l }' "$OUT/udp.jsonl" 2>/dev/null || echo "0 0"
}
CSV="$OUT/soak.csv"
# RSS is anonymous memory (Tern's heap and stacks: what a leak grows) plus file pages (the
# binary's code, faulted in as code paths first run, shared and reclaimable): both are kept.
echo "t_s,rss_kib,fds,cpu_us_per_pkt,relayed_pps,udp_sent,udp_lost,udp_loss_pct,rss_anon_kib,rss_file_kib" >"$CSV"
c_prev=$(awk '{print $14 + $15}' "/proc/$TERN_PID/stat")
r_prev=$(relayed)
while [ "$(date +%s)" -lt "$END" ]; do
    sleep 10
    kill -0 "$TERN_PID" 2>/dev/null || { echo "tern exited during the soak; see $OUT/tern.log" >&2; exit 1; }
    c=$(awk '{print $14 + $15}' "/proc/$TERN_PID/stat")
    r=$(relayed)
    read -r rss anon file < <(awk '/^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 }
        END { print r, a, f }' "/proc/$TERN_PID/status")
    fds=$(find "/proc/$TERN_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    read -r sent lost < <(loss_totals)
    awk -v t=$(($(date +%s) - START)) -v rss="$rss" -v fds="$fds" -v dc=$((c - c_prev)) -v dr=$((r - r_prev)) \
        -v hz="$TICKS" -v s="$sent" -v l="$lost" -v anon="$anon" -v file="$file" \
        'BEGIN { printf "%d,%d,%d,%.3f,%.0f,%d,%d,%.4f,%d,%d\n", t, rss, fds, (dr > 0 ? dc / hz / dr * 1e6 : 0), dr / 10, s, l, (s > 0 ? 100 * l / s : 0), anon, file }' |
        tee -a "$CSV"
    c_prev=$c r_prev=$r
done
# The parts finish their last bounded runs (at most a minute past the end).
for pid in "${PARTS[@]}"; do wait "$pid" 2>/dev/null || true; done

# Summary: flatness after the warm-up, and the losses of every part.
{
    echo "soak: ${SOAK_SECS} s, $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    # The window: after the warm-up, and before the last 30 s, when the parts stop starting
    # new runs and the load (and with it the fds) winds down.
    awk -F, -v w="$WARMUP" -v e=$((SOAK_SECS - 30)) '
        function spread(name, lo, hi, unit) { printf "%s %d..%d%s (spread %.2f%%)", name, lo, hi, unit, 100 * (hi - lo) / lo }
        NR > 1 && $1 >= w && $1 <= e { n++
            if (n == 1 || $2 < rmin) rmin = $2; if ($2 > rmax) rmax = $2
            if (n == 1 || $3 < fmin) fmin = $3; if ($3 > fmax) fmax = $3
            if ($9 != "") { na++; if (na == 1 || $9 < amin) amin = $9; if ($9 > amax) amax = $9; if (na == 1) a0 = $9; a1 = $9 }
            cpu += $4; pps += $5; T[n] = $1; R[n] = $2; F[n] = $3; A[n] = $9 }
        NR > 1 { last = $0 }
        END { if (n == 0) { print "no samples after the warm-up"; exit }
              printf "from %d s to %d s (%d samples): ", w, e, n; spread("RSS", rmin, rmax, " KiB"); printf ", "
              if (na > 0) { spread("anonymous", amin, amax, " KiB"); printf " (first %d, last %d), ", a0, a1 }
              spread("fds", fmin, fmax, ""); print ""
              # Drift: the mean of the first ten minutes of the window against the last ten.
              # A load that opens and closes sockets makes fds (and the heap) swing within a
              # run; a leak shows as a difference between the two ends.
              k = (n >= 120) ? 60 : int(n / 2)
              for (i = 1; i <= k; i++) { r0 += R[i]; f0 += F[i]; x0 += A[i]; r1 += R[n - k + i]; f1 += F[n - k + i]; x1 += A[n - k + i] }
              printf "drift (mean of the first %d samples to the last %d): RSS %+.2f%%, fds %+.2f%%", k, k, 100 * (r1 - r0) / r0, 100 * (f1 - f0) / f0
              if (na == n) printf ", anonymous %+.2f%%", 100 * (x1 - x0) / x0
              print ""
              printf "mean relayed %.0f pkt/s at %.3f us CPU per relayed packet\n", pps / n, cpu / n
              split(last, f, ","); printf "UDP channel runs: %d sent, %d lost (%.4f%%)\n", f[6], f[7], f[8] }' "$CSV"
    awk -F'[,:]' '{ for (i = 1; i < NF; i++) { if ($i == "\"sent\"") s += $(i + 1); if ($i == "\"lost\"") l += $(i + 1) } n++ }
        END { printf "churn runs: %d (16 allocations each), %d sent, %d lost\n", n, s, l }' "$OUT/churn.jsonl" 2>/dev/null || true
    for p in send tcp tls; do
        awk -v p="$p" '/Total lost packets/ { n++; split($0, a, "Total lost packets "); split(a[2], b, " "); lost += b[1] }
            /tot_send_msgs/ { match($0, /tot_send_msgs=[0-9]+/); s += substr($0, RSTART + 14, RLENGTH - 14) }
            END { printf "%s (turnutils_uclient): %d runs, %d messages sent, %d lost\n", p, n, s, lost }' "$OUT/$p.log" 2>/dev/null || true
    done
    awk -F'[,:]' '/"msgs"/ { n++; for (i = 1; i < NF; i++) { if ($i == "\"msgs\"") m += $(i + 1); if ($i == "\"closed_early\"") c += $(i + 1); if ($i == "\"failed\"") f += $(i + 1) } }
        END { printf "signal (PeerJS bounce): %d runs, %d messages delivered, %d opens failed, %d closed early\n", n, m, f, c }' "$OUT/signal.jsonl" 2>/dev/null || true
    echo "(CPU per relayed packet counts all of Tern's CPU, signaling and TLS included, over relayed packets only)"
} | tee "$OUT/summary.txt"

gnuplot <<GP
set terminal png size 1000,500
set output "$OUT/soak.png"
set datafile separator ","
set title "Tern soak: RSS and open fds (mixed load, ${SOAK_SECS} s)"
set xlabel "seconds"
set ylabel "memory (KiB)"
set y2label "open fds"
set ytics nomirror
set y2tics
set key bottom right
plot "$CSV" every ::1 using 1:2 with lines lw 2 title "RSS KiB", \
     "$CSV" every ::1 using 1:9 with lines lw 2 title "anonymous KiB", \
     "$CSV" every ::1 using 1:3 axes x1y2 with lines lw 2 title "fds"
GP
if [ -n "$DOCS" ]; then
    mkdir -p "$DOCS"
    cp "$CSV" "$DOCS/soak.csv"
    cp "$OUT/soak.png" "$DOCS/soak.png"
    cp "$OUT/summary.txt" "$DOCS/soak-summary.txt"
    echo "copied soak.csv, soak.png, soak-summary.txt to $DOCS"
fi
