//! What `tern migrate-coturn` knows about coturn's options beyond the ones it maps: which
//! carry secrets (never echoed), how flags are spelled, and why the rest have no Tern
//! equivalent.

/// Options whose values are credentials or connection strings: never echoed.
pub(super) fn sensitive(name: &str) -> bool {
    matches!(
        name,
        "static-auth-secret"
            | "user"
            | "cli-password"
            | "web-admin-password"
            | "pkey-pwd"
            | "userdb"
            | "db"
            | "psql-userdb"
            | "sql-userdb"
            | "mysql-userdb"
            | "mongo-userdb"
            | "redis-userdb"
            | "redis-statsdb"
            | "secret-ttl"
            | "oauth"
    ) || name.contains("password")
        || name.contains("secret")
}

/// A flag's value: absent means on; coturn also accepts 1/yes/true/on and 0/no/false/off.
pub(super) fn flag_on(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.to_ascii_lowercase()),
        Some(v) if v == "0" || v == "no" || v == "false" || v == "off"
    )
}

/// Why an option is not carried over, for the options Tern knowingly does without.
pub(super) fn unsupported_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "tls-listening-port" | "cert" | "pkey" => {
            "set [tls] cert_file, key_file and listen by hand, with copies of the certificate the tern user can read (deploy/certbot-deploy-hook.sh); Tern loads them at check-config, so they are not copied blindly"
        }
        "alt-tls-listening-port" | "pkey-pwd" | "cipher-list" | "CA-file" | "ec-curve-name"
        | "dh566" | "dh1066" | "dh2066" | "dh-file" | "no-tlsv1" | "no-tlsv1_1" | "no-tlsv1_2" => {
            "Tern's TLS (rustls) offers TLS 1.2 and 1.3 with its own cipher choice; encrypted keys and these settings are not configurable"
        }
        "no-tcp" | "no-udp" => {
            "Tern serves UDP and TCP on every turn.listen address; block the transport you do not want at the firewall"
        }
        "no-tls" => "Tern has no TLS listener unless configured; nothing to turn off",
        "no-dtls" | "dtls-listening-port" => "Tern has no DTLS (no browser uses TURN over DTLS); nothing to turn off",
        "lt-cred-mech" => "Tern always uses long-term credentials (RFC 8489 §9.2); nothing to set",
        "no-auth" => "Tern always authenticates TURN requests: an unauthenticated relay is an open proxy",
        "fingerprint" => {
            "Tern always adds FINGERPRINT to its responses (RFC 8489 §14.7); nothing to set"
        }
        "no-loopback-peers" | "no-multicast-peers" => {
            "Tern denies loopback and multicast peers by default; nothing to set"
        }
        "stale-nonce" => {
            "Tern's nonces are stateless and go stale after a fixed 600 s (RFC 8489 §9.2); not configurable"
        }
        "alt-listening-port" | "rfc5780" | "no-rfc5780" | "response-origin-only-with-rfc5780" => {
            "Tern does not implement NAT behaviour discovery (RFC 5780)"
        }
        "listening-device" | "relay-device" => {
            "Tern binds addresses, not interfaces: use turn.listen / turn.relay_ip with the interface's address"
        }
        "log-file" | "syslog" | "simple-log" | "new-log-timestamp" | "new-log-timestamp-format"
        | "log-binding" | "no-stdout-log" | "syslog-facility" => {
            "Tern logs to stderr, which journald collects; use log.level and log.format"
        }
        "pidfile" => "systemd tracks the process (systemd/tern.service); no pid file needed",
        "proc-user" | "proc-group" => {
            "systemd runs Tern as the unprivileged user tern (systemd/tern.service)"
        }
        "no-cli" | "cli-ip" | "cli-port" | "cli-password" | "cli-max-output-sessions" => {
            "Tern has no telnet CLI; there is nothing to turn off"
        }
        "web-admin" | "web-admin-ip" | "web-admin-port" | "web-admin-listen-on-workers" => {
            "Tern has no web admin interface"
        }
        "userdb" | "db" | "psql-userdb" | "sql-userdb" | "mysql-userdb" | "mongo-userdb"
        | "redis-userdb" => {
            "Tern reads no user database: export users (`turnadmin -l`) into [[turn.users]] and secrets (`turnadmin -S`) into turn.secret_file"
        }
        "redis-statsdb" | "prometheus-username-labels" => {
            "Tern's statistics are Prometheus metrics without per-user labels (bounded labels only)"
        }
        "bps-capacity" => {
            "Tern caps each relayed address (turn.max_bytes_per_sec), not the server's total"
        }
        "server-name" => "Tern has no server name; realm is set by turn.realm",
        "mobility" => "Tern does not implement ICE mobility (RFC 8016)",
        "secure-stun" => "Tern answers Binding requests without authentication, as RFC 8489 intends",
        "no-stun" | "stun-only" => "Tern always serves both STUN and TURN on its listeners",
        "tls-alternate-server" => {
            "turn.alternate_tls also needs the name in the alternate's certificate (sent as ALTERNATE-DOMAIN): add it by hand"
        }
        "aux-server" | "udp-self-balance" => {
            "Tern has no auxiliary listeners for UDP self-balancing; list every listener in turn.listen (alternates: turn.alternate_udp, alternate_tcp)"
        }
        "channel-lifetime" | "permission-lifetime" => {
            "Tern uses RFC 8656's fixed lifetimes (600 s channels, 300 s permissions)"
        }
        "oauth" | "server-relay" | "check-origin-consistency" => "not supported by Tern",
        "keep-address-family" | "allocation-default-address-family" => {
            "Tern follows RFC 8656 §7.2 address-family rules; not configurable"
        }
        "no-multicast-peers-denied" | "allow-multicast-peers" => {
            "Tern never relays to multicast addresses"
        }
        "daemon" | "prod" | "no-software-attribute-check" => "not needed under systemd",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_accept_coturn_booleans() {
        assert!(flag_on(None));
        assert!(flag_on(Some("yes")));
        assert!(!flag_on(Some("0")));
        assert!(!flag_on(Some("OFF")));
    }

    #[test]
    fn secret_bearing_options_are_recognised() {
        for name in [
            "static-auth-secret",
            "user",
            "cli-password",
            "psql-userdb",
            "pkey-pwd",
        ] {
            assert!(sensitive(name), "{name}");
        }
        assert!(!sensitive("realm"));
        assert!(unsupported_reason("no-auth")
            .unwrap()
            .contains("open proxy"));
        assert!(unsupported_reason("listening-port").is_none());
    }
}
