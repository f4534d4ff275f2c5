#!/bin/sh
# Opens exactly what Tern listens on, from its config: prints the rules `tern firewall`
# generates, asks, then applies them.
#
#   deploy/firewall.sh --ufw|--nftables|--firewalld [--config FILE] [--tern PATH] [--yes]
#
# --config defaults to /etc/tern/tern.toml, --tern to the tern on PATH or /usr/local/bin/tern.
# --yes applies without asking. nftables rules go to chain tern_input of table inet filter,
# with one jump to it from the input chain (added only when missing).
set -eu

BACKEND=""
CONFIG=/etc/tern/tern.toml
TERN=""
YES=no
while [ $# -gt 0 ]; do
    case "$1" in
        --ufw|--nftables|--firewalld) BACKEND="$1"; shift ;;
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --tern) TERN="${2:?--tern needs a path}"; shift 2 ;;
        --yes|-y) YES=yes; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "firewall.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$BACKEND" ] || { echo "firewall.sh: pick one of --ufw, --nftables, --firewalld" >&2; exit 2; }
if [ -z "$TERN" ]; then
    TERN=$(command -v tern || echo /usr/local/bin/tern)
fi
[ -x "$TERN" ] || { echo "firewall.sh: $TERN not found; pass --tern PATH" >&2; exit 1; }
[ -f "$CONFIG" ] || { echo "firewall.sh: config $CONFIG not found; pass --config FILE" >&2; exit 1; }

tool=${BACKEND#--}
case "$tool" in
    ufw) need=ufw ;;
    nftables) need=nft ;;
    firewalld) need=firewall-cmd ;;
esac
command -v "$need" >/dev/null || { echo "firewall.sh: $need is not installed" >&2; exit 1; }

RULES=$(mktemp)
trap 'rm -f "$RULES"' EXIT
"$TERN" firewall "$BACKEND" --config "$CONFIG" >"$RULES"

cat "$RULES"
echo
if [ "$YES" != yes ]; then
    printf 'Apply these %s rules now? [y/N] ' "$tool"
    answer=""
    if [ -r /dev/tty ]; then read -r answer </dev/tty || true; fi
    case "$answer" in
        y|Y|yes|YES) ;;
        *) echo "not applied"; exit 1 ;;
    esac
fi

case "$tool" in
    ufw)
        sh "$RULES"
        if ! ufw status | grep -q '^Status: active'; then
            echo "note: ufw is inactive; the rules take effect on \`ufw enable\` (allow SSH first: ufw allow OpenSSH)"
        fi
        ;;
    firewalld)
        sh "$RULES"
        ;;
    nftables)
        nft -f "$RULES"
        if ! nft list chain inet filter input | grep -q 'jump tern_input'; then
            nft insert rule inet filter input jump tern_input
        fi
        echo "applied. To keep them across reboots, save the rules and the jump, e.g.:"
        echo "  mkdir -p /etc/nftables.d && $TERN firewall --nftables --config $CONFIG >/etc/nftables.d/tern.nft"
        echo "  and in /etc/nftables.conf, after the inet filter table: include \"/etc/nftables.d/tern.nft\""
        echo "  plus, inside chain input: jump tern_input"
        ;;
esac
echo "done"
