#!/usr/bin/env bash
# Kernel fast path benchmark (issue 15 item 3): a client namespace and a peer namespace, each
# joined to this (root) namespace by a veth pair, Tern in the middle (one worker). bench/loadgen
# runs in the client namespace (its echo peer's socket in the peer namespace), N allocations
# with channels, sends at a target rate. Six runs per round (ROUNDS rounds, interleaved, so
# that the box's other load falls on every mode alike):
#   1. user space (turn.kernel_fast_path = "off"), as fast as possible: its peak rate U;
#   2. TC fast path ("tc"), as fast as possible;
#   3. XDP fast path ("xdp", native mode on the veths), as fast as possible;
#   4./5./6. user space, TC and XDP at U: the fast paths must lose nothing and Tern's counters
#      must equal what was sent; and the CPU each spends per packet at one and the same rate.
# XDP needs forwarding on the veths it is attached to (bpf_fib_lookup) and NAPI on their far
# ends (the veth driver takes redirected XDP frames only then): set on this script's own
# interfaces for every run, so all modes see the same topology.
#
# Where the CPU goes ("per core" in the goal is the relay's core). Without care the fast
# path's work is softirq run in the sender's context and so charged to the load generator,
# whose own sending and receiving (as much kernel work per packet as Tern's) then dominates
# any ratio. Here the receive of Tern's two veth ends runs in NAPI threads (GRO on, TSO off on
# the senders so veth uses them in every mode, /sys/class/net/*/threaded = 1): the relay side
# is Tern's process plus those two threads, which receive for Tern's sockets in user space and
# run the TC/XDP program and its redirect on the fast path. The namespaces' ends receive as
# softirq in the context of whoever sent into them, so the relay side is also charged with
# the endpoints' socket delivery, in every mode alike (in user space Tern's sends pay it).
# ENDS_THREADED=1 gives those ends NAPI threads of their own, charged to the endpoints; on
# this box that costs more than it separates (a thread wakeup per small batch on both sides,
# charged to the relay as well). NAPI threads get a real-time priority, as softirq would
# have. Reported per run:
# relayed packets/s and loss (the load generator's view), every lost datagram put down to
# where it was dropped (drop_counters below; what none of them explains too), CPU seconds
# of Tern, of its NAPI threads and of the load generator, relay-side CPU per packet the relay forwarded (Tern's
# counters) and forwarded packets per relay CPU-second; also the older figure, relayed
# packets/s per CPU of the Tern and load generator processes. Ratios are fast/user. The
# fast-path runs record the program's own run time (kernel.bpf_stats_enabled, restored at
# exit), the XDP runs `ip -d link` (xdp = native, xdpgeneric = generic) and the veths' XDP
# statistics (`ethtool -S`: redirects, XDP_TX, xmit errors).
#
# PIN=1 pins the relay side to CPU 0 and the load generator to CPU 1; NICE (-15) renices
# every measured task alike: on a box shared with other work, a starved NAPI thread
# overflows its veth ring (256 frames) and that loss is the box's, not the relay's.
# TOPO=one puts client and peer behind one veth (one namespace with both addresses), so XDP
# answers with XDP_TX instead of redirecting to the other veth.
#
# Root only; the namespaces and veths are created here and removed on exit; only PIDs this
# script started are killed. Results: bench/out/fastpath-<time>/ (results.tsv, logs).
#
# usage: bench/fastpath.sh  env: ALLOCS (32) SECS (10) SIZE (100) ROUNDS (1) PIN (0) NICE (-15)
#        TOPO (two) ENDS_THREADED (0) TERN_BIN LOADGEN_BIN
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
ALLOCS=${ALLOCS:-32}
SECS=${SECS:-10}
SIZE=${SIZE:-100}
ROUNDS=${ROUNDS:-1}
PIN=${PIN:-0}
TOPO=${TOPO:-two}
ENDS_THREADED=${ENDS_THREADED:-0}
NICE=${NICE:--15}
TERN_BIN=${TERN_BIN:-$ROOT/target/release/tern}
LOADGEN_BIN=${LOADGEN_BIN:-$ROOT/bench/loadgen/target/release/tern-loadgen}
[ "$(id -u)" = 0 ] || { echo "bench/fastpath.sh needs root (namespaces, BPF)" >&2; exit 1; }
[ -x "$TERN_BIN" ] || { echo "build tern first: cargo build --release" >&2; exit 1; }
[ -x "$LOADGEN_BIN" ] || { echo "build the load generator: (cd bench/loadgen && cargo build --release)" >&2; exit 1; }

OUT=$ROOT/bench/out/fastpath-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
ID=$(( $$ % 100000 ))
SUB=$(( ($$ % 200) + 20 ))
CN=bfpc$ID PN=bfpp$ID CIF=bfc$ID PIF=bfp$ID
S=10.215.$SUB.1 C=10.215.$SUB.2 R=10.216.$SUB.1 P=10.216.$SUB.2
if [ "$TOPO" = one ]; then
    # Client and peer behind the same veth (one namespace, two addresses): Tern's way out is
    # the way in, so XDP sends with XDP_TX (the single-NIC server's case) instead of a
    # redirect to another interface.
    PN=$CN PIF=$CIF
fi
IFACES=$(printf '%s\n' "$CIF" "$PIF" | sort -u | tr '\n' ' ')
# shellcheck disable=SC2086
IFACES_TOML=$(printf '"%s", ' $IFACES | sed 's/, $//')
TERN_PID=
STATS_WAS=$(cat /proc/sys/kernel/bpf_stats_enabled)
cleanup() {
    echo "$STATS_WAS" > /proc/sys/kernel/bpf_stats_enabled
    [ -n "$TERN_PID" ] && kill "$TERN_PID" 2>/dev/null && wait "$TERN_PID" 2>/dev/null
    ip link del "$CIF" 2>/dev/null || true
    ip link del "$PIF" 2>/dev/null || true
    ip netns del "$CN" 2>/dev/null || true
    ip netns del "$PN" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$CN"; [ "$PN" = "$CN" ] || ip netns add "$PN"
link() { # name ns here there
    ip link show "$1" >/dev/null 2>&1 || ip link add "$1" type veth peer name "$1x" netns "$2"
    ip addr add "$3/24" dev "$1"; ip link set "$1" up
    ip -n "$2" addr add "$4/24" dev "$1x"; ip -n "$2" link set "$1x" up; ip -n "$2" link set lo up
}
link "$CIF" "$CN" "$S" "$C"
link "$PIF" "$PN" "$R" "$P"
for dev in $IFACES; do echo 1 > "/proc/sys/net/ipv4/conf/$dev/forwarding"; done
echo 1 > /proc/sys/kernel/bpf_stats_enabled
# GRO on (NAPI: the veth driver's receive thread) and TSO off (veth hands a sender's datagram
# to the receiver's NAPI only when the sender has no TSO, which XDP's attach forces on the
# other end anyway) on all four ends, so every mode has the same receive path.
for dev in "$CIF" "$PIF"; do ethtool -K "$dev" gro on tso off >/dev/null; done
ip netns exec "$CN" ethtool -K "${CIF}x" gro on tso off >/dev/null
ip netns exec "$PN" ethtool -K "${PIF}x" gro on tso off >/dev/null
if [ "$TOPO" = one ]; then
    # veth schedules the receive of XDP_TX frames on the other end only when that end has an
    # XDP program of its own (GRO is enough for redirected frames, not for XDP_TX): without
    # one they fill its ring (256) and the rest are dropped (xdp_tx_errors). A program that
    # passes everything, on the namespace's end, in every mode alike.
    command -v clang >/dev/null || { echo "TOPO=one needs clang (an XDP_PASS program)" >&2; exit 1; }
    printf '%s\n' '__attribute__((section("xdp"), used)) int pass(void *ctx) { return 2; }' \
        'char _license[] __attribute__((section("license"), used)) = "GPL";' > "$OUT/pass.c"
    clang -O2 -target bpf -c "$OUT/pass.c" -o "$OUT/pass.o"
    ip -n "$CN" link set dev "${CIF}x" xdpdrv obj "$OUT/pass.o" sec xdp
fi
# Threaded NAPI on Tern's two ends (again after each attach: XDP may re-create the NAPI).
threaded() {
    echo 1 > "/sys/class/net/$CIF/threaded"; echo 1 > "/sys/class/net/$PIF/threaded"
    if [ "$ENDS_THREADED" = 1 ]; then
        ip netns exec "$CN" sh -c "echo 1 > /sys/class/net/${CIF}x/threaded"
        ip netns exec "$PN" sh -c "echo 1 > /sys/class/net/${PIF}x/threaded"
    fi
}
threaded
# The NAPI threads of the given interfaces (kernel threads named napi/<dev>-<id>).
napi_pids() {
    local dev
    for dev in "$@"; do
        ps -eo pid=,comm= | awk -v d="napi/$dev-" 'index($2, d) == 1 {print $1}'
    done
}

SECRET=bench-$RANDOM$RANDOM
PORT=$(( 40000 + $$ % 5000 ))
MPORT=$(( PORT + 1 ))

cpu_ticks() { # pids...: their user + system ticks, summed
    local p t=0
    for p in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done
    echo "$t"
}
pin() { # cpu pids...: pinned (PIN=1) and reniced (NICE)
    local c=$1 p; shift
    for p in "$@"; do
        [ "$PIN" = 1 ] && taskset -pc "$c" "$p" >/dev/null
        renice -n "$NICE" -p "$p" >/dev/null
    done
    return 0
}
# Every place on the way where a datagram can be dropped, as counters (one line each,
# "name value"), read before and after a run; the run reports their growth beside what the
# load generator lost, and what none of them explains.
#   veth_tx: the veths' transmit drops, all four ends (the receiving end's ring of 256 full,
#     a failed redirect, XDP_TX and redirect-into errors: veth counts all of them there);
#   veth_rx: drops in the veths' receive (NAPI rx drops, XDP_DROP), all four ends;
#   backlog: softnet backlog overflows (box-wide, /proc/net/softnet_stat);
#   relay_sock: UDP receive errors in this (root) namespace: Tern's sockets overflowing
#     (box-wide in this namespace: other work on a shared box counts too);
#   endpoint_sock: UDP receive errors in the load generator's namespaces (its sockets full)
#     and datagrams to a port nobody listened on.
drop_counters() {
    local ns
    { ip -j -s link show "$CIF"; [ "$PIF" = "$CIF" ] || ip -j -s link show "$PIF"
      ip -n "$CN" -j -s link show "${CIF}x"; [ "$PIF" = "$CIF" ] || ip -n "$PN" -j -s link show "${PIF}x"; } |
        python3 -c 'import json, sys
print("veth_tx", sum(json.loads(l)[0]["stats64"]["tx"]["dropped"] for l in sys.stdin if l.strip()))'
    { ethtool -S "$CIF"; [ "$PIF" = "$CIF" ] || ethtool -S "$PIF"
      ip netns exec "$CN" ethtool -S "${CIF}x"; [ "$PIF" = "$CIF" ] || ip netns exec "$PN" ethtool -S "${PIF}x"; } |
        awk '$1 ~ /^rx_queue_[0-9]+_(drops|xdp_drops):$/ {t += $2} END {print "veth_rx", t + 0}'
    python3 -c 'print("backlog", sum(int(l.split()[1], 16) for l in open("/proc/net/softnet_stat")))'
    # Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors ...: InErrors includes
    # RcvbufErrors.
    # shellcheck disable=SC2016
    awk '/^Udp:/ && $2 ~ /^[0-9]/ {print "relay_sock", $4}' /proc/net/snmp
    for ns in $(printf '%s\n' "$CN" "$PN" | sort -u); do
        # shellcheck disable=SC2016
        ip netns exec "$ns" awk '/^Udp:/ && $2 ~ /^[0-9]/ {print "endpoint_sock", $3 + $4}' /proc/net/snmp
    done
}

start_tern() { # mode
    cat > "$OUT/tern-$1.toml" <<EOT
[turn]
listen = ["$S:$PORT"]
relay_ip = ["$R"]
min_port = 46000
max_port = 47999
auth_secrets = ["$SECRET"]
allowed_peer_ranges = ["$P/32"]
workers = 1
user_quota = 10000
max_bytes_per_sec = 0
kernel_fast_path = "$1"
kernel_fast_path_interfaces = [$IFACES_TOML]
[api]
enabled = false
[metrics]
listen = "127.0.0.1:$MPORT"
[log]
level = "info"
[daemon]
pid_file = "$OUT/tern.pid"
EOT
    "$TERN_BIN" serve --config "$OUT/tern-$1.toml" 2>>"$OUT/tern-$1.log" &
    TERN_PID=$!
    for _ in $(seq 100); do
        curl -sf "127.0.0.1:$MPORT/metrics" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "tern did not start: $(cat "$OUT/tern-$1.log")" >&2; exit 1
}

stop_tern() { kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; TERN_PID=; }

metric() { curl -s "127.0.0.1:$MPORT/metrics" | awk -v k="$1" 'index($0, k" ") == 1 {print $2+0}'; }

PROG_STATS=$(cat <<'PY'
import json, sys
for p in json.load(sys.stdin):
    if p.get("name") in ("tern_tc_ingress", "tern_xdp") and p.get("run_cnt"):
        ns = p["run_time_ns"] / p["run_cnt"]
        print(f"{p['name']}: {p['run_cnt']} runs, {ns:.0f} ns each")
PY
)

printf "run\tmode\ttarget_pps\tsent\trelayed_pps\tloss_pct\ttern_cpu_s\tloadgen_cpu_s\ttern_us_per_pkt\tpps_per_core\trelay_napi_cpu_s\tends_napi_cpu_s\trelay_us_per_fwd\tfwd_per_relay_cpu_s\tveth_tx_drops\tendpoint_sock_drops\tlosses\tcounters\n" > "$OUT/results.tsv"
run() { # name mode rate
    local name=$1 mode=$2 rate=$3
    start_tern "$mode"
    threaded
    local relay_napi
    # shellcheck disable=SC2086
    relay_napi=$(napi_pids $IFACES | tr '\n' ' ')
    [ -n "$relay_napi" ] || { echo "no NAPI threads on $CIF/$PIF" >&2; exit 1; }
    # shellcheck disable=SC2046,SC2086
    pin 0 $(ls "/proc/$TERN_PID/task") $relay_napi
    # NAPI runs as softirq (above every task) unless threaded: its threads get a real-time
    # priority, or a busy box delays them until the veth ring overflows.
    for p in $relay_napi; do chrt -f -p 50 "$p"; done
    local ends_napi=
    if [ "$ENDS_THREADED" = 1 ]; then
        # shellcheck disable=SC2046,SC2086
        ends_napi=$(napi_pids $(printf '%sx\n' $IFACES) | tr '\n' ' ')
        # shellcheck disable=SC2086
        pin 1 $ends_napi
        for p in $ends_napi; do chrt -f -p 50 "$p"; done
    fi
    if [ "$mode" = xdp ]; then
        for dev in $IFACES; do ip -d link show "$dev"; done | grep -o "xdp[a-z]* .*prog/xdp id [0-9]*\|xdp[a-z]*" | sort | uniq -c > "$OUT/$name.xdp-mode" || true
        for dev in $IFACES; do ethtool -S "$dev"; done | grep -i xdp > "$OUT/$name.xdp-before" || true
    fi
    drop_counters > "$OUT/$name.drops-before"
    local t0 r0 e0 e1; t0=$(cpu_ticks "$TERN_PID")
    # shellcheck disable=SC2086
    r0=$(cpu_ticks $relay_napi)
    # shellcheck disable=SC2086
    e0=$(cpu_ticks $ends_napi)
    local pincmd=(nice -n "$NICE")
    [ "$PIN" = 1 ] && pincmd+=(taskset -c 1)
    /usr/bin/time -f "%U %S" -o "$OUT/$name.time" "${pincmd[@]}" ip netns exec "$CN" "$LOADGEN_BIN" \
        --server "$S:$PORT" --secret "$SECRET" --allocations "$ALLOCS" --rate "$rate" \
        --duration "$SECS" --packets 100000000 --size "$SIZE" --local-ip "$C" \
        --peer-ip "$P" --peer-netns "$PN" --user-prefix "$name" > "$OUT/$name.json"
    local t1 r1; t1=$(cpu_ticks "$TERN_PID")
    # shellcheck disable=SC2086
    r1=$(cpu_ticks $relay_napi)
    # shellcheck disable=SC2086
    e1=$(cpu_ticks $ends_napi)
    drop_counters > "$OUT/$name.drops-after"
    if [ "$mode" = xdp ]; then
        for dev in $IFACES; do ethtool -S "$dev"; done | grep -i xdp > "$OUT/$name.xdp-after" || true
    fi
    # The program's own run time (kernel.bpf_stats_enabled): ns per invocation.
    if [ "$mode" != off ] && command -v bpftool >/dev/null; then
        bpftool prog show -j 2>/dev/null | python3 -c "$PROG_STATS" > "$OUT/$name.prog" || true
        cat "$OUT/$name.prog"
    fi
    sleep 1.2 # two housekeepings: the maps' counters reach the metrics
    local c2p p2c fc2p fp2c
    c2p=$(metric 'tern_relay_packets_total{direction="client_to_peer",transport="udp"}')
    p2c=$(metric 'tern_relay_packets_total{direction="peer_to_client",transport="udp"}')
    fc2p=$(metric 'tern_fastpath_packets_total{direction="client_to_peer"}')
    fp2c=$(metric 'tern_fastpath_packets_total{direction="peer_to_client"}')
    grep -i "fast path" "$OUT/tern-$mode.log" | tail -1 | cut -c1-200 || true
    stop_tern
    python3 - "$OUT/$name.json" "$OUT/$name.time" "$name" "$mode" "$rate" "$t0" "$t1" \
        "$c2p" "$p2c" "$fc2p" "$fp2c" "$SECS" "$(getconf CLK_TCK)" "$r0" "$r1" "$OUT/$name.drops-before" "$OUT/$name.drops-after" "$((e1 - e0))" \
        >> "$OUT/results.tsv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
u, s = map(float, open(sys.argv[2]).read().split()[-2:])
name, mode, rate = sys.argv[3], sys.argv[4], sys.argv[5]
t0, t1 = int(sys.argv[6]), int(sys.argv[7])
c2p, p2c, fc2p, fp2c = (int(float(x or 0)) for x in sys.argv[8:12])
hz = int(sys.argv[13])
tern_cpu = (t1 - t0) / hz
lg_cpu = u + s
relayed = j["relayed_packets"]
cores = (tern_cpu + lg_cpu) / max(j["duration_s"], 1e-9)
# What Tern counted against what the load generator sent, and what its peer received and
# echoed. Under overload user space loses datagrams before Tern reads them (not counted),
# the fast path after it forwarded them (counted: the peer's socket overflowed).
ok = c2p == j["sent"] == j["peer_received"] and p2c == j["peer_sent"]
counters = (f"c2p {c2p} (fast {fc2p}) / sent {j['sent']} / peer_received {j['peer_received']}; "
            f"p2c {p2c} (fast {fp2c}) / peer_sent {j['peer_sent']}: {'all equal' if ok else 'differ'}")
us = 1e6 * tern_cpu / max(relayed, 1)
r0, r1, ends = int(sys.argv[14]), int(sys.argv[15]), int(sys.argv[18])
def counters_in(path):
    c = {}
    for line in open(path):
        k, v = line.split()
        c[k] = c.get(k, 0) + int(v)
    return c
before, after = counters_in(sys.argv[16]), counters_in(sys.argv[17])
dropped = {k: after.get(k, 0) - before.get(k, 0) for k in after}
# Lost both ways: client datagrams the peer never got, peer datagrams the client never got.
lost = (j["sent"] - j["peer_received"]) + (j["peer_sent"] - j["received"])
explained = sum(dropped.values())
losses = (f"lost {lost}: " + ", ".join(f"{k} {v}" for k, v in dropped.items())
          + f"; unexplained {lost - explained}")
relay_napi, ends_napi = (r1 - r0) / hz, ends / hz
relay_cpu = tern_cpu + relay_napi
# Per packet the relay forwarded (its own counters): what it did, whether or not the load
# generator's sockets then kept up (flat out they overflow, after the relay).
relay_us = 1e6 * relay_cpu / max(c2p + p2c, 1)
print(f"{name}\t{mode}\t{rate}\t{j['sent']}\t{j['relayed_pps']}\t{j['loss_pct']}\t{tern_cpu:.2f}\t{lg_cpu:.2f}\t{us:.2f}\t{relayed / max(j['duration_s'], 1e-9) / max(cores, 1e-9):.0f}"
      f"\t{relay_napi:.2f}\t{ends_napi:.2f}\t{relay_us:.2f}\t{(c2p + p2c) / max(relay_cpu, 1e-9):.0f}\t{dropped['veth_tx']}\t{dropped['endpoint_sock']}\t{losses}\t{counters}")
PY
    tail -1 "$OUT/results.tsv"
}

for round in $(seq "$ROUNDS"); do
    run "user-peak-$round" off 0
    run "tc-peak-$round" tc 0
    run "xdp-peak-$round" xdp 0
    # loadgen's rate is client sends per second; relayed counts both directions.
    U=$(awk -F'\t' -v r="user-peak-$round" '$1 == r {printf "%d", $5 / 2}' "$OUT/results.tsv")
    run "user-at-user-peak-$round" off "$U"
    run "tc-at-user-peak-$round" tc "$U"
    run "xdp-at-user-peak-$round" xdp "$U"
done
python3 - "$OUT/results.tsv" <<'PY'
import csv, sys
from collections import defaultdict
runs = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    runs[r["run"].rsplit("-", 1)[0]].append(r)
def mean(kind, col):
    v = [float(r[col]) for r in runs[kind]]
    return sum(v) / len(v)
u_pps, u_core = mean("user-peak", "relayed_pps"), mean("user-peak", "pps_per_core")
u_relay = mean("user-peak", "fwd_per_relay_cpu_s")
for kind, label in (("tc-peak", "TC"), ("xdp-peak", "XDP")):
    pps, core = mean(kind, "relayed_pps"), mean(kind, "pps_per_core")
    relay = mean(kind, "fwd_per_relay_cpu_s")
    print(f"{label}/user relayed packets/s: {pps / u_pps:.2f}x; forwarded per relay CPU-second (Tern + its NAPI threads): "
          f"{relay / u_relay:.2f}x; per core of Tern + load generator processes: {core / u_core:.2f}x")
for sfx, what in (("peak", "flat out"), ("at-user-peak", "all at the user-space peak rate")):
    ks = [f"{m}-{sfx}" for m in ("user", "tc", "xdp")]
    us = [mean(k, "relay_us_per_fwd") for k in ks]
    print(f"relay-side CPU per forwarded packet (Tern + its NAPI threads), {what}, user / TC / XDP: "
          + " / ".join(f"{u:.2f}" for u in us) + f" us; per relay core TC {us[0] / us[1]:.2f}x, XDP {us[0] / us[2]:.2f}x")
print(f"XDP/TC relayed packets/s: {mean('xdp-peak', 'relayed_pps') / mean('tc-peak', 'relayed_pps'):.2f}x; "
      f"per core: {mean('xdp-peak', 'pps_per_core') / mean('tc-peak', 'pps_per_core'):.2f}x")
print("Tern process CPU per relayed packet, user / TC / XDP: "
      + " / ".join(f"{mean(k, 'tern_us_per_pkt'):.2f}" for k in ("user-peak", "tc-peak", "xdp-peak")) + " us")
for kind in ("user-at-user-peak", "tc-at-user-peak", "xdp-at-user-peak"):
    for r in runs[kind]:
        print(f"{r['run']} ({r['mode']}): loss {r['loss_pct']}% ({r['losses']}), counters: {r['counters']}")
for kind in ("user-peak", "tc-peak", "xdp-peak"):
    for r in runs[kind]:
        print(f"{r['run']} ({r['mode']}, flat out): {r['losses']}")
PY
echo "results: $OUT/results.tsv (box load: $(cut -d' ' -f1-3 /proc/loadavg))"
