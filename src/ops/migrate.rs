//! `tern migrate-coturn`: reads a coturn `turnserver.conf` and writes the equivalent
//! `tern.toml`, listing every option it could not carry over and why.
//!
//! coturn's format: one option a line, `name=value` or a bare `name` for a flag, `#`
//! comments. Option names are case-sensitive (`verbose` and `Verbose` differ).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;

use super::cidr::peer_ranges;
use super::coturn_options::{flag_on, sensitive, unsupported_reason};

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
    no_tcp_relay: bool,
    max_bps: Option<u64>,
    /// `alternate-server`: coturn offers them to UDP and TCP clients alike.
    alternates: Vec<SocketAddr>,
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
        "no-tcp-relay" => st.no_tcp_relay = flag_on(value),
        "max-bps" => st.max_bps = Some(number(value)?),
        "alternate-server" => {
            let v = need(value)?;
            // coturn's default port when none is given.
            let addr = v
                .parse::<SocketAddr>()
                .or_else(|_| v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 3478)))
                .map_err(|_| format!("`{v}` is not an IP address with an optional port; ignored"))?;
            st.alternates.push(addr);
        }
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
    if st.no_tcp_relay {
        key(&mut turn, "no-tcp-relay", "tcp_relay = false".into());
    }
    if let Some(n) = st.max_bps {
        // Both count bytes per second of one session, each direction apart; 0 is no cap.
        key(&mut turn, "max-bps", format!("max_bytes_per_sec = {n}"));
    }
    if !st.alternates.is_empty() {
        let list = strings(st.alternates.iter().map(|a| a.to_string()));
        key(
            &mut turn,
            "alternate-server",
            format!("alternate_udp = {list}"),
        );
        key(
            &mut turn,
            "alternate-server",
            format!("alternate_tcp = {list}"),
        );
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
#[path = "migrate_tests.rs"]
mod tests;
