# Helpers shared by the bench scripts (sourced, not run): the PIDs a script started and
# their cleanup on exit, and a free loopback port. Only PIDs listed in PIDS are stopped.

PIDS=()
cleanup() {
    for pid in "${PIDS[@]-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# A port free on 127.0.0.1 for both UDP and TCP (a TURN listener takes both).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 20000))
        if ! ss -Hlnu "sport = :$p" | grep -q . && ! ss -Hlnt "sport = :$p" | grep -q .; then
            echo "$p"
            return
        fi
    done
    echo "no free port" >&2
    exit 1
}
