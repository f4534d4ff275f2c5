#!/usr/bin/env bash
# Rebuilds the fast path's BPF objects from their sources (the objects are committed and
# embedded by src/fastpath/, so building Tern needs no BPF toolchain):
#   tern_fastpath.bpf.o      TC program   (turn.kernel_fast_path = "tc")
#   tern_fastpath_xdp.bpf.o  XDP program  (turn.kernel_fast_path = "xdp")
# both from their .bpf.c and the shared tern_fastpath.h. Needs clang (Debian: clang) and the
# kernel UAPI headers (linux-libc-dev, which build-essential pulls in).
# `bpf/build.sh --check` rebuilds into temporary files and fails if any differs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CLANG="${CLANG:-clang}"
arch_inc="/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
check=0
[ "${1:-}" = "--check" ] && check=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
stale=0
for src in tern_fastpath.bpf.c tern_fastpath_xdp.bpf.c; do
    obj="${src%.c}.o"
    out="$obj"
    [ "$check" = 1 ] && out="$tmp/$obj"
    # -g: BTF for the maps (the loader reads their types from it). Debug paths are made
    # relative so the object does not depend on where the repository is checked out.
    "$CLANG" -target bpf -O2 -g -Wall -Werror -I"$arch_inc" \
        -fdebug-prefix-map="$PWD"=. -c "$src" -o "$out"
    if [ "$check" = 1 ]; then
        if cmp -s "$out" "$obj"; then
            echo "bpf/$obj matches its source"
        else
            echo "bpf/$obj is stale: run bpf/build.sh and commit the object" >&2
            stale=1
        fi
    fi
done
exit "$stale"
