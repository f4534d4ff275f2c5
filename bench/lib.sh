# shellcheck shell=bash
# Helpers shared by the bench scripts (sourced, not run): the processes a script started and
# their cleanup on exit, and a free loopback port. Only what is listed in PIDS (processes) and
# PGIDS (process groups started with `in_group`) is stopped; nothing is stopped by name.

PIDS=()
PGIDS=()

# Runs "$@" in the background as a process group of its own (job control: `set -m`), so that
# cleanup stops everything it started (a load client's `timeout`, node's forked workers), not
# only the subshell. The group's id, its leader's PID, is appended to PGIDS.
in_group() {
    set -m
    "$@" &
    PGIDS+=("$!")
}

# Signals every listed group, the last started first (the loads before the server they load),
# gives each up to 10 s and then kills what is left of it; then the listed PIDs.
cleanup() {
    local i pg
    for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do
        pg=${PGIDS[i]}
        kill -TERM -- "-$pg" 2>/dev/null || continue
        for _ in $(seq 1 100); do
            kill -0 -- "-$pg" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pg" 2>/dev/null || true
        wait "$pg" 2>/dev/null || true
    done 2>/dev/null # job control's "Terminated" notices
    for pid in "${PIDS[@]-}"; do
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
        fi
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
