#!/bin/sh
# Builds the Debian package target/debian/tern_VERSION-REV_ARCH.deb with cargo-deb
# (`cargo install cargo-deb --locked --version 3.8.0`); the metadata is
# [package.metadata.deb] in Cargo.toml, the maintainer scripts are in this directory.
#
#   debian/build.sh               cargo build --release, then package
#   debian/build.sh --no-build    package target/release/tern as it is (CI, after the tests)
#   Other arguments go to `cargo deb` (e.g. --deb-revision 2, --output DIR).
#
# /etc/tern/tern.toml is written by `deploy/install.sh --root` into a staging tree, so the
# package ships exactly the config install.sh writes: the example with
# secret_file = ["/etc/tern/secret"]. The secret itself is made on the server by postinst.
set -eu
cd "$(dirname "$0")/.."

build=yes
if [ "${1:-}" = "--no-build" ]; then
    build=no
    shift
fi
command -v cargo-deb >/dev/null || {
    echo "debian/build.sh: cargo-deb not found: cargo install cargo-deb --locked --version 3.8.0" >&2
    exit 1
}
if [ "$build" = yes ]; then
    cargo build --release --locked --bin tern
fi
target=${CARGO_TARGET_DIR:-target}
binary="$target/release/tern"
[ -x "$binary" ] || { echo "debian/build.sh: no $binary (build it, or drop --no-build)" >&2; exit 1; }

# cargo-deb maps target/release/ to the real target directory (CARGO_TARGET_DIR included).
stage="$target/release/deb-stage"
rm -rf "$stage"
deploy/install.sh --root "$stage" --binary "$binary" >/dev/null
rm -f "$stage/etc/tern/secret"

# --strip: the release profile keeps line tables, which a package should not ship.
cargo deb --no-build --strip "$@"
