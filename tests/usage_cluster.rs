//! Usage accounting in cluster mode (issue 14, docs/usage.md "Cluster mode"): two `tern
//! serve` nodes and one `redis-server` this test starts on a free loopback port. A user's
//! traffic on both nodes appears summed on either node's `/api/usage` and `tern usage`; the
//! usage stream holds one record per finished allocation, with the bytes each carried; a
//! daily budget spent on one node refuses the user's Allocate on the other (486).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Redis;
use crate::common::*;
use crate::usage_accounting::{allocate_as, ended, http, n, usage_total, wait_until, ADMIN, SIZE};

const PREFIX: &str = "ut:";

/// One node: its own usage store (in `dir`), the shared secret and Redis, `extra_turn`.
fn node(
    redis: &Redis,
    id: &str,
    relay_min: u16,
    secret: &str,
    extra_turn: &str,
    dir: &tempfile::TempDir,
) -> Tern {
    let db = dir.path().join(format!("{id}.db"));
    let mut opts = TernOpts::new(relay_min);
    opts.extra_turn += extra_turn;
    opts.secret = Some(secret.to_string());
    opts.metrics = true;
    opts.api = Some(format!("admin_tokens = [\"{ADMIN}\"]\n"));
    opts.extra_sections = format!(
        "[usage]\npath = {db:?}\ninterim_secs = 1\nflush_ms = 100\n\
         [cluster]\nredis_url = \"{}\"\nnode_id = \"{id}\"\nlease_secs = 3\nkey_prefix = \"{PREFIX}\"\n",
        redis.url()
    );
    Tern::start(opts)
}

/// Runs uclient as REST user `user` on `tern`: (messages sent, received).
fn relay(tern: &Tern, peer: u16, user: &str) -> (u64, u64) {
    let name = format!("{}:{user}", unix_now() + 3600);
    let pass = rest_password(&tern.secret, &name);
    let args = ["-m", "1", "-n", "25", "-l", "120", "-c"];
    let r = uclient_with(tern, peer, &name, &pass, &args, Duration::from_secs(60));
    assert!(r.success && r.sent > 0, "{}", r.output);
    (r.sent, r.received)
}

/// The usage stream's entries as field maps.
fn stream(redis: &Redis) -> Vec<HashMap<String, String>> {
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let v: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{PREFIX}usage:stream"))
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    v.into_iter().map(|(_, f)| f).collect()
}

fn have_tools() -> bool {
    if !have_tool("turnutils_uclient") {
        panic!("turnutils_uclient missing (apt-get install coturn)");
    }
    true
}

#[test]
fn usage_of_both_nodes_is_summed_on_either_and_streamed_per_allocation() {
    let Some(redis) = Redis::start() else {
        return;
    };
    assert!(have_tools());
    let secret = random_secret();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&redis, "use-a", 13_600, &secret, "", &dir);
    let b = node(&redis, "use-b", 14_000, &secret, "", &dir);
    let peer = EchoPeer::start();

    let on_a = relay(&a, peer.port, "alice");
    let on_b = relay(&b, peer.port, "alice");
    let sent = on_a.0 + on_b.0;
    let received = on_a.1 + on_b.1;
    wait_until("the allocations to end", Duration::from_secs(30), || {
        ended(&a, ":alice") >= 1 && ended(&b, ":alice") >= 1
    });

    // Either node answers for the whole cluster, exactly.
    for t in [&a, &b] {
        let mut total = Value::Null;
        wait_until("the summed usage", Duration::from_secs(15), || {
            total = usage_total(t, "user=alice&granularity=hour");
            total["to_client_packets"].as_u64() == Some(received)
                && total["to_peer_packets"].as_u64() == Some(sent)
        });
        assert_eq!(n(&total, "to_peer_bytes"), sent * SIZE, "{total}");
        assert_eq!(n(&total, "to_client_bytes"), received * SIZE, "{total}");
        let (_, body) = http(t.api_addr(), "/api/usage?user=alice", Some(ADMIN));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["scope"], "cluster", "{body}");
        // Each node's own store has only its share.
        let (_, body) = http(t.api_addr(), "/api/usage/top?period=day", Some(ADMIN));
        let top: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(top["rows"][0]["user"], "alice", "{body}");
        assert_eq!(n(&top["rows"][0], "to_peer_bytes"), sent * SIZE, "{body}");
    }

    // The CLI of node B reads Redis too.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["usage", "--config"])
        .arg(b.config_path())
        .args([
            "--user",
            "alice",
            "--granularity",
            "day",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["scope"], "cluster", "{j}");
    assert_eq!(n(&j["total"], "to_peer_bytes"), sent * SIZE, "{j}");
    assert_eq!(n(&j["total"], "to_client_packets"), received, "{j}");

    // One stream record per finished allocation (both nodes), carrying its bytes.
    let finished = ended(&a, ":alice") + ended(&b, ":alice");
    let mut recs = Vec::new();
    wait_until("the stream records", Duration::from_secs(10), || {
        recs = stream(&redis);
        recs.len() >= finished
    });
    // Ended since counted: at most the idle allocations uclient leaves behind.
    let finished = ended(&a, ":alice") + ended(&b, ":alice");
    recs = stream(&redis);
    assert_eq!(recs.len(), finished, "{recs:?}");
    let sum = |k: &str| -> u64 { recs.iter().map(|r| r[k].parse::<u64>().unwrap()).sum() };
    assert_eq!(sum("to_peer_bytes"), sent * SIZE);
    assert_eq!(sum("to_client_packets"), received);
    for r in &recs {
        assert_eq!(r["user"], "alice");
        assert!(r["node"] == "use-a" || r["node"] == "use-b", "{r:?}");
        assert_eq!(r["transport"], "udp");
        let (s, e): (u64, u64) = (r["start_ms"].parse().unwrap(), r["end_ms"].parse().unwrap());
        assert!(s <= e, "{r:?}");
    }
    let (_, m) = crate::common::scrape::get(a.metrics_port, "/metrics");
    assert!(m.contains("tern_usage_redis_rows_written_total"), "{m}");
    assert!(!m.contains("alice"), "a user leaked into /metrics");
}

#[test]
fn a_daily_budget_spent_on_one_node_refuses_on_the_other() {
    let Some(redis) = Redis::start() else {
        return;
    };
    assert!(have_tools());
    let secret = random_secret();
    // 25 messages of 120 bytes each way: 6000 bytes, over 5000.
    let budget = "user_bytes_per_day = 5000\n";
    let dir = tempfile::tempdir().unwrap();
    let a = node(&redis, "bud-a", 14_400, &secret, budget, &dir);
    let b = node(&redis, "bud-b", 14_800, &secret, budget, &dir);
    let peer = EchoPeer::start();
    // Node B admits carol before she spends anything.
    assert_eq!(allocate_as(&b, "carol").0, None);
    let (sent, received) = relay(&a, peer.port, "carol");
    assert!((sent + received) * SIZE >= 5000, "{sent} {received}");
    // Node B never relayed for carol: its refusal comes from the cluster's total.
    let mut code = None;
    wait_until("node B to refuse carol", Duration::from_secs(15), || {
        code = allocate_as(&b, "carol").0;
        code == Some(486)
    });
    let (_, resp) = allocate_as(&b, "carol");
    let msg = stun_types::message::Message::from_bytes(&resp).unwrap();
    let e = msg.attribute::<stun_types::attribute::ErrorCode>().unwrap();
    assert!(e.reason().contains("budget for today"), "{}", e.reason());
    // Another user is admitted on B.
    assert_eq!(allocate_as(&b, "dave").0, None);
    let (_, m) = crate::common::scrape::get(b.metrics_port, "/metrics");
    assert!(
        m.lines().any(
            |l| l.starts_with("tern_usage_budget_refusals_total{reason=\"day\"}")
                && !l.ends_with(" 0")
        ),
        "{m}"
    );
}

fn metric(tern: &Tern, name: &str) -> f64 {
    crate::cluster::metric(tern, name).unwrap_or_else(|| panic!("{name} missing"))
}

/// Redis stops taking writes for a while (`CLIENT PAUSE ... WRITE`: the node's batch times
/// out, and may or may not be applied when the pause ends): the rows wait on the node,
/// counted, and once Redis takes writes again the cluster totals are exact, with nothing
/// counted twice and one stream record per finished allocation.
#[test]
fn rows_kept_while_redis_stalls_are_written_exactly_once_after() {
    let Some(redis) = Redis::start() else {
        return;
    };
    assert!(have_tools());
    let secret = random_secret();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&redis, "out-a", 15_600, &secret, "", &dir);
    let peer = EchoPeer::start();
    let first = relay(&a, peer.port, "erin");
    wait_until("the first run in Redis", Duration::from_secs(15), || {
        usage_total(&a, "user=erin&granularity=hour")["to_peer_packets"].as_u64() == Some(first.0)
    });
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(15_000)
        .arg("WRITE")
        .query(&mut c)
        .unwrap();
    let second = relay(&a, peer.port, "erin");
    wait_until("a failed Redis write", Duration::from_secs(20), || {
        metric(&a, "tern_usage_redis_errors_total") > 0.0
    });
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut c).unwrap();
    let (sent, received) = (first.0 + second.0, first.1 + second.1);
    let mut t = Value::Null;
    wait_until("the catch-up", Duration::from_secs(30), || {
        t = usage_total(&a, "user=erin&granularity=hour");
        t["to_peer_packets"].as_u64() == Some(sent)
            && t["to_client_packets"].as_u64() == Some(received)
    });
    assert_eq!(n(&t, "to_peer_bytes"), sent * SIZE, "{t}");
    assert_eq!(n(&t, "to_client_bytes"), received * SIZE, "{t}");
    wait_until("nothing pending", Duration::from_secs(10), || {
        metric(&a, "tern_usage_redis_pending_rows") == 0.0
    });
    // Still exact once everything settled: no batch was added twice.
    let t = usage_total(&a, "user=erin&granularity=day");
    assert_eq!(n(&t, "to_peer_packets"), sent, "{t}");
    let recs = stream(&redis);
    assert_eq!(recs.len(), ended(&a, ":erin"), "{recs:?}");
    let sum: u64 = recs
        .iter()
        .map(|r| r["to_peer_bytes"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, sent * SIZE);
    assert_eq!(metric(&a, "tern_usage_stream_dropped_total"), 0.0);
}
