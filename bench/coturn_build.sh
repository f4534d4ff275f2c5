#!/usr/bin/env bash
# Builds coturn's turnserver from a source tree or a git dir into the bench work directory
# (bench/out/coturn-src-build, never committed) and prints the binary's path on stdout.
# The source comes from COTURN_SRC (a source tree) or COTURN_GIT (a bare git dir; its HEAD
# is exported with `git archive`). Neither set: prints nothing and exits 3, so callers skip
# the from-source anchor with a message. Needs cmake libevent-dev libssl-dev
# libmicrohttpd-dev (apt). A build whose source revision did not change is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${COTURN_WORK:-$PWD/bench/out/coturn-src-build}
if [ -z "${COTURN_SRC:-}" ] && [ -z "${COTURN_GIT:-}" ]; then
    echo "coturn from source: set COTURN_SRC (source tree) or COTURN_GIT (git dir) to build it" >&2
    exit 3
fi
for tool in cmake make cc; do
    command -v "$tool" >/dev/null || { echo "coturn from source: missing $tool (apt-get install cmake build-essential libevent-dev libssl-dev libmicrohttpd-dev)" >&2; exit 3; }
done
mkdir -p "$WORK"
if [ -n "${COTURN_GIT:-}" ]; then
    rev=$(git --git-dir="$COTURN_GIT" rev-parse HEAD)
    if [ "$(cat "$WORK/rev" 2>/dev/null)" != "$rev" ]; then
        rm -rf "$WORK/src" "$WORK/build"
        mkdir -p "$WORK/src"
        git --git-dir="$COTURN_GIT" archive HEAD | tar -x -C "$WORK/src"
        echo "$rev" >"$WORK/rev"
    fi
    SRC=$WORK/src
else
    SRC=$COTURN_SRC
fi
BIN=$WORK/build/bin/turnserver
if [ ! -x "$BIN" ]; then
    echo "coturn from source: building $SRC in $WORK/build (a few minutes)" >&2
    cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release >"$WORK/cmake.log" 2>&1 \
        || { echo "coturn cmake failed; see $WORK/cmake.log" >&2; exit 1; }
    cmake --build "$WORK/build" --target turnserver -j "$(nproc)" >"$WORK/build.log" 2>&1 \
        || { echo "coturn build failed; see $WORK/build.log" >&2; exit 1; }
fi
echo "$BIN"
