#!/usr/bin/env bash
# Builds every fuzz target and runs each, one after another, for a bounded time.
#
#   fuzz/run.sh                      # every target, FUZZ_SECS (default 60) seconds each
#   FUZZ_SECS=300 fuzz/run.sh turn_core config
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). libFuzzer needs nightly rustc
# flags; on a stable toolchain RUSTC_BOOTSTRAP=1 allows them (set here).
# Environment: FUZZ_SECS (per target), FUZZ_JOBS (cargo build jobs, default 1),
# FUZZ_TIMEOUT (seconds one input may take before it counts as a hang, default 10),
# FUZZ_RSS_MB (memory limit, default 2048), CARGO_TARGET_DIR (default fuzz/target).
# Corpora grow in fuzz/corpus/<target>, crashes land in fuzz/artifacts/<target>, logs in
# fuzz/logs/<target>.log. Exit status 1 if any target found a crash, hang or OOM.
set -uo pipefail

cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECS:-60}
jobs=${FUZZ_JOBS:-1}
timeout=${FUZZ_TIMEOUT:-10}
rss=${FUZZ_RSS_MB:-2048}

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# One build for all targets: debug assertions and overflow checks on (-a), AddressSanitizer.
if ! CARGO_BUILD_JOBS=$jobs cargo fuzz build -a --codegen-units 16; then
    echo "run.sh: build failed" >&2
    exit 2
fi

mkdir -p logs
failed=0
printf '%-16s %8s %12s %10s %8s %8s %8s  %s\n' target secs execs exec/s cov ft corpus result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    extra=()
    [ -d "seeds/$t" ] && extra+=("seeds/$t")
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict") || dict=()
    log="logs/$t.log"
    # Extra corpus dirs are only read; new inputs go to corpus/$t. -max_total_time
    # bounds the run; the outer timeout is a backstop should libFuzzer not stop.
    timeout --signal=INT --kill-after=30 $((secs + 120)) \
        cargo fuzz run -a --codegen-units 16 "$t" "corpus/$t" "${extra[@]}" -- \
        -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss" \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" "${dict[@]}" \
        >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    result=ok
    if [ $rc -ne 0 ]; then
        failed=1
        crash=$(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$log" | tail -1)
        result="FAILED rc=$rc ${crash:-(see $log)}"
    fi
    printf '%-16s %8s %12s %10s %8s %8s %8s  %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
exit $failed
