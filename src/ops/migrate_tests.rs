//! `tern migrate-coturn` on real-world-style coturn configs: the output loads as a valid
//! Tern config with the right values, and every option left behind is listed with a reason.

use std::net::IpAddr;

use super::{migrate, Migration};
use crate::config::Config;

fn load(m: &Migration) -> Config {
    let cfg: Config = toml::from_str(&m.toml).unwrap_or_else(|e| panic!("{e}\n{}", m.toml));
    cfg.validate().unwrap_or_else(|e| panic!("{e}\n{}", m.toml));
    cfg
}

fn dropped(m: &Migration) -> Vec<&str> {
    m.dropped.iter().map(|d| d.option.as_str()).collect()
}

fn ips(v: &[IpAddr]) -> Vec<String> {
    v.iter().map(|i| i.to_string()).collect()
}

/// The turnserver.conf from the seed article (seeds/000), verbatim.
const SEED: &str = "# Network settings
listening-port=3478
tls-listening-port=5349
listening-ip=0.0.0.0
external-ip=SERVER_IP
min-port=49152
max-port=65535

# Authentication
user=username:password
realm=my.realm.org

# TLS settings
cert=/etc/letsencrypt/live/turn.domain.com/fullchain.pem
pkey=/etc/letsencrypt/live/turn.domain.com/privkey.pem

# Performance
total-quota=100
stale-nonce=600
";

#[test]
fn seed_config() {
    let m = migrate(SEED, "turnserver.conf", None);
    let c = load(&m);
    assert_eq!(c.turn.listen, vec!["0.0.0.0:3478".parse().unwrap()]);
    assert_eq!((c.turn.min_port, c.turn.max_port), (49152, 65535));
    assert_eq!(c.turn.realm, "my.realm.org");
    assert_eq!(c.turn.total_quota, 100);
    assert_eq!(c.turn.users.len(), 1);
    assert_eq!(c.turn.users[0].name, "username");
    assert_eq!(c.turn.users[0].password.as_deref(), Some("password"));
    assert!(c.turn.external_ip.is_empty());
    assert_eq!(
        dropped(&m),
        [
            "tls-listening-port=5349",
            "external-ip=SERVER_IP",
            "cert=/etc/letsencrypt/live/turn.domain.com/fullchain.pem",
            "pkey=/etc/letsencrypt/live/turn.domain.com/privkey.pem",
            "stale-nonce=600",
        ]
    );
    assert!(
        m.dropped[1].reason.contains("not an IP address"),
        "{:?}",
        m.dropped[1]
    );
    // The dropped list is in the file too, with line numbers.
    assert!(
        m.toml.contains("#   line 5: external-ip=SERVER_IP: "),
        "{}",
        m.toml
    );
    assert!(
        m.toml.contains("#   line 19: stale-nonce=600: "),
        "{}",
        m.toml
    );
}

/// seeds/003: a placeholder listening-ip, a realm and one user.
#[test]
fn tutorial_config_with_placeholder() {
    let text = "listening-ip=SERVER_IP_ADDRESS\nlistening-port=3478\nrealm=example.com\nuser=username:password\n";
    let m = migrate(text, "t", None);
    let c = load(&m);
    // No usable listening-ip: every address, as coturn does without one.
    assert_eq!(
        c.turn.listen,
        vec![
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap()
        ]
    );
    assert_eq!(dropped(&m), ["listening-ip=SERVER_IP_ADDRESS"]);
}

/// A production-style REST-secret config (as Matrix/Jitsi/Nextcloud guides write them).
const REST: &str = "\
use-auth-secret
static-auth-secret=s3cr3t-shared
realm=turn.example.org
listening-port=3478
tls-listening-port=5349
listening-ip=203.0.113.7
listening-ip=2001:db8::7
relay-ip=10.0.0.7
external-ip=203.0.113.7/10.0.0.7
min-port=49160
max-port=49200
fingerprint
lt-cred-mech
user-quota=12
total-quota=0
no-loopback-peers
no-multicast-peers
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=192.168.0.0-192.168.255.255
denied-peer-ip=172.16.0.0-172.31.255.255
denied-peer-ip=fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff
allowed-peer-ip=10.0.0.50-10.0.0.53
no-tcp
no-tls
no-dtls
cert=/etc/turn/cert.pem
pkey=/etc/turn/key.pem
prometheus
verbose
no-cli
cli-password=hunter2
log-file=/var/log/turn.log
pidfile=\"/var/run/turnserver.pid\"
user=bob:0x0123456789ABCDEF0123456789abcdef
user=carol:0x1234
no-auth
bogus-option=1
";

#[test]
fn rest_secret_config() {
    let m = migrate(REST, "/etc/turnserver.conf", None);
    let c = load(&m);
    assert_eq!(
        c.turn.listen,
        vec![
            "203.0.113.7:3478".parse().unwrap(),
            "[2001:db8::7]:3478".parse().unwrap()
        ]
    );
    assert_eq!(ips(&c.turn.relay_ip), ["10.0.0.7"]);
    assert_eq!(ips(&c.turn.external_ip), ["203.0.113.7"]);
    assert_eq!((c.turn.min_port, c.turn.max_port), (49160, 49200));
    assert_eq!(c.turn.realm, "turn.example.org");
    assert_eq!(c.turn_secrets().unwrap(), ["s3cr3t-shared"]);
    assert_eq!(c.turn.user_quota, 12);
    // coturn's 0 (unlimited) keeps Tern's default quota, and says so.
    assert_eq!(c.turn.total_quota, 10_000);
    let nets: Vec<String> = c
        .turn
        .denied_peer_ranges
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        nets,
        ["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "fc00::/7"]
    );
    let nets: Vec<String> = c
        .turn
        .allowed_peer_ranges
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.50/31", "10.0.0.52/31"]);
    assert_eq!(c.turn.users.len(), 1);
    assert_eq!(
        c.turn.users[0].key.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert!(c.metrics.enabled);
    assert_eq!(c.metrics.listen, "127.0.0.1:9641".parse().unwrap());
    assert_eq!(c.log.level, "info");

    let d = dropped(&m);
    for opt in [
        "tls-listening-port=5349",
        "fingerprint",
        "lt-cred-mech",
        "total-quota=0",
        "no-loopback-peers",
        "no-multicast-peers",
        "no-tcp",
        "no-tls",
        "no-dtls",
        "cert=/etc/turn/cert.pem",
        "no-cli",
        "cli-password=…",
        "log-file=/var/log/turn.log",
        "pidfile=/var/run/turnserver.pid",
        "user=…",
        "no-auth",
        "bogus-option=1",
    ] {
        assert!(d.contains(&opt), "{opt} not listed in {d:?}");
    }
    // Everything carried over is not listed as dropped.
    for opt in [
        "use-auth-secret",
        "realm=turn.example.org",
        "prometheus",
        "verbose",
    ] {
        assert!(
            !d.iter().any(|x| x.starts_with(opt)),
            "{opt} listed in {d:?}"
        );
    }
    let reason = |o: &str| &m.dropped.iter().find(|x| x.option == o).unwrap().reason;
    assert!(reason("no-auth").contains("open proxy"));
    assert!(reason("bogus-option=1").contains("unknown"));
    assert!(reason("user=…").contains("32 hex digits"));
    // Secrets appear once, in auth_secrets; never in comments or the dropped list.
    assert_eq!(m.toml.matches("s3cr3t-shared").count(), 1, "{}", m.toml);
    assert!(!m.toml.contains("hunter2"));
}

#[test]
fn secret_file_keeps_the_secret_out_of_the_toml() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    let m = migrate(REST, "t", Some(&path));
    assert!(!m.toml.contains("s3cr3t-shared"));
    assert_eq!(m.secrets, ["s3cr3t-shared"]);
    std::fs::write(&path, m.secrets.join("\n")).unwrap();
    let c = load(&m);
    assert_eq!(c.turn.secret_file, [path]);
    assert_eq!(c.turn_secrets().unwrap(), ["s3cr3t-shared"]);
}

#[test]
fn loopback_peers_and_lifetimes() {
    let text = "allow-loopback-peers\nmax-allocate-lifetime=300\nno-software-attribute\nno-tcp-relay\nrest-api-separator=-\nrelay-threads=3\nVerbose\nprometheus-port=9700\nexternal-ip=198.51.100.9\n";
    let m = migrate(text, "t", None);
    let c = load(&m);
    let nets: Vec<String> = c
        .turn
        .allowed_peer_ranges
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(
        (c.turn.max_lifetime_secs, c.turn.default_lifetime_secs),
        (300, 300)
    );
    assert_eq!(c.turn.software, "");
    assert!(!c.turn.tcp_relay, "no-tcp-relay turns RFC 6062 relays off");
    assert_eq!(c.turn.username_separator, "-");
    assert_eq!(c.turn.workers, 3);
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.metrics.listen, "127.0.0.1:9700".parse().unwrap());
    // No relay-ip: the external address is paired with the detected one by family.
    assert_eq!(ips(&c.turn.external_ip), ["198.51.100.9"]);
    assert!(c.turn.relay_ip.is_empty());
    assert!(m.dropped.is_empty(), "{:?}", m.dropped);
    assert!(m.toml.contains("Every coturn option was carried over"));
    assert!(m.toml.contains("coturn had no realm"));
}

#[test]
fn use_auth_secret_without_a_secret_is_reported() {
    let m = migrate("use-auth-secret\nrealm=x\n", "t", None);
    load(&m);
    assert_eq!(dropped(&m), ["use-auth-secret"]);
    assert!(m.dropped[0].reason.contains("database"));
    let m = migrate("static-auth-secret=abc\n", "t", None);
    assert!(load(&m).turn.auth_secrets.is_empty());
    assert!(m.dropped[0].reason.contains("without use-auth-secret"));
    assert!(!m.toml.contains("abc"));
}

#[test]
fn specific_listening_addresses_become_relay_addresses() {
    let text = "listening-ip=198.51.100.4\nlistening-ip=2001:db8::4\nexternal-ip=203.0.113.4\n";
    let c = load(&migrate(text, "t", None));
    assert_eq!(ips(&c.turn.relay_ip), ["198.51.100.4", "2001:db8::4"]);
    // A bare external-ip applies to the relay address of its family; the other keeps its own.
    assert_eq!(ips(&c.turn.external_ip), ["203.0.113.4", "2001:db8::4"]);
    // listening-ip=0.0.0.0 leaves relay addresses to detection.
    let c = load(&migrate("listening-ip=0.0.0.0\n", "t", None));
    assert!(c.turn.relay_ip.is_empty());
}

#[test]
fn bandwidth_cap_and_alternate_servers() {
    let text = "max-bps=250000\nalternate-server=203.0.113.7:3478\nalternate-server=2001:db8::7\nalternate-server=turn2.example.org\nbps-capacity=1000000\ntls-alternate-server=203.0.113.7:5349\n";
    let m = migrate(text, "t", None);
    let c = load(&m);
    assert_eq!(c.turn.max_bytes_per_sec, 250_000);
    let want: Vec<std::net::SocketAddr> = vec![
        "203.0.113.7:3478".parse().unwrap(),
        "[2001:db8::7]:3478".parse().unwrap(),
    ];
    assert_eq!(c.turn.alternate_udp, want);
    assert_eq!(c.turn.alternate_tcp, want);
    assert!(c.turn.alternate_tls.is_empty());
    // A host name, a server-wide cap and a TLS alternate without its name are reported.
    let mut names = dropped(&m);
    names.sort();
    assert_eq!(
        names,
        [
            "alternate-server=turn2.example.org",
            "bps-capacity=1000000",
            "tls-alternate-server=203.0.113.7:5349"
        ]
    );
    assert!(migrate("max-bps=0\n", "t", None)
        .toml
        .contains("max_bytes_per_sec = 0"));
}
