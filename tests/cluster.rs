//! Cluster mode (issue 11) with real processes: two or three `tern serve` on loopback, each
//! with its own ports, sharing one `redis-server` this test starts on a free port (never the
//! system one). Covers the registry and `tern cluster status`, the cluster-wide user quota
//! (486 across nodes, freed within the lease after SIGKILL), drain steering of `/api/turn`
//! and ALTERNATE-SERVER, a Redis outage and restart, native rooms and PeerJS across nodes.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stun_types::message::Message;

/// Lease used by these tests (the minimum), seconds.
const LEASE: u64 = 3;
const TOKEN: &str = "cluster-test-token";

/// A private `redis-server` on a free loopback port, killed (by PID) on drop (also used by
/// `usage_cluster`).
pub(crate) struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    pub(crate) fn start() -> Option<Redis> {
        if !have_tool_from("redis-server", "redis-server") {
            return None;
        }
        Some(Redis::start_on(redis_port()))
    }

    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.ping() {
                return r;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("redis-server exited ({status}) before answering on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer PING on port {port}");
    }

    fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// One inline command; the raw reply.
    fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ports a test's Redis holds in this test binary, for the whole test (also while it is down
/// for an outage test), so no other test's Redis takes one.
static REDIS_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A free loopback port for a private Redis, below the kernel's ephemeral range (32768 and
/// up here) and above the tests' relay ranges. An outage test restarts Redis on the same port,
/// so the port must stay free while Redis is down: inside the ephemeral range any outgoing
/// connection (including a node's own reconnect, which can connect to itself) may take it.
fn redis_port() -> u16 {
    let mut taken = REDIS_PORTS.lock().unwrap();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    for i in 0..2700u64 {
        let port = 30000 + ((start + i * 7) % 2700) as u16;
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free port in 30000..32700 for a test Redis");
}

/// One node of the test cluster.
fn node(redis: &Redis, id: &str, relay_min: u16, secret: &str, cluster_extra: &str) -> Tern {
    Tern::start(TernOpts {
        api: Some(format!("tokens = [\"{TOKEN}\"]\n")),
        metrics: true,
        secret: Some(secret.to_string()),
        extra_turn: "unauth_rate_per_sec = 5000\nunauth_burst = 5000\nuser_quota = 2\n".into(),
        extra_sections: format!(
            "[cluster]\nredis_url = \"{}\"\nnode_id = \"{id}\"\nlease_secs = {LEASE}\n{cluster_extra}\n",
            redis.url()
        ),
        drain_timeout_secs: 30,
        ..TernOpts::new(relay_min)
    })
}

/// An authenticated Allocate for user `user` from a fresh socket: (socket, response).
fn allocate(tern: &Tern, user: &str) -> (UdpSocket, Vec<u8>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = udp_transaction(&sock, tern.addr(), &allocate_unauthenticated()).expect("401");
    let (realm, nonce) = realm_and_nonce(&first).expect("REALM and NONCE");
    let username = format!("{}:{user}", unix_now() + 600);
    let pw = rest_password(&tern.secret, &username);
    let resp = udp_transaction(
        &sock,
        tern.addr(),
        &allocate_authenticated(&username, &pw, &realm, &nonce),
    )
    .expect("an answer to the authenticated Allocate");
    (sock, resp)
}

/// Allocates and asserts success; the socket keeps the allocation's 5-tuple alive.
fn allocate_ok(tern: &Tern, user: &str) -> UdpSocket {
    let (sock, resp) = allocate(tern, user);
    assert_eq!(
        error_code(&resp),
        None,
        "Allocate on :{} refused",
        tern.port
    );
    sock
}

/// ALTERNATE-SERVER (0x8023) of an IPv4 response.
fn alternate_server(resp: &[u8]) -> Option<SocketAddr> {
    let msg = Message::from_bytes(resp).ok()?;
    let raw = msg.raw_attribute(0x8023.into())?;
    let v = raw.value.as_ref();
    (v.len() == 8 && v[1] == 1)
        .then(|| SocketAddr::from(([v[4], v[5], v[6], v[7]], u16::from_be_bytes([v[2], v[3]]))))
}

/// The TURN port `/api/turn` on `tern` names (all URIs name one node).
fn api_turn_port(tern: &Tern) -> u16 {
    let (status, body) = common::scrape::get(
        tern.api_port,
        &format!("/api/turn?service=turn&username=u&key={TOKEN}"),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let uri = v["uris"][0].as_str().unwrap().to_string();
    // turn:127.0.0.1:PORT?transport=udp
    let hostport = uri.trim_start_matches("turn:").split('?').next().unwrap();
    hostport.rsplit_once(':').unwrap().1.parse().unwrap()
}

pub(crate) fn metric(tern: &Tern, name: &str) -> Option<f64> {
    let (_, body) = common::scrape::get(tern.metrics_port, "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn renewals(t: &Tern) -> f64 {
    metric(t, "tern_cluster_quota_lease_operations_total{op=\"renew\"}").unwrap_or(0.0)
}

/// Waits until `t`'s cluster driver has completed `n` more ticks (each renews the leases
/// once): after one, what `t` changed before is in Redis; after two, `t` has read what
/// others wrote before.
fn after_ticks(t: &Tern, n: f64) {
    let r0 = renewals(t);
    wait_for(Duration::from_secs(10), "cluster driver ticks", || {
        renewals(t) >= r0 + n
    });
}

/// Polls `f` every 100 ms until it holds or `limit` passes; the time it took.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}");
}

fn tern_cmd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_lines(tern: &Tern) -> String {
    let cfg = tern.config_path();
    let (ok, out, err) = tern_cmd(&["cluster", "status", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "tern cluster status failed: {err}");
    out
}

#[test]
fn registry_lists_live_nodes_and_check_config_tries_redis() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    let a = node(&redis, "node-a", 10000, &secret, "");
    let b = node(&redis, "node-b", 10200, &secret, "");
    wait_for(Duration::from_secs(5), "both nodes in the registry", || {
        let s = status_lines(&a);
        s.contains("node-a") && s.contains("node-b") && s.contains("2 live node(s)")
    });
    let s = status_lines(&b);
    assert!(
        s.contains(&format!("127.0.0.1:{}", a.port))
            && s.contains(&format!("127.0.0.1:{}", b.port)),
        "{s}"
    );
    assert_eq!(metric(&a, "tern_cluster_redis_up"), Some(1.0));
    wait_for(Duration::from_secs(3), "nodes gauge", || {
        metric(&a, "tern_cluster_nodes") == Some(2.0)
    });
    // Every cluster metric the Grafana dashboard queries is in a cluster node's scrape.
    let (_, scrape) = common::scrape::get(a.metrics_port, "/metrics");
    let names = crate::metrics_live::sample_names(&scrape);
    let cluster: Vec<_> = crate::metrics_live::dashboard_metrics()
        .into_iter()
        .filter(|m| m.starts_with("tern_cluster_"))
        .collect();
    assert!(cluster.len() >= 5, "{cluster:?}");
    for m in &cluster {
        assert!(
            names.contains(m),
            "the dashboard queries {m}, not in a cluster node's scrape"
        );
    }

    let cfg = a.config_path();
    let (ok, out, _) = tern_cmd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(ok && out.contains("answered PING"), "{out}");
    let (ok, out, _) = tern_cmd(&[
        "check-config",
        "--offline",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(ok && !out.contains("PING"), "{out}");

    // A node stopped cleanly leaves at once; the registry keeps the other.
    assert!(b.terminate());
    let s = status_lines(&a);
    assert!(s.contains("1 live node(s)") && !s.contains("node-b"), "{s}");

    redis.kill();
    let (ok, out, _) = tern_cmd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(ok && out.contains("not reachable"), "{out}");
    let (ok, _, err) = tern_cmd(&["cluster", "status", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("cannot read the registry"), "{err}");
}

#[test]
fn bad_cluster_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    for (text, key) in [
        ("redis_url = \"http://x\"", "cluster.redis_url"),
        (
            "redis_url = \"redis://127.0.0.1:1\"\nlease_secs = 1",
            "cluster.lease_secs",
        ),
        (
            "redis_url = \"redis://127.0.0.1:1\"\nnode_id = \"a b\"",
            "cluster.node_id",
        ),
        (
            "redis_url = \"redis://127.0.0.1:1\"\nredis_password_file = \"/nonexistent/pw\"",
            "cluster.redis_password_file",
        ),
        (
            "redis_url = \"redis://127.0.0.1:1\"\nadvertise_http_url = \"turn.example\"",
            "cluster.advertise_http_url",
        ),
    ] {
        std::fs::write(&p, format!("[cluster]\n{text}\n")).unwrap();
        let (ok, _, err) = tern_cmd(&["check-config", "--config", p.to_str().unwrap()]);
        assert!(!ok && err.contains(key), "{text}: {err}");
    }
}

#[test]
fn user_quota_spans_nodes_and_frees_within_the_lease_after_sigkill() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    let mut a = node(&redis, "quota-a", 10400, &secret, "");
    let b = node(&redis, "quota-b", 10600, &secret, "");
    // user_quota = 2: both on A.
    let _held = [allocate_ok(&a, "alice"), allocate_ok(&a, "alice")];
    let (_s, third) = allocate(&a, "alice");
    assert_eq!(error_code(&third), Some(486), "third on the same node");
    // A writes its lease at its next tick, B reads it at one of its next: then alice is
    // at quota on B too.
    after_ticks(&a, 1.0);
    after_ticks(&b, 2.0);
    assert_eq!(
        error_code(&allocate(&b, "alice").1),
        Some(486),
        "alice on node B"
    );
    // Another user is unaffected.
    let _bob = allocate_ok(&b, "bob");
    after_ticks(&b, 1.0);
    assert!(
        metric(
            &b,
            "tern_cluster_quota_lease_operations_total{op=\"write\"}"
        )
        .unwrap()
            >= 1.0
    );

    // SIGKILL: A cannot withdraw its leases; they lapse within one lease.
    a.signal(libc::SIGKILL);
    assert!(a.wait_exit(Duration::from_secs(5)).is_some());
    let took = wait_for(
        Duration::from_secs(LEASE + 3),
        "alice's quota freed on B after A died",
        || error_code(&allocate(&b, "alice").1).is_none(),
    );
    eprintln!("quota freed {took:?} after SIGKILL (lease {LEASE} s)");
    // The dead node left the registry too.
    let s = status_lines(&b);
    assert!(!s.contains("quota-a") && s.contains("quota-b"), "{s}");
}

#[test]
fn drain_steers_credentials_and_alternate_server_to_a_healthy_node() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    // A: healthy, lightly loaded; B: healthy, half full; C: full (steers away from itself).
    let a = node(&redis, "steer-a", 10800, &secret, "max_allocations = 100");
    let b = node(&redis, "steer-b", 11000, &secret, "max_allocations = 2");
    let c = node(&redis, "steer-c", 11200, &secret, "max_allocations = 1");
    // A keeps one allocation so its drain lasts; B is at 1/2, C at 1/1.
    let _a1 = allocate_ok(&a, "ua");
    let _b1 = allocate_ok(&b, "ub");
    let _c1 = allocate_ok(&c, "uc");
    assert_eq!(api_turn_port(&a), a.port, "a healthy node names itself");
    wait_for(
        Duration::from_secs(5),
        "full C steers to A (least loaded)",
        || api_turn_port(&c) == a.port,
    );

    a.signal(libc::SIGTERM);
    let took = wait_for(Duration::from_secs(3), "C stops naming draining A", || {
        api_turn_port(&c) == b.port
    });
    eprintln!("C steered away from draining A within {took:?}");
    assert_eq!(api_turn_port(&a), b.port, "draining A names B");
    assert!(metric(&a, "tern_cluster_ice_steered_total").unwrap() >= 1.0);
    // New allocations on A: 300 Try Alternate naming B's TURN address.
    wait_for(
        Duration::from_secs(3),
        "300 with B's address from A",
        || {
            let (_s, resp) = allocate(&a, "newcomer");
            error_code(&resp) == Some(300) && alternate_server(&resp) == Some(b.addr())
        },
    );
    // Full C is never offered: A's alternates and B's credentials skip it.
    assert_eq!(api_turn_port(&b), b.port);
}

#[test]
fn redis_outage_keeps_nodes_serving_and_restart_repopulates() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let port = redis.port;
    let secret = random_secret();
    let mut a = node(&redis, "outage-a", 11400, &secret, "");
    let b = node(&redis, "outage-b", 11600, &secret, "");
    let _held = [allocate_ok(&b, "carol"), allocate_ok(&b, "carol")];
    after_ticks(&b, 1.0);
    after_ticks(&a, 2.0);
    assert_eq!(
        error_code(&allocate(&a, "carol").1),
        Some(486),
        "carol at quota on A"
    );
    let rss_before = a.rss_kib();

    redis.kill();
    wait_for(Duration::from_secs(5), "redis_up 0 on A", || {
        metric(&a, "tern_cluster_redis_up") == Some(0.0)
    });
    // Alone, A applies the local quota: carol may allocate here again.
    let _local = allocate_ok(&a, "carol");
    // Credentials still come, naming A itself.
    assert_eq!(api_turn_port(&a), a.port);
    // 200 users allocate while Redis is away: their quota marks must not pile up.
    let mut churn = Vec::new();
    for i in 0..200 {
        churn.push(allocate_ok(&a, &format!("churn{i}")));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.alive());
    let outages = a.log().matches("cluster: Redis unreachable").count();
    assert_eq!(outages, 1, "one log line per outage:\n{}", a.log());
    let rss_during = a.rss_kib();
    assert!(
        rss_during < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to {rss_during} KiB during the outage"
    );

    // Redis comes back empty on the same port: both nodes re-announce within a lease.
    let restarted = Redis::start_on(port);
    let took = wait_for(
        Duration::from_secs(LEASE + 6),
        "both nodes back in the registry",
        || {
            let s = status_lines(&a);
            s.contains("outage-a") && s.contains("outage-b")
        },
    );
    eprintln!("registry repopulated {took:?} after Redis restarted");
    assert_eq!(metric(&a, "tern_cluster_redis_up"), Some(1.0));
    assert!(metric(&a, "tern_cluster_redis_connects_total").unwrap() >= 2.0);
    assert!(
        metric(
            &b,
            "tern_cluster_quota_lease_operations_total{op=\"rewrite\"}"
        )
        .unwrap()
            >= 2.0
    );
    // B's leases were rewritten: carol (2 on B, 1 on A) is over quota on both again.
    after_ticks(&b, 1.0);
    after_ticks(&a, 2.0);
    assert_eq!(
        error_code(&allocate(&a, "carol").1),
        Some(486),
        "carol's leases repopulated"
    );
    assert!(restarted
        .command("KEYS tern:quota:*")
        .is_some_and(|r| r.contains("outage-b")));
    assert!(a.log().contains("Redis reachable again"));
}

/// Reads messages until one satisfies `want` (others are skipped), within `limit`.
async fn wait_msg(
    ws: &mut crate::signal_common::Ws,
    limit: Duration,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = tokio::time::timeout_at(deadline, crate::signal_common::next_json(ws))
            .await
            .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"));
        if want(&m) {
            return m;
        }
    }
}

#[test]
fn native_rooms_span_nodes_survive_a_redis_restart_and_drop_a_killed_nodes_peers() {
    use crate::signal_common::{send_text, ws};
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let port = redis.port;
    let secret = random_secret();
    let a = node(&redis, "sig-a", 11800, &secret, "");
    let b = node(&redis, "sig-b", 12000, &secret, "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Duration::from_secs(10);
        let mut a1 = ws(a.api_addr(), "/ws").await;
        let wa = wait_msg(&mut a1, t, "welcome on A", |m| m["type"] == "welcome").await;
        let a1_id = wa["id"].as_str().unwrap().to_string();
        // A publishes its member list at its next tick; B reads it at one of its next.
        after_ticks(&a, 1.0);
        after_ticks(&b, 2.0);
        let mut b1 = ws(b.api_addr(), "/ws").await;
        let wb = wait_msg(&mut b1, t, "welcome on B", |m| m["type"] == "welcome").await;
        let b1_id = wb["id"].as_str().unwrap().to_string();
        // The LAN room (both on 127.0.0.1) spans the nodes.
        let lan = wait_msg(&mut b1, t, "lan members on B", |m| m["type"] == "room").await;
        assert_eq!(lan["room"], "lan");
        // b1 is B's first member of the LAN room: B subscribes to its channel then and
        // reads A's members of it, so a1 is listed, or announced right after.
        let listed = lan["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == a1_id.as_str());
        if !listed {
            wait_msg(&mut b1, t, "a1 in lan on B", |m| {
                m["type"] == "peer-joined"
                    && m["room"] == "lan"
                    && m["peer"]["id"] == a1_id.as_str()
            })
            .await;
        }
        wait_msg(&mut a1, t, "B's peer joins A's lan room", |m| {
            m["type"] == "peer-joined" && m["room"] == "lan" && m["peer"]["id"] == b1_id.as_str()
        })
        .await;

        // A named room across nodes: member list, join event, messages both ways, in order.
        send_text(&mut a1, r#"{"type":"join","room":"r1"}"#).await;
        wait_msg(&mut a1, t, "r1 on A", |m| {
            m["type"] == "room" && m["room"] == "r1"
        })
        .await;
        send_text(&mut b1, r#"{"type":"join","room":"r1"}"#).await;
        let r1 = wait_msg(&mut b1, t, "r1 on B", |m| {
            m["type"] == "room" && m["room"] == "r1"
        })
        .await;
        // A's join travels by pub/sub: B lists a1 at once if the event came first, else
        // announces a1 as soon as it arrives.
        let listed = r1["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == a1_id.as_str());
        if !listed {
            wait_msg(&mut b1, t, "a1 in r1 on B", |m| {
                m["type"] == "peer-joined" && m["room"] == "r1" && m["peer"]["id"] == a1_id.as_str()
            })
            .await;
        }
        wait_msg(&mut a1, t, "B joins r1", |m| {
            m["type"] == "peer-joined" && m["room"] == "r1" && m["peer"]["id"] == b1_id.as_str()
        })
        .await;
        for i in 0..50 {
            send_text(
                &mut a1,
                &format!(r#"{{"type":"signal","to":"{b1_id}","data":{{"n":{i}}}}}"#),
            )
            .await;
        }
        for i in 0..50 {
            let m = wait_msg(&mut b1, t, "signal from A", |m| m["type"] == "signal").await;
            assert_eq!(m["from"], a1_id.as_str());
            assert_eq!(m["data"]["n"], i, "in order per sender");
        }
        let published = "tern_cluster_bus_messages_total{direction=\"published\"}";
        let received = "tern_cluster_bus_messages_total{direction=\"received\"}";
        assert!(metric(&a, published).unwrap() >= 50.0);
        assert!(metric(&b, received).unwrap() >= 50.0);
        // Each delivery from A is timed on B.
        let timed = metric(&b, "tern_cluster_bus_latency_seconds_count").unwrap();
        assert!(timed >= 50.0, "{timed} deliveries timed");
        let slow = metric(&b, "tern_cluster_bus_latency_seconds_bucket{le=\"+Inf\"}").unwrap();
        assert_eq!(slow, timed);
        send_text(
            &mut b1,
            &format!(r#"{{"type":"signal","to":"{a1_id}","data":"hi"}}"#),
        )
        .await;
        let m = wait_msg(&mut a1, t, "signal from B", |m| m["type"] == "signal").await;
        assert_eq!(
            (m["from"].as_str(), m["data"].as_str()),
            (Some(b1_id.as_str()), Some("hi"))
        );

        // Redis killed: rooms within a node keep working, cross-node sends get an error.
        redis.kill();
        wait_for(Duration::from_secs(5), "A notices the outage", || {
            metric(&a, "tern_cluster_redis_up") == Some(0.0)
        });
        let mut a2 = ws(a.api_addr(), "/ws").await;
        wait_msg(&mut a2, t, "welcome on A during the outage", |m| {
            m["type"] == "welcome"
        })
        .await;
        send_text(&mut a2, r#"{"type":"join","room":"r1"}"#).await;
        wait_msg(&mut a1, t, "local join during the outage", |m| {
            m["type"] == "peer-joined" && m["room"] == "r1"
        })
        .await;
        send_text(
            &mut a1,
            &format!(r#"{{"type":"signal","to":"{b1_id}","data":1}}"#),
        )
        .await;
        let e = wait_msg(&mut a1, t, "cross-node error", |m| m["type"] == "error").await;
        assert_eq!(e["code"], "cluster-unavailable", "{e}");
        assert_eq!(e["to"], b1_id.as_str());

        // Redis back (empty): delivery resumes within seconds, no restart of Tern.
        let _restarted = Redis::start_on(port);
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no cross-node delivery after restart"
            );
            send_text(
                &mut a1,
                &format!(r#"{{"type":"signal","to":"{b1_id}","data":"back"}}"#),
            )
            .await;
            let got = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    let m = crate::signal_common::next_json(&mut b1).await;
                    if m["type"] == "signal" && m["data"] == "back" {
                        return;
                    }
                }
            })
            .await;
            if got.is_ok() {
                break;
            }
        }
        eprintln!(
            "cross-node delivery back {:?} after Redis restarted",
            start.elapsed()
        );

        // B killed: its peer leaves A's rooms within the lease.
        b.signal(libc::SIGKILL);
        let killed = Instant::now();
        wait_msg(
            &mut a1,
            Duration::from_secs(LEASE + 5),
            "B's peer leaves r1",
            |m| m["type"] == "peer-left" && m["room"] == "r1" && m["id"] == b1_id.as_str(),
        )
        .await;
        eprintln!(
            "peer of the killed node left {:?} after SIGKILL",
            killed.elapsed()
        );
    });
}

fn peerjs_path(id: &str, token: &str) -> String {
    format!("/peerjs/peerjs?key=peerjs&id={id}&token={token}&version=1.5.5")
}

#[test]
fn peerjs_ids_and_messages_span_nodes_survive_a_redis_restart_and_free_a_killed_nodes_ids() {
    use crate::signal_common::{next_json, send_text, ws};
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let port = redis.port;
    let secret = random_secret();
    let a = node(&redis, "pj-a", 12200, &secret, "");
    let b = node(&redis, "pj-b", 12400, &secret, "");
    // Both nodes see each other before the peers arrive.
    after_ticks(&a, 2.0);
    after_ticks(&b, 2.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Duration::from_secs(10);
        let mut alice = ws(a.api_addr(), &peerjs_path("alice", "ta")).await;
        assert_eq!(next_json(&mut alice).await["type"], "OPEN");
        assert!(
            redis
                .command("GET tern:peerjs:id:alice")
                .is_some_and(|r| r.contains("pj-a")),
            "alice claimed by node A in Redis"
        );
        // The same id on the other node, another token: ID-TAKEN, closed.
        let mut thief = ws(b.api_addr(), &peerjs_path("alice", "stolen")).await;
        let m = tokio::time::timeout(t, next_json(&mut thief)).await.unwrap();
        assert_eq!(m["type"], "ID-TAKEN", "{m}");
        let mut bob = ws(b.api_addr(), &peerjs_path("bob", "tb")).await;
        assert_eq!(next_json(&mut bob).await["type"], "OPEN");

        // OFFER and CANDIDATEs from A to B: intact, in order, src set by the server.
        let sdp: String = "v=0\r\nä→✓ ".repeat(2000);
        let offer = serde_json::json!({"type":"OFFER","dst":"bob","payload":{"sdp":sdp,"type":"data","connectionId":"dc_1"}});
        send_text(&mut alice, &offer.to_string()).await;
        for i in 0..100 {
            send_text(
                &mut alice,
                &format!(r#"{{"type":"CANDIDATE","dst":"bob","payload":{{"n":{i}}}}}"#),
            )
            .await;
        }
        let m = tokio::time::timeout(t, next_json(&mut bob)).await.unwrap();
        assert_eq!(m["type"], "OFFER");
        assert_eq!(m["src"], "alice");
        assert_eq!(m["dst"], "bob");
        assert_eq!(m["payload"]["sdp"].as_str(), Some(sdp.as_str()), "intact");
        for i in 0..100 {
            let m = tokio::time::timeout(t, next_json(&mut bob)).await.unwrap();
            assert_eq!((m["type"].as_str(), m["src"].as_str()), (Some("CANDIDATE"), Some("alice")));
            assert_eq!(m["payload"]["n"], i, "in order");
        }
        // ANSWER back from B to A.
        send_text(&mut bob, r#"{"type":"ANSWER","dst":"alice","payload":{"sdp":"ok"}}"#).await;
        let m = tokio::time::timeout(t, next_json(&mut alice)).await.unwrap();
        assert_eq!(
            m,
            serde_json::json!({"type":"ANSWER","src":"bob","dst":"alice","payload":{"sdp":"ok"}})
        );
        // An id on no node: EXPIRE after expire_timeout (5 s).
        send_text(&mut alice, r#"{"type":"OFFER","dst":"nobody","payload":{}}"#).await;
        let m = tokio::time::timeout(t, next_json(&mut alice)).await.unwrap();
        assert_eq!(m, serde_json::json!({"type":"EXPIRE","src":"nobody","dst":"alice"}));

        // Redis killed: a send to a peer on the other node gets EXPIRE at once (never
        // ERROR); peers on one node keep working and new ids open.
        redis.kill();
        wait_for(Duration::from_secs(5), "A notices the outage", || {
            metric(&a, "tern_cluster_redis_up") == Some(0.0)
        });
        send_text(&mut alice, r#"{"type":"OFFER","dst":"bob","payload":{}}"#).await;
        let m = tokio::time::timeout(t, next_json(&mut alice)).await.unwrap();
        assert_eq!(m, serde_json::json!({"type":"EXPIRE","src":"bob","dst":"alice"}));
        let mut carol = ws(a.api_addr(), &peerjs_path("carol", "tc")).await;
        assert_eq!(next_json(&mut carol).await["type"], "OPEN");
        send_text(&mut alice, r#"{"type":"CANDIDATE","dst":"carol","payload":{"c":1}}"#).await;
        let m = tokio::time::timeout(t, next_json(&mut carol)).await.unwrap();
        assert_eq!((m["type"].as_str(), m["src"].as_str()), (Some("CANDIDATE"), Some("alice")));

        // Redis back (empty): delivery across nodes resumes without restarting Tern.
        let _restarted = Redis::start_on(port);
        let back = Instant::now();
        loop {
            assert!(back.elapsed() < Duration::from_secs(15), "no delivery after restart");
            send_text(&mut alice, r#"{"type":"CANDIDATE","dst":"bob","payload":"back"}"#).await;
            let got = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    let m = next_json(&mut bob).await;
                    if m["payload"] == "back" {
                        return;
                    }
                }
            })
            .await;
            if got.is_ok() {
                break;
            }
        }
        eprintln!("PeerJS delivery across nodes back {:?} after Redis restarted", back.elapsed());
        assert!(_restarted
            .command("GET tern:peerjs:id:bob")
            .is_some_and(|r| r.contains("pj-b")), "claims rewritten after the restart");

        // B killed: bob's id is free on A within the lease.
        b.signal(libc::SIGKILL);
        let killed = Instant::now();
        loop {
            assert!(
                killed.elapsed() < Duration::from_secs(LEASE + 5),
                "bob's id not free within the lease"
            );
            let mut again = ws(a.api_addr(), &peerjs_path("bob", "new")).await;
            let m = tokio::time::timeout(t, next_json(&mut again)).await.unwrap();
            if m["type"] == "OPEN" {
                break;
            }
            assert_eq!(m["type"], "ID-TAKEN", "{m}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!("killed node's PeerJS id free {:?} after SIGKILL", killed.elapsed());
    });
}

#[test]
fn real_peerjs_client_on_node_a_connects_to_a_peer_registered_on_node_b() {
    if !crate::signal_browser::tooling_present() {
        return;
    }
    let Some(redis) = Redis::start() else {
        return;
    };
    let _one = common::browser_lock();
    let secret = random_secret();
    let a = node(&redis, "br-a", 12600, &secret, "");
    let b = node(&redis, "br-b", 12800, &secret, "");
    after_ticks(&a, 2.0);
    after_ticks(&b, 2.0);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/peerjs.mjs");
    let out = Command::new("node")
        .arg(&script)
        .env("TERN_PORT", a.api_addr().port().to_string())
        .env("TERN_PORT_B", b.api_addr().port().to_string())
        // Relay-only ICE with credentials from each node's /api/ice.
        .env("TERN_API_TOKEN", TOKEN)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "peerjs.mjs across nodes failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{}", stdout.trim());
    // The signaling really crossed the nodes (both directions).
    let published = "tern_cluster_bus_messages_total{direction=\"published\"}";
    assert!(metric(&a, published).unwrap() > 0.0);
    assert!(metric(&b, published).unwrap() > 0.0);
    // The data went through TURN on both nodes (one allocation per side and connection).
    let created = "tern_turn_allocations_created_total";
    assert!(metric(&a, created).unwrap() >= 2.0, "allocations on A");
    assert!(metric(&b, created).unwrap() >= 2.0, "allocations on B");
}

/// Redis's `INFO stats` counter `field` (bytes or commands so far).
fn redis_stat(redis: &Redis, field: &str) -> u64 {
    let info = redis.command("INFO stats").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO stats: {info}"))
}

/// Two nodes `ids` (relay ports from `relay_min`) that host cross-node relays: each
/// advertises its HTTP URL.
fn relay_nodes(redis: &Redis, ids: [&str; 2], relay_min: [u16; 2]) -> (Tern, Tern) {
    let secret = random_secret();
    let url = "advertise_http_url = \"http://127.0.0.1:{api_port}\"";
    (
        node(redis, ids[0], relay_min[0], &secret, url),
        node(redis, ids[1], relay_min[1], &secret, url),
    )
}

#[test]
fn relay_between_peers_on_two_nodes_meets_on_the_requesters_node_and_moves_20_mib() {
    use crate::signal_common::{send_text, ws};
    use futures_util::{SinkExt, StreamExt};
    use sha2::{Digest, Sha256};
    use tokio_tungstenite::tungstenite::Message as WsMsg;
    let Some(redis) = Redis::start() else {
        return;
    };
    let (a, b) = relay_nodes(&redis, ["relay-a", "relay-b"], [13000, 13200]);
    after_ticks(&a, 1.0);
    after_ticks(&b, 1.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Duration::from_secs(10);
        let mut a1 = ws(a.api_addr(), "/ws").await;
        let wa = wait_msg(&mut a1, t, "welcome on A", |m| m["type"] == "welcome").await;
        let a1_id = wa["id"].as_str().unwrap().to_string();
        let mut b1 = ws(b.api_addr(), "/ws").await;
        let wb = wait_msg(&mut b1, t, "welcome on B", |m| m["type"] == "welcome").await;
        let b1_id = wb["id"].as_str().unwrap().to_string();
        send_text(&mut a1, r#"{"type":"join","room":"rr"}"#).await;
        send_text(&mut b1, r#"{"type":"join","room":"rr"}"#).await;
        wait_msg(&mut a1, t, "B's peer joins rr on A", |m| {
            m["type"] == "peer-joined" && m["room"] == "rr" && m["peer"]["id"] == b1_id.as_str()
        })
        .await;
        send_text(&mut a1, &format!(r#"{{"type":"relay","to":"{b1_id}"}}"#)).await;
        let ta = wait_msg(&mut a1, t, "A's ticket", |m| m["type"] == "relay-ticket").await;
        let tb = wait_msg(&mut b1, t, "B's ticket", |m| m["type"] == "relay-ticket").await;
        assert_eq!(ta["peer"], b1_id.as_str());
        assert_eq!(ta["path"], "/relay");
        assert!(
            ta.get("url").is_none(),
            "A's session is on its own node: {ta}"
        );
        assert_eq!(tb["peer"], a1_id.as_str());
        // B is told A's node: both sides meet there.
        let b_url = tb["url"]
            .as_str()
            .expect("B's ticket names the hosting node");
        assert_eq!(b_url, format!("ws://{}/relay", a.api_addr()));
        let bytes_before = redis_stat(&redis, "total_net_input_bytes");
        let ticket_a = ta["ticket"].as_str().unwrap();
        let ticket_b = tb["ticket"].as_str().unwrap();
        let mut ra = ws(a.api_addr(), &format!("/relay?ticket={ticket_a}")).await;
        let (mut rb, _) = tokio_tungstenite::connect_async(format!("{b_url}?ticket={ticket_b}"))
            .await
            .expect("B reaches A's relay");
        const TOTAL: usize = 20 << 20;
        const FRAME: usize = 64 << 10;
        // B sends to A: the side that was told another node's URL carries the bulk.
        let sender = tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut sent = 0usize;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while sent < TOTAL {
                let n = FRAME.min(TOTAL - sent);
                let mut chunk = Vec::with_capacity(n);
                while chunk.len() < n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.extend_from_slice(&x.to_le_bytes());
                }
                chunk.truncate(n);
                h.update(&chunk);
                sent += n;
                rb.send(WsMsg::Binary(chunk.into())).await.unwrap();
            }
            rb.close(None).await.unwrap();
            h.finalize()
        });
        let mut h = Sha256::new();
        let mut got = 0usize;
        let code = loop {
            let m = tokio::time::timeout(Duration::from_secs(60), ra.next())
                .await
                .expect("relay stalled")
                .expect("stream open")
                .expect("frame");
            match m {
                WsMsg::Binary(d) => {
                    got += d.len();
                    h.update(&d);
                }
                WsMsg::Close(f) => break f.map(|f| u16::from(f.code)),
                _ => {}
            }
        };
        let digest = sender.await.unwrap();
        assert_eq!(got, TOTAL);
        assert_eq!(h.finalize(), digest, "20 MiB intact");
        assert_eq!(code, Some(1000));
        // The bulk went A-node to B's socket directly: Redis saw only the usual ticks.
        let redis_in = redis_stat(&redis, "total_net_input_bytes") - bytes_before;
        assert!(
            redis_in < (TOTAL / 10) as u64,
            "{redis_in} bytes reached Redis while 20 MiB were relayed"
        );
        eprintln!("relay across nodes: {got} bytes relayed, {redis_in} bytes into Redis meanwhile");
        let relayed = metric(&a, "tern_ws_relay_bytes_total").unwrap_or(0.0);
        assert!(relayed >= TOTAL as f64, "A hosted the session: {relayed}");
        assert_eq!(metric(&b, "tern_ws_relay_bytes_total").unwrap_or(0.0), 0.0);
    });
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/PID/task/*/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

/// A signal or relay ticket that reaches a node whose addressee is not there (it left, or,
/// as here, never was: a stale entry in that node's member list) is answered over the bus
/// at once: the sender gets `peer-not-found` as on one node, counted as `no_target`, and a
/// requester already waiting on `/relay` is closed with 1013 rather than at the ticket's
/// expiry (60 s). Node B is stopped (SIGSTOP) while the requester connects to `/relay`, so
/// the answer comes while it waits.
#[test]
fn a_signal_or_relay_ticket_for_a_gone_peer_is_refused_to_its_sender_at_once() {
    use crate::signal_common::{close_code, send_text, ws};
    let Some(redis) = Redis::start() else {
        return;
    };
    let (a, b) = relay_nodes(&redis, ["und-a", "und-b"], [19000, 19400]);
    // B has no peer: its member list is written (empty) at its first tick and only renewed
    // after, so a stale entry put there stays. A then knows B.
    after_ticks(&b, 1.0);
    let ghost = r#"{\"id\":\"ghost\",\"name\":\"Ghost\",\"rooms\":[\"room:gx\"]}"#;
    let set = redis.command(&format!("HSET tern:members:und-b ghost \"{ghost}\""));
    assert_eq!(set.as_deref(), Some(":1\r\n"));
    after_ticks(&a, 2.0);
    let no_target = "tern_signal_refused_total{protocol=\"native\",reason=\"no_target\"}";
    let cancelled = "tern_ws_relay_sessions_cancelled_total";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Duration::from_secs(10);
        let mut a1 = ws(a.api_addr(), "/ws").await;
        wait_msg(&mut a1, t, "welcome on A", |m| m["type"] == "welcome").await;
        // Joining gx, A subscribes to it and reads B's members of it: the ghost.
        send_text(&mut a1, r#"{"type":"join","room":"gx"}"#).await;
        let room = wait_msg(&mut a1, t, "gx on A", |m| {
            m["type"] == "room" && m["room"] == "gx"
        })
        .await;
        let listed = room["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "ghost");
        if !listed {
            wait_msg(&mut a1, t, "the ghost in gx on A", |m| {
                m["type"] == "peer-joined" && m["room"] == "gx" && m["peer"]["id"] == "ghost"
            })
            .await;
        }
        let refused0 = metric(&a, no_target).unwrap_or(0.0);

        // A signal: B answers that it has no such peer; a1 hears it as on one node.
        let sent = Instant::now();
        send_text(&mut a1, r#"{"type":"signal","to":"ghost","data":1}"#).await;
        let e = wait_msg(&mut a1, t, "the signal refused", |m| m["type"] == "error").await;
        let took = sent.elapsed();
        assert_eq!(
            (e["code"].as_str(), e["to"].as_str()),
            (Some("peer-not-found"), Some("ghost")),
            "{e}"
        );
        assert_eq!(metric(&a, no_target), Some(refused0 + 1.0));
        eprintln!("undeliverable signal refused {took:?} after it was sent");

        // A relay: the requester's ticket comes from A at once; it waits on A's /relay
        // while B is stopped, and is closed with 1013 once B answers.
        b.signal(libc::SIGSTOP);
        // kill(2) returns before every thread has stopped: B's cluster thread could still
        // answer for a moment.
        wait_for(Duration::from_secs(5), "node B stopped", || {
            all_stopped(b.pid())
        });
        send_text(&mut a1, r#"{"type":"relay","to":"ghost"}"#).await;
        let ta = wait_msg(&mut a1, t, "A's ticket", |m| m["type"] == "relay-ticket").await;
        let ticket = ta["ticket"].as_str().unwrap();
        let mut ra = ws(a.api_addr(), &format!("/relay?ticket={ticket}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metric(&a, cancelled), Some(0.0), "still waiting");
        let resumed = Instant::now();
        b.signal(libc::SIGCONT);
        let code = tokio::time::timeout(t, close_code(&mut ra))
            .await
            .expect("the waiting relay side is closed");
        let took = resumed.elapsed();
        assert_eq!(code, Some(1013));
        let e = wait_msg(&mut a1, t, "the relay refused", |m| m["type"] == "error").await;
        assert_eq!(
            (e["code"].as_str(), e["to"].as_str()),
            (Some("peer-not-found"), Some("ghost")),
            "{e}"
        );
        assert_eq!(metric(&a, cancelled), Some(1.0));
        assert_eq!(metric(&a, no_target), Some(refused0 + 2.0));
        eprintln!("waiting relay side closed {took:?} after the ghost's node resumed");
    });
}

/// The number of subscribers Redis reports for `chan` (`PUBSUB SHARDNUMSUB` or `NUMSUB`).
fn subscribers(redis: &Redis, sharded: bool, chan: &str) -> u64 {
    let verb = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
    let r = redis
        .command(&format!("PUBSUB {verb} {chan}"))
        .expect("PUBSUB answer");
    r.lines()
        .rev()
        .find_map(|l| l.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {r:?}"))
}

/// Room traffic goes to the room's channel, which only nodes with a member in it listen to:
/// B, with no member in `private`, is not subscribed to it and receives none of its joins
/// and leaves; one join in a room it shares arrives alone.
fn room_traffic_reaches_only_nodes_with_a_member(sharded: bool) {
    use crate::signal_common::{send_text, ws};
    let Some(redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    let extra = if sharded {
        "sharded_pubsub = true"
    } else {
        "sharded_pubsub = false"
    };
    let base = if sharded { 14400 } else { 15200 };
    let a = node(&redis, "room-a", base, &secret, extra);
    let b = node(&redis, "room-b", base + 400, &secret, extra);
    let mode = if sharded { 1.0 } else { 0.0 };
    wait_for(Duration::from_secs(10), "both nodes on Redis", || {
        metric(&a, "tern_cluster_bus_sharded") == Some(mode)
            && metric(&b, "tern_cluster_bus_sharded") == Some(mode)
    });
    let received = "tern_cluster_bus_messages_total{direction=\"received\"}";
    let published = "tern_cluster_bus_messages_total{direction=\"published\"}";
    let private = "tern:bus:rooms:room:private";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Duration::from_secs(10);
        let mut conns = Vec::new();
        let mut ids = Vec::new();
        for addr in [a.api_addr(), a.api_addr(), a.api_addr(), b.api_addr()] {
            let mut c = ws(addr, "/ws").await;
            let w = wait_msg(&mut c, t, "welcome", |m| m["type"] == "welcome").await;
            ids.push(w["id"].as_str().unwrap().to_string());
            conns.push(c);
        }
        let [a1, a2, a3, b1] = &mut conns[..] else {
            unreachable!()
        };
        // b1 in `shared`; after A's next tick and two of B's, B knows every A peer's LAN
        // membership and nothing more is in flight to B.
        send_text(b1, r#"{"type":"join","room":"shared"}"#).await;
        wait_msg(b1, t, "shared on B", |m| {
            m["type"] == "room" && m["room"] == "shared"
        })
        .await;
        after_ticks(&a, 2.0);
        after_ticks(&b, 2.0);
        let b_before = metric(&b, received).unwrap();
        let a_before = metric(&a, published).unwrap();
        let b_rooms = metric(&b, "tern_cluster_bus_room_channels").unwrap();

        // Two members of A in `private`, joining and leaving: A listens to it, B never.
        for round in 0..3 {
            send_text(a1, r#"{"type":"join","room":"private"}"#).await;
            wait_msg(a1, t, "private on A", |m| {
                m["type"] == "room" && m["room"] == "private"
            })
            .await;
            send_text(a2, r#"{"type":"join","room":"private"}"#).await;
            wait_msg(a1, t, "a2 joins private", |m| {
                m["type"] == "peer-joined" && m["room"] == "private"
            })
            .await;
            if round == 0 {
                after_ticks(&a, 1.0);
                assert_eq!(subscribers(&redis, sharded, private), 1, "A only");
                assert_eq!(
                    metric(&a, "tern_cluster_bus_room_channels").unwrap(),
                    b_rooms,
                    "A: lan and private; B: lan and shared"
                );
            }
            send_text(a2, r#"{"type":"leave","room":"private"}"#).await;
            send_text(a1, r#"{"type":"leave","room":"private"}"#).await;
            wait_msg(a1, t, "a1 left private", |m| {
                m["type"] == "left" && m["room"] == "private"
            })
            .await;
        }
        // Then one join in `shared`: the only bus message B gets.
        send_text(a3, r#"{"type":"join","room":"shared"}"#).await;
        wait_msg(b1, t, "a3 joins shared on B", |m| {
            m["type"] == "peer-joined"
                && m["room"] == "shared"
                && m["peer"]["id"] == ids[2].as_str()
        })
        .await;
        after_ticks(&a, 1.0);
        assert_eq!(
            subscribers(&redis, sharded, private),
            0,
            "nobody in private"
        );
        assert!(
            metric(&a, published).unwrap() >= a_before + 13.0,
            "A published the 12 private joins and leaves and the shared join"
        );
        assert_eq!(
            metric(&b, received).unwrap(),
            b_before + 1.0,
            "B received the shared join and nothing of private"
        );
    });
}

#[test]
fn room_traffic_reaches_only_nodes_with_a_member_sharded() {
    room_traffic_reaches_only_nodes_with_a_member(true);
}

#[test]
fn room_traffic_reaches_only_nodes_with_a_member_plain_pubsub() {
    room_traffic_reaches_only_nodes_with_a_member(false);
}

/// The user's quota lease is renewed with the allocation's Refresh: the deadline A
/// publishes moves with it; an allocation left to expire stops holding quota on B.
#[test]
fn quota_leases_are_renewed_by_refresh_and_lapse_with_the_allocation() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    let short = Tern::start(TernOpts {
        api: Some(format!("tokens = [\"{TOKEN}\"]\n")),
        metrics: true,
        secret: Some(secret.clone()),
        extra_turn: "unauth_rate_per_sec = 5000\nunauth_burst = 5000\nuser_quota = 2\n\
                     default_lifetime_secs = 4\nmax_lifetime_secs = 120\n"
            .into(),
        extra_sections: format!(
            "[cluster]\nredis_url = \"{}\"\nnode_id = \"lease-a\"\nlease_secs = {LEASE}\n",
            redis.url()
        ),
        ..TernOpts::new(13600)
    });
    let b = node(&redis, "lease-b", 14000, &secret, "");
    let score = || -> Option<u64> {
        let r = redis.command("ZSCORE tern:quota-lease:lease-a hand")?;
        r.lines()
            .nth(1)?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    };
    // Two allocations for `hand` on A (4 s lifetime): at quota on B.
    let (mut c1, _) = TurnClient::allocate(&short);
    let (_c2, _) = TurnClient::allocate(&short);
    after_ticks(&short, 1.0);
    after_ticks(&b, 2.0);
    let (_s, resp) = allocate(&b, "hand");
    assert_eq!(error_code(&resp), Some(486), "at quota through A's leases");
    let first = score().expect("hand's lease on A");
    assert!(first > unix_now() * 1000, "a deadline ahead");
    // The node's short lease stays: the hash expires within one lease unless renewed.
    let pttl: i64 = redis
        .command("PTTL tern:quota-lease:lease-a")
        .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
        .unwrap();
    assert!(pttl > 0 && pttl <= (LEASE * 1000) as i64, "PTTL {pttl}");
    // Refresh c1 to 120 s: the lease deadline moves out by about that much.
    use stun_types::message::MessageWriteExt;
    let resp = c1.request(turn_types::message::REFRESH, |m| {
        m.add_attribute(&turn_types::attribute::Lifetime::new(120))
            .unwrap()
    });
    assert_eq!(error_code(&resp), None);
    after_ticks(&short, 1.0);
    let refreshed = score().unwrap();
    assert!(
        refreshed >= first + 100_000,
        "Refresh renewed the lease: {first} -> {refreshed}"
    );
    // c2 is never refreshed: when its lifetime ends it stops holding quota, and B lets
    // `hand` allocate one (c1, refreshed, still counts: one, not two).
    let took = wait_for(Duration::from_secs(15), "c2's quota freed on B", || {
        error_code(&allocate(&b, "hand").1).is_none()
    });
    eprintln!("unrefreshed allocation's quota freed {took:?} later");
    assert_eq!(
        redis
            .command("HGET tern:quota:lease-a hand")
            .map(|r| r.contains("\r\n1\r\n")),
        Some(true),
        "c1 still counted on A"
    );
    assert!(score().is_some(), "c1's lease remains");
}

/// A registry record that does not decode (a node of another version, a stray writer under
/// the key prefix) is skipped, counted in `tern_cluster_bad_records_total{record="node"}`
/// on every tick that reads it, and logged at warn level once, not on every tick; the good
/// records are still read. `tern cluster status` lists it (and one missing a field) by key.
#[test]
fn a_malformed_node_record_is_skipped_counted_and_logged_once() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let secret = random_secret();
    let a = node(&redis, "rec-a", 16000, &secret, "");
    let bad = "tern_cluster_bad_records_total{record=\"node\"}";
    wait_for(Duration::from_secs(10), "the registry read", || {
        metric(&a, "tern_cluster_nodes") == Some(1.0)
    });
    assert_eq!(metric(&a, bad), Some(0.0));
    // A node listed in the registry whose record is not JSON.
    let lease_end = (unix_now() + 3600) * 1000;
    let added = redis.command(&format!("ZADD tern:nodes {lease_end} ghost"));
    assert_eq!(added.as_deref(), Some(":1\r\n"));
    let set = redis.command("SET tern:node:ghost not-a-record");
    assert_eq!(set.as_deref(), Some("+OK\r\n"));
    after_ticks(&a, 3.0);
    let n = metric(&a, bad).unwrap_or(0.0);
    assert!(n >= 2.0, "counted on each tick that read it: {n}");
    assert_eq!(
        metric(&a, "tern_cluster_nodes"),
        Some(1.0),
        "the good record is still read, the bad one skipped"
    );
    let log = a.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("does not decode") && l.contains("tern:node:ghost"))
        .count();
    assert_eq!(warned, 1, "one warning, not one per tick:\n{log}");

    // `tern cluster status` reports what it cannot read with its key, not only the good
    // records: bad JSON, and a record missing a field.
    let partial = r#"{\"id\":\"partial\",\"version\":\"0.0.1\"}"#;
    let set = redis.command(&format!("SET tern:node:partial \"{partial}\""));
    assert_eq!(set.as_deref(), Some("+OK\r\n"));
    let added = redis.command(&format!("ZADD tern:nodes {lease_end} partial"));
    assert_eq!(added.as_deref(), Some(":1\r\n"));
    let s = status_lines(&a);
    assert!(
        s.contains("BAD RECORD tern:node:ghost: does not decode"),
        "{s}"
    );
    assert!(
        s.lines().any(|l| l.starts_with("BAD RECORD tern:node:partial: ")
            && l.contains("missing field")),
        "{s}"
    );
    assert!(
        s.contains("rec-a")
            && s.ends_with("1 live node(s), 2 bad record(s) (not counted; listed above)\n"),
        "{s}"
    );
}
