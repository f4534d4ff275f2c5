#!/usr/bin/env bash
# Builds the Debian package and checks it on this machine (issue 16): install with apt-get,
# files with their owners and modes, the config passes `tern check-config`, the unit passes
# `systemd-analyze verify`, the daemon answers /healthz, an edited config survives a
# reinstall, `remove` keeps config and secret, `purge` removes them and the user; lintian
# reports no error. Ends with the package purged and no tern process left; prints PASS or
# FAIL and exits 0 or 1.
#
#   tests/deb/verify.sh              cargo build --release, package, check
#   tests/deb/verify.sh --no-build   package target/release/tern as built (.ci/run, after the
#                                    test suite built it)
#
# Needs root, cargo-deb, lintian, systemd-analyze (package systemd). Refuses to run where
# tern is already installed (package, user or /etc/tern): it would purge them.
# The daemon binds loopback ephemeral ports only (the installed config's 3478/8080/9641 are
# overridden through TERN_SECTION__KEY variables).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
build_args=()
[ "${1:-}" = "--no-build" ] && build_args=(--no-build)

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
step() { echo "--- [$(($(date +%s) - start))s] $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
for cmd in cargo-deb lintian systemd-analyze apt-get setpriv; do
    command -v "$cmd" >/dev/null || fail "$cmd not found"
done
if dpkg-query -W -f='${Status}' tern 2>/dev/null | grep -q 'installed\|config-files'; then
    fail "package tern is already on this machine; not touching it"
fi
getent passwd tern >/dev/null && fail "user tern exists (a deploy/install.sh install?); not touching it"
[ -e /etc/tern ] && fail "/etc/tern exists; not touching it"

installed=no
daemon_pid=""
work=$(mktemp -d)
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    rc=$?
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ "$installed" = yes ]; then
        rm -rf /run/systemd/system/tern.service.d
        apt-get purge -y -q tern >/dev/null 2>&1 || echo "cleanup: apt-get purge tern failed" >&2
    fi
    rm -rf "$work"
    if [ "$rc" = 0 ]; then
        echo "PASS: Debian package verified in $(($(date +%s) - start))s"
    else
        echo "FAIL: Debian package verification (exit $rc)" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# owner:group and octal mode of a path.
expect_stat() {
    local got
    got=$(stat -c '%U:%G %a' "$1") || fail "$1 is missing"
    [ "$got" = "$2" ] || fail "$1 is $got, expected $2"
}

step "building the package: debian/build.sh ${build_args[*]}"
debian/build.sh "${build_args[@]}"
version=$(dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null || sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog)
cargo_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ "${version%-*}" = "$cargo_version" ] || fail "debian/changelog is at $version, Cargo.toml at $cargo_version"
deb=$(ls target/debian/tern_"${version}"_*.deb) || fail "no target/debian/tern_${version}_*.deb"
echo "package: $deb ($(stat -c %s "$deb") bytes)"
dpkg-deb -f "$deb" Depends

step "lintian"
lintian_out=$(lintian "$deb" 2>/dev/null || true)
echo "${lintian_out:-lintian: no tags}"
if grep -q '^E:' <<<"$lintian_out"; then
    fail "lintian reports errors"
fi

step "apt-get install ./$deb"
installed=yes
apt-get install -y -q "./$deb"
dpkg-query -W -f='${Status}\n' tern | grep -q '^install ok installed$' || fail "not installed"

step "files, owners and modes"
expect_stat /usr/bin/tern "root:root 755"
expect_stat /lib/systemd/system/tern.service "root:root 644"
cmp -s /lib/systemd/system/tern.service systemd/tern.service ||
    fail "the installed unit differs from systemd/tern.service"
expect_stat /etc/tern "root:tern 750"
expect_stat /etc/tern/tern.toml "root:tern 640"
expect_stat /etc/tern/secret "tern:tern 600"
expect_stat /usr/share/tern/tern.example.toml "root:root 644"
cmp -s /usr/share/tern/tern.example.toml config/tern.example.toml || fail "example differs"
expect_stat /usr/share/tern/grafana/tern.json "root:root 644"
expect_stat /usr/share/tern/certbot-deploy-hook.sh "root:root 755"
expect_stat /usr/share/doc/tern/README.md "root:root 644"
expect_stat /usr/share/doc/tern/metrics.md "root:root 644"
dpkg-query -W -f='${Conffiles}\n' tern | grep -q '^ /etc/tern/tern.toml ' ||
    fail "/etc/tern/tern.toml is not a conffile"
grep -qx 'secret_file = \["/etc/tern/secret"\]' /etc/tern/tern.toml ||
    fail "the installed config does not name /etc/tern/secret"
secret=$(cat /etc/tern/secret)
[ "${#secret}" = 44 ] || fail "secret is ${#secret} characters, expected 44 (32 bytes in base64)"
IFS=: read -r _ _ uid _ _ home shell < <(getent passwd tern)
[ "$uid" -lt 1000 ] || fail "tern is uid $uid, not a system user"
[ "$home:$shell" = "/nonexistent:/usr/sbin/nologin" ] || fail "tern has home $home, shell $shell"
echo "user tern: uid $uid; ldd /usr/bin/tern:"
ldd /usr/bin/tern | sed 's/^/  /'

step "tern check-config (as root, and as tern: the daemon can read config and secret)"
tern check-config --config /etc/tern/tern.toml
setpriv --reuid=tern --regid=tern --init-groups -- \
    /usr/bin/tern check-config --config /etc/tern/tern.toml >/dev/null ||
    fail "check-config as user tern"

step "systemd-analyze verify /lib/systemd/system/tern.service"
verify_out=$(systemd-analyze verify /lib/systemd/system/tern.service 2>&1) ||
    fail "systemd-analyze verify: $verify_out"
[ -z "$verify_out" ] || fail "systemd-analyze verify warns: $verify_out"

# The daemon on loopback ephemeral ports; the rest is the installed config.
overrides=(
    'TERN_TURN__LISTEN=["127.0.0.1:0"]'
    'TERN_TURN__RELAY_IP=["127.0.0.1"]'
    'TERN_TLS__LISTEN=[]'
    'TERN_API__LISTEN=127.0.0.1:0'
    'TERN_METRICS__LISTEN=127.0.0.1:0'
    'TERN_LOG__FORMAT=json'
)

# HTTP status line of GET $2 on 127.0.0.1:$1, with bash's /dev/tcp (no curl needed).
http_status() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    IFS= read -r -t 10 line <&3 || line=""
    exec 3>&-
    printf '%s\n' "${line%$'\r'}"
}

# The metrics port from the daemon's "metrics listening" log line (JSON) in file $1.
metrics_port() {
    { grep 'metrics listening' "$1" || true; } | sed -n 's/.*"addr":"127\.0\.0\.1:\([0-9][0-9]*\)".*/\1/p' | tail -1
}

if [ "$(ps -o comm= -p 1)" = systemd ]; then
    step "systemd is PID 1: systemctl start tern (ports overridden by a runtime drop-in)"
    mkdir -p /run/systemd/system/tern.service.d
    {
        echo "[Service]"
        for o in "${overrides[@]}"; do echo "Environment='$o'"; done
    } >/run/systemd/system/tern.service.d/verify.conf
    systemctl daemon-reload
    since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl start tern.service || fail "systemctl start tern: $(journalctl -u tern --since "$since" --no-pager)"
    journalctl -u tern --since "$since" --no-pager >"$work/log"
    port=$(metrics_port "$work/log")
    [ -n "$port" ] || fail "no metrics listening line: $(cat "$work/log")"
    status=$(http_status "$port" /healthz)
    [ "$status" = "HTTP/1.1 200 OK" ] || fail "/healthz answered '$status'"
    echo "/healthz on 127.0.0.1:$port: $status (unit active: $(systemctl is-active tern))"
    systemctl stop tern.service
    rm -rf /run/systemd/system/tern.service.d
    systemctl daemon-reload
else
    step "systemd is not PID 1 ($(ps -o comm= -p 1)): the installed binary as user tern by hand"
    env "${overrides[@]}" TERN_DAEMON__PID_FILE="" \
        setpriv --reuid=tern --regid=tern --init-groups -- \
        /usr/bin/tern serve --config /etc/tern/tern.toml 2>"$work/log" &
    daemon_pid=$!
    port=""
    for _ in $(seq 100); do
        port=$(metrics_port "$work/log")
        [ -n "$port" ] && break
        kill -0 "$daemon_pid" 2>/dev/null || fail "tern serve exited: $(cat "$work/log")"
        sleep 0.2
    done
    [ -n "$port" ] || fail "no metrics listening line in 20 s: $(cat "$work/log")"
    user=$(ps -o user= -p "$daemon_pid")
    [ "$user" = tern ] || fail "the daemon runs as $user"
    status=$(http_status "$port" /healthz)
    [ "$status" = "HTTP/1.1 200 OK" ] || fail "/healthz answered '$status'"
    echo "/healthz on 127.0.0.1:$port: $status (pid $daemon_pid, user $user)"
    # SIGTERM drains; with nothing to drain the daemon exits 0 at once.
    kill -TERM "$daemon_pid"
    for _ in $(seq 100); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$daemon_pid" 2>/dev/null && fail "tern did not exit within 20 s of SIGTERM"
    rc=0
    wait "$daemon_pid" || rc=$?
    daemon_pid=""
    [ "$rc" = 0 ] || fail "tern exited $rc after SIGTERM: $(tail -5 "$work/log")"
    echo "SIGTERM: exited 0"
fi

step "edit the config, reinstall: the edit and the secret survive"
sed -i 's/^# realm = "tern"$/realm = "verify.example.org"/' /etc/tern/tern.toml
grep -qx 'realm = "verify.example.org"' /etc/tern/tern.toml || fail "could not edit the config"
apt-get install -y -q --reinstall "./$deb"
grep -qx 'realm = "verify.example.org"' /etc/tern/tern.toml || fail "reinstall lost the config edit"
[ "$(cat /etc/tern/secret)" = "$secret" ] || fail "reinstall replaced the secret"
expect_stat /etc/tern/tern.toml "root:tern 640"
expect_stat /etc/tern/secret "tern:tern 600"
tern check-config --config /etc/tern/tern.toml >/dev/null

step "upgrade to revision 2 over the edited config: the edit survives"
debian/build.sh --no-build --deb-revision 2 --output "$work/"
deb2=$(ls "$work"/tern_*-2_*.deb)
apt-get install -y -q "$deb2"
dpkg-query -W -f='${Version}\n' tern | grep -q -- '-2$' || fail "revision 2 not installed"
grep -qx 'realm = "verify.example.org"' /etc/tern/tern.toml || fail "upgrade lost the config edit"
[ "$(cat /etc/tern/secret)" = "$secret" ] || fail "upgrade replaced the secret"

step "a config that fails check-config: postinst warns and the package still configures"
sed -i 's/^# total_quota = 10000$/total_quota = 0/' /etc/tern/tern.toml
tern check-config --config /etc/tern/tern.toml >/dev/null 2>&1 && fail "total_quota = 0 passed check-config"
out=$(apt-get install -y -q --reinstall "$deb2" 2>&1)
grep -q 'fails .tern check-config.: .*turn.total_quota' <<<"$out" || fail "no check-config warning: $out"
dpkg-query -W -f='${Status}\n' tern | grep -q '^install ok installed$' || fail "not configured"
sed -i 's/^total_quota = 0$/# total_quota = 10000/' /etc/tern/tern.toml
tern check-config --config /etc/tern/tern.toml >/dev/null

step "apt-get remove: binary gone, config, secret and user kept"
apt-get remove -y -q tern
[ ! -e /usr/bin/tern ] || fail "/usr/bin/tern is still there"
[ ! -e /lib/systemd/system/tern.service ] || fail "the unit is still there"
grep -qx 'realm = "verify.example.org"' /etc/tern/tern.toml || fail "remove lost the config"
[ "$(cat /etc/tern/secret)" = "$secret" ] || fail "remove lost the secret"
getent passwd tern >/dev/null || fail "remove deleted the user"
dpkg-query -W -f='${Status}\n' tern | grep -q 'config-files' || fail "not in config-files state"

step "apt-get purge: config, secret, usage store, user and group gone"
# The usage store as the unit's StateDirectory=tern leaves it after a run under systemd.
install -d -o tern -g tern -m 0750 /var/lib/tern
install -o tern -g tern -m 0640 /dev/null /var/lib/tern/usage.db
apt-get purge -y -q tern
installed=no
[ ! -e /var/lib/tern ] || fail "/var/lib/tern is still there: $(ls -A /var/lib/tern)"
[ ! -e /etc/tern ] || fail "/etc/tern is still there: $(ls -A /etc/tern)"
getent passwd tern >/dev/null && fail "user tern is still there"
getent group tern >/dev/null && fail "group tern is still there"
if dpkg-query -W -f='${Status}' tern 2>/dev/null | grep -q 'installed\|config-files'; then
    fail "dpkg still knows tern"
fi
exit 0
