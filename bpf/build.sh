#!/usr/bin/env bash
# Rebuilds bpf/tern_fastpath.bpf.o from its source (the object is committed and embedded
# by src/fastpath/, so building Tern needs no BPF toolchain). Needs clang (Debian: clang)
# and the kernel UAPI headers (linux-libc-dev, which build-essential pulls in).
# `bpf/build.sh --check` rebuilds into a temporary file and fails if it differs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CLANG="${CLANG:-clang}"
arch_inc="/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
out=tern_fastpath.bpf.o
if [ "${1:-}" = "--check" ]; then
    out="$(mktemp --suffix=.bpf.o)"
    trap 'rm -f "$out"' EXIT
fi
# -g: BTF for the maps (the loader reads their types from it). Debug paths are made
# relative so the object does not depend on where the repository is checked out.
"$CLANG" -target bpf -O2 -g -Wall -Werror -I"$arch_inc" \
    -fdebug-prefix-map="$PWD"=. -c tern_fastpath.bpf.c -o "$out"
if [ "${1:-}" = "--check" ]; then
    if cmp -s "$out" tern_fastpath.bpf.o; then
        echo "bpf/tern_fastpath.bpf.o matches its source"
    else
        echo "bpf/tern_fastpath.bpf.o is stale: run bpf/build.sh and commit the object" >&2
        exit 1
    fi
fi
