#!/bin/sh
# certbot deploy hook for Tern: copies a renewed certificate where the unprivileged `tern`
# user can read it, then has the running daemon pick it up without dropping anyone
# (`tern reload`, i.e. SIGHUP: new TLS handshakes get the new certificate, allocations and
# WebSocket sessions already running keep going).
#
# Install:  install -m 0755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/tern
# certbot runs it after each renewal with RENEWED_LINEAGE=/etc/letsencrypt/live/NAME.
# Run it once by hand after the first `certbot certonly`:
#   RENEWED_LINEAGE=/etc/letsencrypt/live/turn.example.org /etc/letsencrypt/renewal-hooks/deploy/tern
#
# Overrides (environment): TERN_TLS_DIR (default /etc/tern/tls), TERN_GROUP (tern),
# TERN_BIN (the `tern` on PATH: /usr/bin/tern from the package, /usr/local/bin/tern from
# deploy/install.sh), TERN_CONFIG_FILE (/etc/tern/tern.toml).
set -eu

: "${RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE for deploy hooks}"
tls_dir=${TERN_TLS_DIR:-/etc/tern/tls}
group=${TERN_GROUP:-tern}
tern=${TERN_BIN:-$(command -v tern || echo /usr/bin/tern)}
config=${TERN_CONFIG_FILE:-/etc/tern/tern.toml}

install -d -m 0750 -g "$group" "$tls_dir"
# Copy beside the target and rename, so Tern never reads a half-written file.
for f in fullchain.pem privkey.pem; do
    install -m 0640 -g "$group" "$RENEWED_LINEAGE/$f" "$tls_dir/.$f.new"
    mv -f "$tls_dir/.$f.new" "$tls_dir/$f"
done

# Checks the config first (a broken one is reported here and the daemon left alone), then
# signals the daemon named in daemon.pid_file (/run/tern/tern.pid under systemd).
exec "$tern" reload --config "$config"
