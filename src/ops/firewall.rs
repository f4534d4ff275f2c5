//! `tern firewall`: the firewall rules that open exactly what a config listens on, for ufw,
//! nftables or firewalld. TURN listeners (UDP and TCP, RFC 8656 §3.1), TURN over TLS
//! listeners when `[tls]` has a certificate, the relay range (UDP, and TCP too for RFC 6062
//! TCP allocations when `turn.tcp_relay` is on),
//! the HTTP listener when enabled and not on loopback, and the metrics listener only when it
//! is not on loopback. Loopback listeners need no rule and are listed as skipped.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::Config;

/// Which firewall front-end to print commands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Ufw,
    Nftables,
    Firewalld,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Which destinations a rule admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    /// Any address of both families.
    Any,
    /// Any IPv4 address (a listener on 0.0.0.0).
    AnyV4,
    /// Any IPv6 address (a listener on [::]).
    AnyV6,
    Addr(IpAddr),
}

/// One accept rule: a protocol, a port range and a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    proto: Proto,
    ports: (u16, u16),
    dest: Dest,
    what: &'static str,
}

/// The rules for `cfg`, and a note for each listener that needs none.
fn plan(cfg: &Config) -> (Vec<Rule>, Vec<String>) {
    let mut rules = Vec::new();
    let mut skipped = Vec::new();
    let mut listener = |addr: SocketAddr, protos: &[Proto], what: &'static str| {
        if addr.ip().is_loopback() {
            skipped.push(format!("Not opened: {what} on {addr} (loopback only)."));
            return;
        }
        for &proto in protos {
            rules.push(Rule {
                proto,
                ports: (addr.port(), addr.port()),
                dest: dest_of(addr.ip()),
                what,
            });
        }
    };
    for &addr in &cfg.turn.listen {
        listener(addr, &[Proto::Udp, Proto::Tcp], "STUN/TURN");
    }
    // TURN over TLS (RFC 8656 §3.1): only served when a certificate is configured.
    if cfg.tls.enabled() {
        for &addr in &cfg.tls.listen {
            listener(addr, &[Proto::Tcp], "TURN over TLS");
        }
    }
    if cfg.api.enabled {
        listener(cfg.api.listen, &[Proto::Tcp], "HTTP API and signaling");
    }
    if cfg.metrics.enabled {
        listener(cfg.metrics.listen, &[Proto::Tcp], "metrics");
        if !cfg.metrics.listen.ip().is_loopback() {
            skipped.push(format!(
                "Warning: metrics listen on {}, not on loopback: narrow that rule to your Prometheus server.",
                cfg.metrics.listen
            ));
        }
    }
    let ports = (cfg.turn.min_port, cfg.turn.max_port);
    let what = "TURN relay ports";
    // RFC 6062: peers connect to a TCP allocation's relayed address over TCP.
    let relay_protos: &[Proto] = if cfg.turn.tcp_relay {
        &[Proto::Udp, Proto::Tcp]
    } else {
        &[Proto::Udp]
    };
    if cfg.turn.relay_ip.is_empty() {
        // Detected relay addresses: whatever the routed address of each family is.
        for &proto in relay_protos {
            rules.push(Rule {
                proto,
                ports,
                dest: Dest::Any,
                what,
            });
        }
    } else {
        for &ip in &cfg.turn.relay_ip {
            if ip.is_loopback() {
                skipped.push(format!("Not opened: {what} on {ip} (loopback only)."));
                continue;
            }
            for &proto in relay_protos {
                rules.push(Rule {
                    proto,
                    ports,
                    dest: dest_of(ip),
                    what,
                });
            }
        }
    }
    (merge(rules), skipped)
}

fn dest_of(ip: IpAddr) -> Dest {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Dest::AnyV4,
        IpAddr::V6(v6) if v6.is_unspecified() => Dest::AnyV6,
        _ => Dest::Addr(ip),
    }
}

/// True when a rule for `a` already admits everything a rule for `b` would.
fn covers(a: Dest, b: Dest) -> bool {
    a == b
        || a == Dest::Any
        || matches!((a, b), (Dest::AnyV4, Dest::Addr(IpAddr::V4(_))))
        || matches!((a, b), (Dest::AnyV6, Dest::Addr(IpAddr::V6(_))))
}

/// Drops rules another one covers and folds an IPv4-any and IPv6-any pair into one rule.
fn merge(rules: Vec<Rule>) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for r in rules {
        let same = |o: &Rule| o.proto == r.proto && o.ports == r.ports;
        if out.iter().any(|o| same(o) && covers(o.dest, r.dest)) {
            continue;
        }
        out.retain(|o| !(same(o) && covers(r.dest, o.dest)));
        let twin = out.iter_mut().find(|o| {
            same(o)
                && matches!(
                    (o.dest, r.dest),
                    (Dest::AnyV4, Dest::AnyV6) | (Dest::AnyV6, Dest::AnyV4)
                )
        });
        match twin {
            Some(o) => o.dest = Dest::Any,
            None => out.push(r),
        }
    }
    // A folded pair may now cover an address-specific rule.
    let all = out.clone();
    out.retain(|r| {
        !all.iter()
            .any(|o| o != r && o.proto == r.proto && o.ports == r.ports && covers(o.dest, r.dest))
    });
    out
}

/// The commands (ufw, firewalld) or ruleset (nftables) for `cfg`. `source` names the config
/// in the header comment.
pub fn render(cfg: &Config, backend: Backend, source: &str) -> String {
    let (rules, skipped) = plan(cfg);
    let mut out = String::new();
    let header = |out: &mut String, shebang: &str| {
        out.push_str(shebang);
        let _ = writeln!(
            out,
            "# Generated by `tern firewall` for {source}: opens exactly what Tern listens on."
        );
        let _ = writeln!(
            out,
            "# Review it, then apply it (deploy/firewall.sh applies it after asking)."
        );
        for s in &skipped {
            let _ = writeln!(out, "# {s}");
        }
    };
    match backend {
        Backend::Ufw => {
            header(&mut out, "#!/bin/sh\nset -e\n");
            for r in &rules {
                let _ = writeln!(out, "{}", ufw_rule(r));
            }
        }
        Backend::Firewalld => {
            header(&mut out, "#!/bin/sh\nset -e\n");
            for r in &rules {
                let _ = writeln!(out, "{}", firewalld_rule(r));
            }
            out.push_str("firewall-cmd --reload\n");
        }
        Backend::Nftables => {
            header(&mut out, "#!/usr/sbin/nft -f\n");
            out.push_str(
                "# Rules live in chain tern_input of table inet filter (Debian's /etc/nftables.conf\n\
                 # table); re-applying replaces them. Once, jump to it from the input chain:\n\
                 #   nft insert rule inet filter input jump tern_input\n\
                 # (deploy/firewall.sh --nftables adds that jump when it is missing.)\n",
            );
            out.push_str(
                "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter;\n\t}\n\tchain tern_input {\n\t}\n}\n",
            );
            out.push_str("flush chain inet filter tern_input\n");
            out.push_str("table inet filter {\n\tchain tern_input {\n");
            for r in &rules {
                let _ = writeln!(out, "\t\t{}", nft_rule(r));
            }
            out.push_str("\t}\n}\n");
        }
    }
    out
}

fn port_text(ports: (u16, u16), sep: char) -> String {
    if ports.0 == ports.1 {
        ports.0.to_string()
    } else {
        format!("{}{sep}{}", ports.0, ports.1)
    }
}

fn ufw_rule(r: &Rule) -> String {
    let port = port_text(r.ports, ':');
    let p = r.proto.name();
    let what = r.what;
    match r.dest {
        Dest::Any => format!("ufw allow {port}/{p} comment 'tern {what}'"),
        Dest::AnyV4 => {
            format!("ufw allow proto {p} to 0.0.0.0/0 port {port} comment 'tern {what}'")
        }
        Dest::AnyV6 => format!("ufw allow proto {p} to ::/0 port {port} comment 'tern {what}'"),
        Dest::Addr(ip) => format!("ufw allow proto {p} to {ip} port {port} comment 'tern {what}'"),
    }
}

fn firewalld_rule(r: &Rule) -> String {
    let port = port_text(r.ports, '-');
    let p = r.proto.name();
    let rich = |family: &str, addr: Option<IpAddr>| {
        let dest = addr
            .map(|a| format!(" destination address=\"{a}\""))
            .unwrap_or_default();
        format!(
            "firewall-cmd --permanent --add-rich-rule='rule family=\"{family}\"{dest} port port=\"{port}\" protocol=\"{p}\" accept'"
        )
    };
    match r.dest {
        Dest::Any => format!("firewall-cmd --permanent --add-port={port}/{p}"),
        Dest::AnyV4 => rich("ipv4", None),
        Dest::AnyV6 => rich("ipv6", None),
        Dest::Addr(ip @ IpAddr::V4(_)) => rich("ipv4", Some(ip)),
        Dest::Addr(ip) => rich("ipv6", Some(ip)),
    }
}

fn nft_rule(r: &Rule) -> String {
    let port = port_text(r.ports, '-');
    let p = r.proto.name();
    let m = match r.dest {
        Dest::Any => String::new(),
        Dest::AnyV4 => "meta nfproto ipv4 ".into(),
        Dest::AnyV6 => "meta nfproto ipv6 ".into(),
        Dest::Addr(ip @ IpAddr::V4(_)) => format!("ip daddr {ip} "),
        Dest::Addr(ip) => format!("ip6 daddr {ip} "),
    };
    format!("{m}{p} dport {port} accept comment \"tern {}\"", r.what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, Vec::new(), &sets).unwrap()
    }

    fn rules(out: &str) -> Vec<&str> {
        out.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn defaults_open_turn_relay_and_api_but_not_metrics() {
        let c = cfg(&[]);
        let ufw = render(&c, Backend::Ufw, "defaults");
        assert_eq!(
            rules(&ufw),
            [
                "set -e",
                "ufw allow 3478/udp comment 'tern STUN/TURN'",
                "ufw allow 3478/tcp comment 'tern STUN/TURN'",
                "ufw allow proto tcp to 0.0.0.0/0 port 8080 comment 'tern HTTP API and signaling'",
                "ufw allow 49152:65535/udp comment 'tern TURN relay ports'",
                "ufw allow 49152:65535/tcp comment 'tern TURN relay ports'",
            ]
        );
        assert!(ufw.contains("# Not opened: metrics on 127.0.0.1:9641 (loopback only)."));
        assert!(!ufw.contains("9641/"), "{ufw}");

        let fwd = render(&c, Backend::Firewalld, "defaults");
        assert_eq!(
            rules(&fwd),
            [
                "set -e",
                "firewall-cmd --permanent --add-port=3478/udp",
                "firewall-cmd --permanent --add-port=3478/tcp",
                "firewall-cmd --permanent --add-rich-rule='rule family=\"ipv4\" port port=\"8080\" protocol=\"tcp\" accept'",
                "firewall-cmd --permanent --add-port=49152-65535/udp",
                "firewall-cmd --permanent --add-port=49152-65535/tcp",
                "firewall-cmd --reload",
            ]
        );

        let nft = render(&c, Backend::Nftables, "defaults");
        let body: Vec<&str> = rules(&nft)
            .into_iter()
            .filter(|l| l.contains("dport"))
            .collect();
        assert_eq!(
            body,
            [
                "udp dport 3478 accept comment \"tern STUN/TURN\"",
                "tcp dport 3478 accept comment \"tern STUN/TURN\"",
                "meta nfproto ipv4 tcp dport 8080 accept comment \"tern HTTP API and signaling\"",
                "udp dport 49152-65535 accept comment \"tern TURN relay ports\"",
                "tcp dport 49152-65535 accept comment \"tern TURN relay ports\"",
            ]
        );
    }

    #[test]
    fn specific_addresses_and_public_metrics() {
        let c = cfg(&[
            "turn.listen=[\"203.0.113.5:3478\", \"[2001:db8::5]:443\", \"127.0.0.1:3479\"]",
            "turn.relay_ip=[\"203.0.113.5\", \"2001:db8::5\"]",
            "turn.min_port=50000",
            "turn.max_port=50999",
            "api.enabled=false",
            "metrics.listen=\"10.0.0.2:9641\"",
        ]);
        let ufw = render(&c, Backend::Ufw, "t");
        assert_eq!(
            rules(&ufw)[1..],
            [
                "ufw allow proto udp to 203.0.113.5 port 3478 comment 'tern STUN/TURN'",
                "ufw allow proto tcp to 203.0.113.5 port 3478 comment 'tern STUN/TURN'",
                "ufw allow proto udp to 2001:db8::5 port 443 comment 'tern STUN/TURN'",
                "ufw allow proto tcp to 2001:db8::5 port 443 comment 'tern STUN/TURN'",
                "ufw allow proto tcp to 10.0.0.2 port 9641 comment 'tern metrics'",
                "ufw allow proto udp to 203.0.113.5 port 50000:50999 comment 'tern TURN relay ports'",
                "ufw allow proto tcp to 203.0.113.5 port 50000:50999 comment 'tern TURN relay ports'",
                "ufw allow proto udp to 2001:db8::5 port 50000:50999 comment 'tern TURN relay ports'",
                "ufw allow proto tcp to 2001:db8::5 port 50000:50999 comment 'tern TURN relay ports'",
            ]
        );
        assert!(ufw.contains("# Not opened: STUN/TURN on 127.0.0.1:3479 (loopback only)."));
        assert!(ufw.contains("# Warning: metrics listen on 10.0.0.2:9641, not on loopback"));
        assert!(!ufw.contains("8080"));
        let nft = render(&c, Backend::Nftables, "t");
        assert!(nft.contains("ip6 daddr 2001:db8::5 tcp dport 443 accept"));
        assert!(nft.contains("ip daddr 203.0.113.5 udp dport 50000-50999 accept"));
        let fwd = render(&c, Backend::Firewalld, "t");
        assert!(fwd.contains("rule family=\"ipv6\" destination address=\"2001:db8::5\" port port=\"443\" protocol=\"udp\" accept"));
    }

    #[test]
    fn relay_range_over_tcp_only_with_tcp_relays() {
        let on = render(&cfg(&[]), Backend::Ufw, "t");
        assert!(on.contains("ufw allow 49152:65535/tcp"), "{on}");
        let off = render(&cfg(&["turn.tcp_relay=false"]), Backend::Ufw, "t");
        assert!(off.contains("ufw allow 49152:65535/udp"), "{off}");
        assert!(!off.contains("49152:65535/tcp"), "{off}");
    }

    #[test]
    fn tls_listeners_only_with_a_certificate() {
        let c = cfg(&[]);
        assert!(!render(&c, Backend::Ufw, "t").contains("5349"));
        let mut c = cfg(&[]);
        c.tls.cert_file = Some("/etc/tern/tls/fullchain.pem".into());
        c.tls.key_file = Some("/etc/tern/tls/privkey.pem".into());
        let ufw = render(&c, Backend::Ufw, "t");
        assert!(
            ufw.contains("ufw allow 5349/tcp comment 'tern TURN over TLS'"),
            "{ufw}"
        );
        assert!(!ufw.contains("5349/udp"), "{ufw}");
        let nft = render(&c, Backend::Nftables, "t");
        assert!(nft.contains("tcp dport 5349 accept"), "{nft}");
    }

    #[test]
    fn loopback_only_config_opens_nothing() {
        let c = cfg(&[
            "turn.listen=[\"127.0.0.1:3478\"]",
            "turn.relay_ip=[\"127.0.0.1\"]",
            "api.listen=\"127.0.0.1:8080\"",
        ]);
        for b in [Backend::Ufw, Backend::Nftables, Backend::Firewalld] {
            let out = render(&c, b, "t");
            assert!(
                !out.lines()
                    .any(|l| l.contains("dport") || l.contains("allow") || l.contains("add-")),
                "{out}"
            );
        }
    }

    #[test]
    fn merge_folds_families_and_drops_covered_rules() {
        let r = |dest| Rule {
            proto: Proto::Udp,
            ports: (1, 1),
            dest,
            what: "x",
        };
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let out = merge(vec![
            r(Dest::Addr(v4)),
            r(Dest::AnyV4),
            r(Dest::AnyV6),
            r(Dest::AnyV4),
        ]);
        assert_eq!(out, vec![r(Dest::Any)]);
    }
}
