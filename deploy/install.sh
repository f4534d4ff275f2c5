#!/bin/sh
# Installs Tern as a systemd service: binary, user `tern`, /etc/tern/tern.toml with a freshly
# generated REST secret in /etc/tern/secret (mode 0600), and the systemd unit.
#
# Idempotent: a second run leaves alone everything that already exists and that an operator
# may have edited (config, secret, unit); it only refreshes the binary and the shipped example.
#
#   deploy/install.sh                      build (cargo build --release) and install
#   deploy/install.sh --binary PATH        install a binary built elsewhere
#   deploy/install.sh --prefix /opt/tern   binary in PREFIX/bin (default /usr/local)
#   deploy/install.sh --root DIR           install into DIR as if it were / (no useradd,
#                                          chown or systemctl: for packaging and tests)
set -eu

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

ROOT=""
PREFIX=/usr/local
BINARY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --binary) BINARY="${2:?--binary needs a path}"; shift 2 ;;
        --binary=*) BINARY="${1#--binary=}"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi

SRC=$(cd "$(dirname "$0")/.." && pwd)
EXAMPLE="$SRC/config/tern.example.toml"
UNIT_SRC="$SRC/systemd/tern.service"
for f in "$EXAMPLE" "$UNIT_SRC"; do
    [ -f "$f" ] || { echo "install.sh: missing $f (run it from a Tern checkout)" >&2; exit 1; }
done

# Paths on the target system, and where they are written (under --root).
BIN="$PREFIX/bin/tern"
ETC=/etc/tern
CONFIG="$ETC/tern.toml"
SECRET="$ETC/secret"
UNIT=/etc/systemd/system/tern.service
SHARE="$PREFIX/share/tern"

say() { printf '%s\n' "$*"; }
as_system() { [ -z "$ROOT" ]; }

if [ -z "$BINARY" ]; then
    command -v cargo >/dev/null || { echo "install.sh: cargo not found; pass --binary PATH" >&2; exit 1; }
    say "building: cargo build --release"
    (cd "$SRC" && cargo build --release --locked)
    BINARY="${CARGO_TARGET_DIR:-$SRC/target}/release/tern"
fi
[ -x "$BINARY" ] || { echo "install.sh: $BINARY is not an executable" >&2; exit 1; }

# 1. The user (system installs only).
if as_system; then
    if ! getent passwd tern >/dev/null; then
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin tern
        say "created system user tern"
    fi
else
    say "--root: not creating user tern, not changing owners"
fi

# install_file SRC DEST MODE: copy unless DEST already has the same bytes; set the mode.
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        chmod "$3" "$2"
    else
        mkdir -p "$(dirname "$2")"
        tmp="$2.tmp.$$"
        cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$2"
        say "installed $2"
    fi
}

# 2. Binary and the reference config.
install_file "$BINARY" "$ROOT$BIN" 0755
install_file "$EXAMPLE" "$ROOT$SHARE/tern.example.toml" 0644

# 3. /etc/tern: root-owned, readable by group tern.
mkdir -p "$ROOT$ETC"
chmod 0750 "$ROOT$ETC"
as_system && chown root:tern "$ETC"

# 4. The secret: generated once, never replaced.
if [ ! -e "$ROOT$SECRET" ]; then
    (
        umask 077
        tmp="$ROOT$SECRET.tmp.$$"
        head -c 32 /dev/urandom | base64 >"$tmp"
        mv "$tmp" "$ROOT$SECRET"
    )
    say "generated a new REST API secret in $SECRET"
fi
chmod 0600 "$ROOT$SECRET"
as_system && chown tern:tern "$SECRET"

# 5. The config: the example with secret_file pointing at the secret; never replaced.
if [ ! -e "$ROOT$CONFIG" ]; then
    tmp="$ROOT$CONFIG.tmp.$$"
    sed "s|^# secret_file = \[\]\$|secret_file = [\"$SECRET\"]|" "$EXAMPLE" >"$tmp"
    if [ "$(grep -c "^secret_file = \[\"$SECRET\"\]\$" "$tmp")" != 1 ]; then
        rm -f "$tmp"
        echo "install.sh: config/tern.example.toml has no '# secret_file = []' line to set" >&2
        exit 1
    fi
    chmod 0640 "$tmp"
    mv "$tmp" "$ROOT$CONFIG"
    say "wrote $CONFIG"
fi
as_system && chown root:tern "$CONFIG"

# 6. The unit (written for the package's /usr/bin/tern) with this prefix's binary path; an
#    edited unit is left alone.
unit_tmp=$(mktemp)
trap 'rm -f "$unit_tmp"' EXIT
sed "s|/usr/bin/tern|$BIN|g" "$UNIT_SRC" >"$unit_tmp"
if [ ! -e "$ROOT$UNIT" ]; then
    install_file "$unit_tmp" "$ROOT$UNIT" 0644
elif ! cmp -s "$unit_tmp" "$ROOT$UNIT"; then
    say "kept your edited $UNIT; the shipped one differs (put local changes in"
    say "  /etc/systemd/system/tern.service.d/*.conf: \`systemctl edit tern\`, and remove"
    say "  $UNIT to take the shipped one)"
fi

# 7. Check what was installed, with the secret path as it is on this machine.
"$ROOT$BIN" check-config --config "$ROOT$CONFIG" --set "turn.secret_file=[\"$ROOT$SECRET\"]" >/dev/null

if as_system && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<NEXT

Tern is installed. Next steps:
  1. Edit $CONFIG: set turn.realm (your domain); behind 1:1 NAT (most clouds) set
     turn.external_ip to the public address. Check it: $BIN check-config --config $CONFIG
  2. Open the firewall for what it listens on (asks before applying):
       deploy/firewall.sh --ufw        (or --nftables, --firewalld)
  3. Start it now and at boot, and watch it:
       systemctl enable --now tern && systemctl status tern && journalctl -u tern -f
  4. Mint a credential to test with:
       $BIN credentials --secret-file $SECRET --user test
NEXT
