//! Usage accounting per user (issue 14) end to end: `turnutils_uclient` relays a known
//! number of packets as REST user `alice` (two credentials with different expiries) and
//! static user `bob`; `/api/usage` and `tern usage` report them per direction; SIGKILL
//! keeps what the last interim read saw and leaves a sound SQLite file; a daily byte budget
//! refuses Refresh and Allocate with 486 until a reload raises it; the admin routes want an
//! admin token (401 without, 403 with a minting token).

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use stun_types::message::MessageWriteExt;

use crate::common::scrape;
use crate::common::*;

pub(crate) const ADMIN: &str = "usage-admin-token-0123456789";
const MINT: &str = "usage-mint-token-0123456789";
pub(crate) const SIZE: u64 = 120;

pub(crate) fn http(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    scrape::get_bearer(addr.port(), path, token)
}

/// `total` of `GET /api/usage?QUERY` as the admin.
pub(crate) fn usage_total(tern: &Tern, query: &str) -> Value {
    let (code, body) = http(tern.api_addr(), &format!("/api/usage?{query}"), Some(ADMIN));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["total"].clone()
}

pub(crate) fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Waits until `cond` holds (records reach the store at the interim interval and flush).
pub(crate) fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn ended(tern: &Tern, user: &str) -> usize {
    tern.log()
        .lines()
        .filter(|l| l.contains("allocation ended") && l.contains(user))
        .count()
}

fn usage_section(path: &std::path::Path) -> String {
    format!("[usage]\npath = {path:?}\ninterim_secs = 1\nflush_ms = 100\n")
}

fn start(usage_db: &std::path::Path, extra_turn: &str, relay_min: u16) -> Tern {
    let mut opts = TernOpts::new(relay_min);
    opts.extra_turn += extra_turn;
    opts.api = Some(format!(
        "admin_tokens = [\"{ADMIN}\"]\ntokens = [\"{MINT}\"]\n"
    ));
    opts.extra_sections = usage_section(usage_db);
    opts.metrics = true;
    Tern::start(opts)
}

#[test]
fn relayed_bytes_per_user_reach_the_api_and_the_cli() {
    if !have_tool("turnutils_uclient") {
        panic!("turnutils_uclient missing (apt-get install coturn)");
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let tern = start(
        &db,
        "users = [{ name = \"bob\", password = \"bob-password-1\" }]\n",
        23_000,
    );
    let peer = EchoPeer::start();
    let args = ["-m", "1", "-n", "30", "-l", "120", "-c"];
    let limit = Duration::from_secs(60);

    // The admin routes: 401 without a token or with a wrong one, 403 with a minting token.
    let a = tern.api_addr();
    assert_eq!(http(a, "/api/usage", None).0, 401);
    assert_eq!(http(a, "/api/usage/top", None).0, 401);
    assert_eq!(http(a, "/api/usage", Some("not-a-token-at-all-xx")).0, 401);
    assert_eq!(http(a, "/api/usage", Some(MINT)).0, 403);
    assert_eq!(http(a, "/api/usage/top", Some(MINT)).0, 403);
    assert_eq!(http(a, "/api/usage?granularity=week", Some(ADMIN)).0, 400);

    // alice with two REST credentials of different expiries, bob with his static password.
    let mut alice = (0, 0);
    for ttl in [3600, 7200] {
        let user = format!("{}:alice", unix_now() + ttl);
        let pass = rest_password(&tern.secret, &user);
        let r = uclient_with(&tern, peer.port, &user, &pass, &args, limit);
        assert!(r.success && r.sent > 0, "{}", r.output);
        alice.0 += r.sent;
        alice.1 += r.received;
    }
    let r = uclient_with(&tern, peer.port, "bob", "bob-password-1", &args, limit);
    assert!(r.success && r.sent > 0, "{}", r.output);
    let bob = (r.sent, r.received);
    // uclient deletes its allocations when it finishes (Refresh with LIFETIME 0).
    wait_until("the allocations to end", Duration::from_secs(30), || {
        ended(&tern, ":alice") == 2 && ended(&tern, "bob") == 1
    });

    for (user, (sent, received)) in [("alice", alice), ("bob", bob)] {
        // Written within usage.flush_ms of the allocation's end.
        let mut t = Value::Null;
        // uclient makes two allocations per run and deletes the one that carried the
        // traffic; the other stays idle until its lifetime ends: every one counts.
        let created = tern
            .log()
            .lines()
            .filter(|l| l.contains("allocation created") && l.contains(&format!("{user} ")))
            .count() as u64;
        assert!(created >= 2, "{created}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            t = usage_total(&tern, &format!("user={user}&granularity=hour"));
            if t["allocations"].as_u64() == Some(created)
                && t["to_client_packets"].as_u64() == Some(received)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(n(&t, "allocations"), created, "{user}: {t}");
        // Every message uclient sent reached the peer, every one it got back was relayed.
        assert_eq!(n(&t, "to_peer_packets"), sent, "{user}: {t}");
        assert_eq!(n(&t, "to_peer_bytes"), sent * SIZE, "{user}: {t}");
        assert_eq!(n(&t, "to_client_packets"), received, "{user}: {t}");
        assert_eq!(n(&t, "to_client_bytes"), received * SIZE, "{user}: {t}");
        assert_eq!(n(&t, "tcp_to_peer_bytes"), 0);
        assert!(
            (1..=created).contains(&n(&t, "peak_allocations")),
            "{user}: {t}"
        );
        // The day rollup agrees with the hour rollup.
        let d = usage_total(&tern, &format!("user={user}&granularity=day"));
        assert_eq!(n(&d, "to_peer_bytes"), sent * SIZE);
    }

    // Top users of today: alice (two runs) first.
    let (code, body) = http(a, "/api/usage/top?period=day&limit=5", Some(ADMIN));
    assert_eq!(code, 200, "{body}");
    let top: Value = serde_json::from_str(&body).unwrap();
    let users: Vec<&str> = top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob"], "{body}");

    // The CLI reads the same store.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["usage", "--config"])
        .arg(tern.config_path())
        .args(["--user", "bob", "--granularity", "hour", "--format", "csv"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("user"), "bob");
    assert_eq!(col("to_peer_bytes"), (bob.0 * SIZE).to_string());
    assert_eq!(col("to_peer_packets"), bob.0.to_string());
    assert_eq!(col("to_client_bytes"), (bob.1 * SIZE).to_string());
    assert_eq!(col("to_client_packets"), bob.1.to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["usage", "--config"])
        .arg(tern.config_path())
        .args(["--format", "json"])
        .output()
        .unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        n(&j["total"], "to_peer_bytes"),
        (alice.0 + bob.0) * SIZE,
        "{j}"
    );

    // Metrics: counted, never by user.
    let (_, m) = scrape::get(tern.metrics_port, "/metrics");
    assert!(m.contains("tern_usage_records_written_total"), "{m}");
    assert!(
        !m.contains("alice") && !m.contains("bob"),
        "a user leaked into /metrics"
    );
}

/// A TURN client that relays `count` ChannelData packets of `size` bytes to `peer`.
fn relay_packets(c: &TurnClient, count: usize, size: usize) {
    let payload = vec![0x5a; size];
    for _ in 0..count {
        c.channel_data(0x4000, &payload);
        // Let the echo come back so loopback buffers never overflow.
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_keeps_the_last_interim_read_and_a_sound_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let mut tern = start(&db, "", 23_400);
    let peer = EchoPeer::start();
    let peer_addr: SocketAddr = format!("127.0.0.1:{}", peer.port).parse().unwrap();
    let (mut c, _) = TurnClient::allocate(&tern);
    assert_eq!(c.channel_bind(0x4000, peer_addr), None);
    relay_packets(&c, 50, 100);
    // The interim read (every second) brings all 50 into the store while the allocation lives.
    wait_until("the interim record", Duration::from_secs(10), || {
        usage_total(&tern, "user=hand&granularity=hour")["to_peer_packets"].as_u64() == Some(50)
    });
    // 20 more, then SIGKILL at once: they may or may not have been read (one interval).
    relay_packets(&c, 20, 100);
    tern.signal(libc::SIGKILL);
    tern.wait_exit(Duration::from_secs(10)).expect("tern died");
    drop(c);

    let store = tern::usage::SqliteStore::open_read(&db).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    drop(store);
    // A new daemon on the same store: the records are there, and it goes on counting.
    let tern2 = start(&db, "", 23_800);
    let t = usage_total(&tern2, "user=hand&granularity=hour");
    let p = n(&t, "to_peer_packets");
    assert!((50..=70).contains(&p), "{t}");
    assert_eq!(n(&t, "to_peer_bytes"), p * 100);
    assert_eq!(n(&t, "allocations"), 1);
}

/// An Allocate as REST user `user` from a fresh socket: its error code, if any.
pub(crate) fn allocate_as(tern: &Tern, user: &str) -> (Option<u16>, Vec<u8>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = udp_transaction(&sock, tern.addr(), &allocate_unauthenticated()).unwrap();
    let (realm, nonce) = realm_and_nonce(&first).unwrap();
    let name = format!("{}:{user}", unix_now() + 3600);
    let pass = rest_password(&tern.secret, &name);
    let resp = udp_transaction(
        &sock,
        tern.addr(),
        &allocate_authenticated(&name, &pass, &realm, &nonce),
    )
    .unwrap();
    (error_code(&resp), resp)
}

#[test]
fn daily_budget_refuses_refresh_and_allocate_until_a_reload_raises_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let budget = "user_bytes_per_day = 5000\ndefault_lifetime_secs = 5\n";
    let tern = start(&db, budget, 24_200);
    let peer = EchoPeer::start();
    let peer_addr: SocketAddr = format!("127.0.0.1:{}", peer.port).parse().unwrap();
    let (mut c, _) = TurnClient::allocate(&tern);
    assert_eq!(c.channel_bind(0x4000, peer_addr), None);
    // 30 × 100 bytes each way: 6000 bytes, over the 5000 budget once the interim read sees it.
    relay_packets(&c, 30, 100);
    wait_until("the interim record", Duration::from_secs(10), || {
        n(
            &usage_total(&tern, "user=hand&granularity=day"),
            "to_peer_bytes",
        ) == 3000
    });
    std::thread::sleep(Duration::from_millis(300));
    let resp = c.request(turn_types::message::REFRESH, |m| {
        m.add_attribute(&turn_types::attribute::Lifetime::new(600))
            .unwrap()
    });
    assert_eq!(error_code(&resp), Some(486));
    let msg = stun_types::message::Message::from_bytes(&resp).unwrap();
    let e = msg.attribute::<stun_types::attribute::ErrorCode>().unwrap();
    assert!(e.reason().contains("budget for today"), "{}", e.reason());
    // The allocation that crossed the budget ends at its lifetime (5 s).
    wait_until("the allocation to end", Duration::from_secs(15), || {
        ended(&tern, ":hand") == 1
    });
    let (code, _) = allocate_as(&tern, "hand");
    assert_eq!(code, Some(486));
    // Another user still gets in.
    assert_eq!(allocate_as(&tern, "carol").0, None);
    let (_, m) = scrape::get(tern.metrics_port, "/metrics");
    let line = m
        .lines()
        .find(|l| l.starts_with("tern_usage_budget_refusals_total{reason=\"day\"}"))
        .unwrap_or_else(|| panic!("no refusal counter:\n{m}"));
    assert_eq!(line.rsplit(' ').next(), Some("2"), "{line}");

    // A reload raising the budget admits the user again.
    let cfg = std::fs::read_to_string(tern.config_path()).unwrap();
    std::fs::write(
        tern.config_path(),
        cfg.replace("user_bytes_per_day = 5000", "user_bytes_per_day = 50000000"),
    )
    .unwrap();
    tern.signal(libc::SIGHUP);
    wait_until("the reload", Duration::from_secs(10), || {
        tern.log().contains("configuration reloaded")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(allocate_as(&tern, "hand").0, None);
}

/// Without root, the default `usage.path` (/var/lib/tern) cannot be made: the daemon still
/// serves and says accounting is off; with a budget configured it refuses to start instead,
/// naming usage.path (a budget it cannot enforce would be a silent failure).
#[test]
fn default_store_path_without_root_serves_without_accounting() {
    if !have_tool("setpriv") || std::path::Path::new(tern::config::DEFAULT_USAGE_PATH).exists() {
        // Someone (a root daemon) made the default store: nothing to check about a fresh box.
        eprintln!(
            "skipped: no setpriv, or {} exists",
            tern::config::DEFAULT_USAGE_PATH
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The binary must be reachable for `nobody`.
    let bin = dir.path().join("tern");
    std::fs::copy(env!("CARGO_BIN_EXE_tern"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let run = |extra: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .arg("serve")
            .arg(format!("--set=turn.listen=[\"127.0.0.1:{port}\"]"))
            .args([
                "--set=api.enabled=false",
                "--set=metrics.enabled=false",
                "--set=daemon.pid_file=",
                "--set=turn.min_port=24600",
                "--set=turn.max_port=24650",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .env("RUST_BACKTRACE", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    // With a budget: refused, naming the key.
    let out = run_with_limit(
        &mut run(&["--set=turn.user_bytes_per_day=1000"]),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("usage.path"), "{err}");
    // Without: serves (TURN answers a Binding), and the log says accounting is off.
    let child = run(&[]).spawn().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut answered = false;
    for _ in 0..50 {
        if udp_transaction(&sock, to, &binding_request()).is_some() {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(answered, "no Binding answer:\n{log}");
    assert!(log.contains("usage accounting is OFF"), "{log}");
}

/// RFC 6062 TCP relays: spliced bytes count in the TCP columns, not as UDP datagrams.
#[test]
fn tcp_relay_bytes_count_apart() {
    if !have_tool("turnutils_uclient") {
        panic!("turnutils_uclient missing (apt-get install coturn)");
    }
    let dir = tempfile::tempdir().unwrap();
    let tern = start(&dir.path().join("usage.db"), "", 24_700);
    let user = format!("{}:tcpdave", unix_now() + 3600);
    let pass = rest_password(&tern.secret, &user);
    // -T: client-to-client, each client's TCP allocation connects to the other's (no peer).
    let args = ["-T", "-m", "1", "-n", "20", "-l", "200", "-z", "10"];
    let r = uclient_with(&tern, 9, &user, &pass, &args, Duration::from_secs(60));
    assert!(
        r.success && r.sent > 0 && r.received == r.sent,
        "{}",
        r.output
    );
    let mut t = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        t = usage_total(&tern, "user=tcpdave&granularity=hour");
        if t["tcp_to_peer_bytes"].as_u64() == Some(r.sent * 200)
            && t["tcp_to_client_bytes"].as_u64() == Some(r.received * 200)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        n(&t, "tcp_to_peer_bytes"),
        r.sent * 200,
        "{t}\n{}",
        tern.log()
    );
    assert_eq!(n(&t, "tcp_to_client_bytes"), r.received * 200, "{t}");
    assert_eq!(n(&t, "to_peer_bytes") + n(&t, "to_client_bytes"), 0, "{t}");
}

/// `turn.user_max_bytes_per_sec`: two allocations of one user (uclient `-m 2`) share one cap,
/// so what they get through together is bounded by the rate over the run (plus one second
/// of burst); another user relaying at the same time has a cap of its own and loses nothing.
#[test]
fn user_cap_bounds_a_users_allocations_together() {
    if !have_tool("turnutils_uclient") {
        panic!("turnutils_uclient missing (apt-get install coturn)");
    }
    const RATE: u64 = 10_000;
    const LEN: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let tern = start(
        &dir.path().join("usage.db"),
        &format!("user_max_bytes_per_sec = {RATE}\n"),
        15_200,
    );
    let peer = EchoPeer::start();
    let run = |user: &str, args: &[&str]| {
        let name = format!("{}:{user}", unix_now() + 3600);
        let pass = rest_password(&tern.secret, &name);
        let t0 = Instant::now();
        let r = uclient_with(
            &tern,
            peer.port,
            &name,
            &pass,
            args,
            Duration::from_secs(60),
        );
        (r, t0.elapsed())
    };
    let (alice, bob) = std::thread::scope(|s| {
        // Two allocations × 150 messages of 1000 bytes at uclient's pace (about 50/s each):
        // about 100 kB/s offered each way, ten times the cap.
        let a = s.spawn(|| run("capalice", &["-m", "2", "-n", "150", "-l", "1000", "-c"]));
        // 8 kB in all, under one second of burst: nothing of it may be dropped.
        let b = s.spawn(|| run("capbob", &["-m", "1", "-n", "8", "-l", "1000", "-c"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let ((a, took), (b, _)) = (alice, bob);
    assert!(a.sent >= 200, "{}", a.output);
    // Echoed back means it passed the cap both ways. Bound: the rate over the run and one
    // second of burst (loose: the run also includes uclient's start and its final wait).
    let bound = RATE * (took.as_secs() + 2);
    assert!(
        a.received * LEN <= bound,
        "{} bytes through in {took:?}, cap {RATE}/s\n{}",
        a.received * LEN,
        a.output
    );
    assert!(a.received > 0, "{}", a.output);
    assert_eq!(b.received, b.sent, "bob lost packets\n{}", b.output);
    assert_eq!(b.sent, 8, "{}", b.output);
    let (_, m) = scrape::get(tern.metrics_port, "/metrics");
    let dropped = m
        .lines()
        .find(|l| l.starts_with("tern_relay_dropped_packets_total{reason=\"user_bandwidth\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no user_bandwidth drops:\n{m}"));
    assert!(
        dropped > 0.0 && a.received < a.sent,
        "{dropped}\n{}",
        a.output
    );
}
