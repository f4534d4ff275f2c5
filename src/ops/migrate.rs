//! `tern migrate-coturn`: reads a coturn `turnserver.conf` and writes the equivalent
//! `tern.toml`, listing every option it could not carry over and why.
//!
//! coturn's format: one option a line, `name=value` or a bare `name` for a flag, `#`
//! comments. Option names are case-sensitive (`verbose` and `Verbose` differ).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;

/// One coturn option that has no Tern equivalent, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// 1-based line number in the coturn file.
    pub line: usize,
    /// The option as written (values of secret-bearing options hidden).
    pub option: String,
    pub reason: String,
}

/// The result of a migration.
#[derive(Clone, Debug)]
pub struct Migration {
    /// The generated `tern.toml`.
    pub toml: String,
    /// Options not carried over (also listed as comments at the end of `toml`).
    pub dropped: Vec<Dropped>,
    /// REST secrets (`static-auth-secret`), for the caller to write into `secret_file`
    /// when one was asked for (then `toml` references the file instead of holding them).
    pub secrets: Vec<String>,
}

/// Options whose values are credentials or connection strings: never echoed.
fn sensitive(name: &str) -> bool {
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
fn flag_on(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.to_ascii_lowercase()),
        Some(v) if v == "0" || v == "no" || v == "false" || v == "off"
    )
}

/// Minimal CIDR blocks covering exactly `lo..=hi` (both of the same family).
fn range_to_cidrs(lo: IpAddr, hi: IpAddr) -> Option<Vec<IpNet>> {
    let (bits, mut a, b) = match (lo, hi) {
        (IpAddr::V4(l), IpAddr::V4(h)) => {
            (32u32, u128::from(u32::from(l)), u128::from(u32::from(h)))
        }
        (IpAddr::V6(l), IpAddr::V6(h)) => (128u32, u128::from(l), u128::from(h)),
        _ => return None,
    };
    if a > b {
        return None;
    }
    let mask = |k: u32| {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut out = Vec::new();
    loop {
        // The largest block starting at `a` (aligned to its size) that ends by `b`.
        let mut k = if a == 0 {
            bits
        } else {
            a.trailing_zeros().min(bits)
        };
        while k > 0 && (a | mask(k)) > b {
            k -= 1;
        }
        let prefix = (bits - k) as u8;
        out.push(if bits == 32 {
            IpNet::new(IpAddr::V4((a as u32).into()), prefix).ok()?
        } else {
            IpNet::new(IpAddr::V6(a.into()), prefix).ok()?
        });
        let end = a | mask(k);
        if end >= b {
            return Some(out);
        }
        a = end + 1;
    }
}

/// `ip`, `ip1-ip2` or `net/len` as CIDR blocks.
fn peer_ranges(value: &str) -> Option<Vec<IpNet>> {
    let v = value.trim();
    if let Some((l, h)) = v.split_once('-') {
        return range_to_cidrs(l.trim().parse().ok()?, h.trim().parse().ok()?);
    }
    if let Ok(net) = v.parse::<IpNet>() {
        return Some(vec![net.trunc()]);
    }
    let ip: IpAddr = v.parse().ok()?;
    Some(vec![IpNet::from(ip)])
}

/// Why an option is not carried over, for the options Tern knowingly does without.
fn unsupported_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "tls-listening-port" | "alt-tls-listening-port" | "cert" | "pkey" | "pkey-pwd"
        | "cipher-list" | "CA-file" | "ec-curve-name" | "dh566" | "dh1066" | "dh2066"
        | "dh-file" | "no-tlsv1" | "no-tlsv1_1" | "no-tlsv1_2" => {
            "TURN over TLS is not built into Tern yet (issue 4); until it is, clients use turn: over UDP or TCP"
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
        "bps-capacity" | "max-bps" => "Tern has no bandwidth limit option",
        "server-name" => "Tern has no server name; realm is set by turn.realm",
        "mobility" => "Tern does not implement ICE mobility (RFC 8016)",
        "secure-stun" => "Tern answers Binding requests without authentication, as RFC 8489 intends",
        "no-stun" | "stun-only" => "Tern always serves both STUN and TURN on its listeners",
        "aux-server" | "udp-self-balance" | "alternate-server" | "tls-alternate-server" => {
            "ALTERNATE-SERVER redirection is not configurable in this Tern version"
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

#[derive(Default)]
struct State {
    port: Option<u16>,
    listen_ips: Vec<IpAddr>,
    relay_ips: Vec<IpAddr>,
    /// (public, private) from `external-ip=public[/private]`.
    external: Vec<(IpAddr, Option<IpAddr>)>,
    min_port: Option<u16>,
    max_port: Option<u16>,
    realm: Option<String>,
    use_auth_secret: bool,
    secrets: Vec<String>,
    users: Vec<(String, Option<String>, Option<String>)>,
    user_quota: Option<u32>,
    total_quota: Option<u32>,
    allowed: Vec<IpNet>,
    denied: Vec<IpNet>,
    allow_loopback: bool,
    max_lifetime: Option<u32>,
    no_software: bool,
    separator: Option<String>,
    workers: Option<usize>,
    sock_buf: Option<usize>,
    prometheus: bool,
    prometheus_port: Option<u16>,
    log_level: Option<&'static str>,
    /// coturn option names seen, in order, for the comments above each key.
    seen: Vec<String>,
}

/// Migrates coturn config `text` (read from `source`, named in the output). With
/// `secret_file`, REST secrets go to that file (the caller writes `Migration::secrets`).
pub fn migrate(text: &str, source: &str, secret_file: Option<&Path>) -> Migration {
    let mut st = State::default();
    let mut dropped = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // coturn also accepts the command-line spelling `--name=value` in its config file.
        let line = line.trim_start_matches("--");
        let (name, value) = match line.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
            None => (line, None),
        };
        let shown = match value {
            Some(v) if !sensitive(name) => format!("{name}={v}"),
            Some(_) => format!("{name}=…"),
            None => name.to_string(),
        };
        let mut drop = |reason: String| {
            dropped.push(Dropped {
                line: i + 1,
                option: shown.clone(),
                reason,
            })
        };
        if let Err(reason) = apply(&mut st, name, value) {
            drop(reason);
        } else if !st.seen.iter().any(|s| s == name) {
            st.seen.push(name.to_string());
        }
    }
    finish(st, dropped, source, secret_file)
}

fn unquote(v: &str) -> &str {
    let b = v.as_bytes();
    if b.len() >= 2
        && (b[0] == b'"' && b[b.len() - 1] == b'"' || b[0] == b'\'' && b[b.len() - 1] == b'\'')
    {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

fn need(value: Option<&str>) -> Result<&str, String> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err("needs a value; ignored".into()),
    }
}

fn number<T: std::str::FromStr>(value: Option<&str>) -> Result<T, String> {
    let v = need(value)?;
    v.parse()
        .map_err(|_| format!("`{v}` is not a valid number; ignored"))
}

fn ip(value: Option<&str>) -> Result<IpAddr, String> {
    let v = need(value)?;
    v.parse().map_err(|_| {
        format!("`{v}` is not an IP address (Tern takes addresses, not host names); ignored")
    })
}

/// Applies one option; `Err(reason)` when it is not carried over.
fn apply(st: &mut State, name: &str, value: Option<&str>) -> Result<(), String> {
    match name {
        "listening-port" => st.port = Some(number(value)?),
        "listening-ip" => st.listen_ips.push(ip(value)?),
        "relay-ip" => st.relay_ips.push(ip(value)?),
        "external-ip" => {
            let v = need(value)?;
            let (public, private) = match v.split_once('/') {
                Some((p, q)) => (ip(Some(p))?, Some(ip(Some(q))?)),
                None => (ip(Some(v))?, None),
            };
            st.external.push((public, private));
        }
        "min-port" => st.min_port = Some(number(value)?),
        "max-port" => st.max_port = Some(number(value)?),
        "realm" => st.realm = Some(need(value)?.to_string()),
        "use-auth-secret" => st.use_auth_secret = flag_on(value),
        "static-auth-secret" => st.secrets.push(need(value)?.to_string()),
        "rest-api-separator" => st.separator = Some(need(value)?.to_string()),
        "user" => {
            let v = need(value)?;
            let Some((user, pass)) = v.split_once(':') else {
                return Err("expected user=name:password or user=name:0xKEY; ignored".into());
            };
            if user.is_empty() {
                return Err("empty user name; ignored".into());
            }
            match pass.strip_prefix("0x") {
                Some(key) if key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    st.users.push((user.into(), None, Some(key.to_ascii_lowercase())))
                }
                Some(_) => {
                    return Err("key is not 32 hex digits (MD5 of user:realm:password, RFC 8489 §9.2.2, as turnadmin -k prints); ignored".into())
                }
                None => st.users.push((user.into(), Some(pass.into()), None)),
            }
        }
        "user-quota" | "total-quota" => {
            let n: u32 = number(value)?;
            if n == 0 {
                return Err(format!(
                    "0 means unlimited in coturn; Tern keeps quotas on (turn.{} default {})",
                    name.replace('-', "_"),
                    if name == "user-quota" { 10 } else { 10_000 }
                ));
            }
            if name == "user-quota" {
                st.user_quota = Some(n);
            } else {
                st.total_quota = Some(n);
            }
        }
        "allowed-peer-ip" | "denied-peer-ip" => {
            let v = need(value)?;
            let nets = peer_ranges(v)
                .ok_or_else(|| format!("`{v}` is not an address, range a-b or CIDR; ignored"))?;
            if name == "allowed-peer-ip" {
                st.allowed.extend(nets);
            } else {
                st.denied.extend(nets);
            }
        }
        "allow-loopback-peers" => st.allow_loopback = flag_on(value),
        "max-allocate-lifetime" => st.max_lifetime = Some(number(value)?),
        "no-software-attribute" => st.no_software = flag_on(value),
        "relay-threads" | "general-relay-threads" => st.workers = Some(number(value)?),
        "sock-buf-size" => st.sock_buf = Some(number(value)?),
        "prometheus" => st.prometheus = flag_on(value),
        "prometheus-port" => st.prometheus_port = Some(number(value)?),
        "verbose" | "v" => st.log_level = Some("info"),
        "Verbose" | "V" => st.log_level = Some("debug"),
        _ => {
            return Err(match unsupported_reason(name) {
                Some(r) => r.to_string(),
                None => "unknown to this migration; check coturn's documentation and Tern's config/tern.example.toml".into(),
            })
        }
    }
    Ok(())
}

fn val(v: impl Into<toml::Value>) -> String {
    v.into().to_string()
}

fn strings<I: IntoIterator<Item = String>>(items: I) -> String {
    val(toml::Value::Array(
        items.into_iter().map(toml::Value::String).collect(),
    ))
}

fn finish(
    st: State,
    mut dropped: Vec<Dropped>,
    source: &str,
    secret_file: Option<&Path>,
) -> Migration {
    let mut turn = String::new();
    let key = |out: &mut String, from: &str, line: String| {
        let _ = writeln!(out, "# from coturn: {from}\n{line}");
    };
    let port = st.port.unwrap_or(3478);
    if st.port.is_some() || !st.listen_ips.is_empty() {
        let ips: Vec<IpAddr> = if st.listen_ips.is_empty() {
            vec!["0.0.0.0".parse().unwrap(), "::".parse().unwrap()]
        } else {
            st.listen_ips.clone()
        };
        let addrs = ips.iter().map(|&ip| SocketAddr::new(ip, port).to_string());
        key(
            &mut turn,
            "listening-ip, listening-port",
            format!("listen = {}", strings(addrs)),
        );
    }
    // external-ip: `public/private` pins the private address as a relay address; a bare
    // `public` applies to every relay address of its family.
    let mut relay_ips = st.relay_ips.clone();
    for (_, private) in &st.external {
        if let Some(p) = private {
            if !relay_ips.contains(p) {
                relay_ips.push(*p);
            }
        }
    }
    // Without relay-ip, coturn relays from the address the client reached: with specific
    // listening-ip addresses that is one of them, so they become the relay addresses.
    let from_listen = relay_ips.is_empty()
        && !st.listen_ips.is_empty()
        && st.listen_ips.iter().all(|ip| !ip.is_unspecified());
    if from_listen {
        relay_ips = st.listen_ips.clone();
    }
    if !relay_ips.is_empty() {
        key(
            &mut turn,
            if from_listen {
                "listening-ip (no relay-ip: coturn relays from the listening address)"
            } else {
                "relay-ip, external-ip (private part)"
            },
            format!(
                "relay_ip = {}",
                strings(relay_ips.iter().map(|ip| ip.to_string()))
            ),
        );
    }
    if !st.external.is_empty() {
        let ext: Vec<IpAddr> = if relay_ips.is_empty() {
            // Detected relay addresses: Tern pairs external_ip entries by family.
            st.external.iter().map(|(p, _)| *p).collect()
        } else {
            relay_ips
                .iter()
                .map(|r| {
                    st.external
                        .iter()
                        .find(|(_, q)| *q == Some(*r))
                        .or_else(|| {
                            st.external
                                .iter()
                                .find(|(p, q)| q.is_none() && p.is_ipv4() == r.is_ipv4())
                        })
                        .map_or(*r, |(p, _)| *p)
                })
                .collect()
        };
        key(
            &mut turn,
            "external-ip",
            format!(
                "external_ip = {}",
                strings(ext.iter().map(|ip| ip.to_string()))
            ),
        );
    }
    if let Some(p) = st.min_port {
        key(&mut turn, "min-port", format!("min_port = {p}"));
    }
    if let Some(p) = st.max_port {
        key(&mut turn, "max-port", format!("max_port = {p}"));
    }
    if let Some(r) = &st.realm {
        key(&mut turn, "realm", format!("realm = {}", val(r.as_str())));
    }
    let mut secrets = Vec::new();
    if st.use_auth_secret {
        if st.secrets.is_empty() {
            dropped.push(Dropped {
                line: 0,
                option: "use-auth-secret".into(),
                reason: "no static-auth-secret: coturn read the secrets from its database; put them in a file (one a line) named by turn.secret_file".into(),
            });
        } else {
            secrets = st.secrets.clone();
            match secret_file {
                Some(path) => key(
                    &mut turn,
                    "use-auth-secret, static-auth-secret (written to the file)",
                    format!("secret_file = {}", strings([path.display().to_string()])),
                ),
                None => key(
                    &mut turn,
                    "use-auth-secret, static-auth-secret (better: move it to a secret_file)",
                    format!("auth_secrets = {}", strings(st.secrets.iter().cloned())),
                ),
            }
        }
    } else if !st.secrets.is_empty() {
        dropped.push(Dropped {
            line: 0,
            option: "static-auth-secret".into(),
            reason: "coturn ignores it without use-auth-secret; not carried over".into(),
        });
    }
    if let Some(s) = &st.separator {
        key(
            &mut turn,
            "rest-api-separator",
            format!("username_separator = {}", val(s.as_str())),
        );
    }
    if let Some(n) = st.user_quota {
        key(&mut turn, "user-quota", format!("user_quota = {n}"));
    }
    if let Some(n) = st.total_quota {
        key(&mut turn, "total-quota", format!("total_quota = {n}"));
    }
    let mut allowed = st.allowed.clone();
    if st.allow_loopback {
        for net in ["127.0.0.0/8", "::1/128"] {
            let net: IpNet = net.parse().unwrap();
            if !allowed.contains(&net) {
                allowed.push(net);
            }
        }
    }
    if !allowed.is_empty() {
        key(
            &mut turn,
            "allowed-peer-ip, allow-loopback-peers",
            format!(
                "allowed_peer_ranges = {}",
                strings(allowed.iter().map(|n| n.to_string()))
            ),
        );
    }
    if !st.denied.is_empty() {
        key(
            &mut turn,
            "denied-peer-ip",
            format!(
                "denied_peer_ranges = {}",
                strings(st.denied.iter().map(|n| n.to_string()))
            ),
        );
    }
    if let Some(n) = st.max_lifetime {
        key(
            &mut turn,
            "max-allocate-lifetime",
            format!("max_lifetime_secs = {n}"),
        );
        if n < 600 {
            key(
                &mut turn,
                "max-allocate-lifetime (default lifetime may not exceed it)",
                format!("default_lifetime_secs = {n}"),
            );
        }
    }
    if st.no_software {
        key(&mut turn, "no-software-attribute", "software = \"\"".into());
    }
    if let Some(n) = st.workers {
        key(&mut turn, "relay-threads", format!("workers = {n}"));
    }
    if let Some(n) = st.sock_buf {
        key(
            &mut turn,
            "sock-buf-size",
            format!("socket_buffer_bytes = {}", n.max(65536)),
        );
    }
    for (name, password, k) in &st.users {
        let _ = writeln!(
            turn,
            "\n# from coturn: user=\n[[turn.users]]\nname = {}",
            val(name.as_str())
        );
        if let Some(p) = password {
            let _ = writeln!(turn, "password = {}", val(p.as_str()));
        }
        if let Some(k) = k {
            let _ = writeln!(turn, "key = {}", val(k.as_str()));
        }
    }

    let mut metrics = String::new();
    if st.prometheus || st.prometheus_port.is_some() {
        let p = st.prometheus_port.unwrap_or(9641);
        let _ = writeln!(
            metrics,
            "# from coturn: prometheus, prometheus-port. coturn's exporter listened on every\n\
             # address; Tern's stays on loopback: change it to scrape from another host, and\n\
             # open the port only to your Prometheus server.\nenabled = true\nlisten = \"127.0.0.1:{p}\""
        );
    }
    let mut log = String::new();
    if let Some(l) = st.log_level {
        let _ = writeln!(log, "# from coturn: verbose / Verbose\nlevel = \"{l}\"");
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# tern.toml generated by `tern migrate-coturn` from {source}."
    );
    out.push_str(
        "# Check it: tern check-config --config tern.toml\n\
         # Unlike coturn, Tern refuses to relay to private, loopback, CGNAT, link-local and other\n\
         # special-purpose peer addresses by default: list peers on such networks you relay to in\n\
         # turn.allowed_peer_ranges. Keys not set here keep the defaults in config/tern.example.toml.\n",
    );
    if st.realm.is_none() {
        out.push_str("# coturn had no realm: Tern uses its default realm \"tern\" (static user keys depend on it).\n");
    }
    if !st.secrets.is_empty() && st.use_auth_secret && secret_file.is_none() {
        out.push_str(
            "# This file holds a secret: keep it mode 0600, readable by the tern user only.\n",
        );
    }
    let _ = writeln!(out, "\n[turn]\n{turn}");
    if !metrics.is_empty() {
        let _ = writeln!(out, "[metrics]\n{metrics}");
    }
    if !log.is_empty() {
        let _ = writeln!(out, "[log]\n{log}");
    }
    if dropped.is_empty() {
        let _ = writeln!(out, "# Every coturn option was carried over.");
    } else {
        let _ = writeln!(out, "# Not carried over from {source}:");
        for d in &dropped {
            let at = if d.line == 0 {
                String::new()
            } else {
                format!("line {}: ", d.line)
            };
            let _ = writeln!(out, "#   {at}{}: {}", d.option, d.reason);
        }
    }
    Migration {
        toml: out,
        dropped,
        secrets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(lo: &str, hi: &str) -> Option<Vec<String>> {
        range_to_cidrs(lo.parse().unwrap(), hi.parse().unwrap())
            .map(|v| v.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn ranges_become_exact_cidr_blocks() {
        assert_eq!(
            cidrs("10.0.0.1", "10.0.0.6").unwrap(),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(cidrs("0.0.0.0", "255.255.255.255").unwrap(), ["0.0.0.0/0"]);
        assert_eq!(cidrs("192.0.2.7", "192.0.2.7").unwrap(), ["192.0.2.7/32"]);
        assert_eq!(
            cidrs("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            ["::/0"]
        );
        assert_eq!(
            cidrs("fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            ["fe80::/10"]
        );
        assert_eq!(cidrs("10.0.0.2", "10.0.0.1"), None);
        assert_eq!(cidrs("10.0.0.1", "::1"), None);
    }

    #[test]
    fn peer_values() {
        let s =
            |v: &str| peer_ranges(v).map(|v| v.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(s("192.0.2.1").unwrap(), ["192.0.2.1/32"]);
        assert_eq!(s("192.0.2.9/24").unwrap(), ["192.0.2.0/24"]);
        assert_eq!(s(" 10.0.0.0 - 10.0.0.255 ").unwrap(), ["10.0.0.0/24"]);
        assert_eq!(s("nonsense"), None);
    }

    #[test]
    fn flags_accept_coturn_booleans() {
        assert!(flag_on(None));
        assert!(flag_on(Some("yes")));
        assert!(!flag_on(Some("0")));
        assert!(!flag_on(Some("OFF")));
    }
}
