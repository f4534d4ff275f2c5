//! `tern cluster status` and the connection check of `tern check-config`: short-lived
//! reads of the registry, each bounded by a timeout. A registry entry that is not a node
//! record is reported with the table, never skipped silently. Must not write to Redis.

use std::time::Duration;

use super::registry::{Keys, NodeRecord};
use crate::config::ClusterConfig;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// Connects and sends PING within `timeout`.
pub fn ping(cfg: &ClusterConfig, timeout: Duration) -> Result<(), String> {
    let info = super::conn::connection_info(cfg, None)?;
    runtime()?.block_on(async {
        let mut c = tokio::time::timeout(timeout, super::conn::connect(&info, timeout))
            .await
            .map_err(|_| "no connection within the timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let _: String = tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut c))
            .await
            .map_err(|_| "no answer to PING within the timeout".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// What `tern cluster status` read: the live nodes' records, and the registry entries that
/// are not one (reported with the table, never skipped silently).
#[derive(Debug, Default)]
pub struct Registry {
    pub nodes: Vec<NodeRecord>,
    pub bad: Vec<BadEntry>,
}

/// A node listed in the registry whose record does not decode (bad JSON, a missing or
/// mistyped field: a node of another version, a stray writer) or is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// The record's Redis key.
    pub key: String,
    pub error: String,
}

/// The live nodes' records, read from Redis within `timeout`.
pub fn live_nodes(cfg: &ClusterConfig, timeout: Duration) -> Result<Registry, String> {
    let info = super::conn::connection_info(cfg, None)?;
    let keys = Keys::new(&cfg.key_prefix);
    runtime()?.block_on(async {
        let mut c = tokio::time::timeout(timeout, super::conn::connect(&info, timeout))
            .await
            .map_err(|_| "no connection within the timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let read = async {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(keys.nodes())
                .arg(now)
                .arg("+inf")
                .query_async(&mut c)
                .await?;
            if ids.is_empty() {
                return Ok((ids, Vec::new()));
            }
            let mut mget = redis::cmd("MGET");
            for id in &ids {
                mget.arg(keys.node(id));
            }
            let recs: Vec<Option<String>> = mget.query_async(&mut c).await?;
            Ok::<_, redis::RedisError>((ids, recs))
        };
        let (ids, recs) = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| "no answer within the timeout".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(decode(&keys, &ids, recs))
    })
}

/// The records MGET answered for `ids` (in their order), sorted by node id, and the
/// entries that are not records.
fn decode(keys: &Keys, ids: &[String], recs: Vec<Option<String>>) -> Registry {
    let mut r = Registry::default();
    for (id, rec) in ids.iter().zip(recs) {
        let error = match rec.map(|j| serde_json::from_str::<NodeRecord>(&j)) {
            Some(Ok(n)) => {
                r.nodes.push(n);
                continue;
            }
            Some(Err(e)) => format!("does not decode: {e}"),
            None => format!(
                "listed in {} but has no record (it lapsed, or was deleted)",
                keys.nodes()
            ),
        };
        r.bad.push(BadEntry {
            key: keys.node(id),
            error,
        });
    }
    r.nodes.sort_by(|a, b| a.id.cmp(&b.id));
    r
}

/// The table `tern cluster status` prints, then the entries that are not records.
pub fn render(reg: &Registry) -> String {
    let nodes = &reg.nodes;
    let mut out = format!(
        "{:<20} {:<8} {:<28} {:>7} {:>7} {:>12} {:>7} {:<9} {}\n",
        "NODE", "VERSION", "TURN", "ALLOCS", "MAX", "RELAY B/S", "PEERS", "STATE", "HTTP"
    );
    for n in nodes {
        let state = if n.draining {
            "draining"
        } else if n.healthy() {
            "ok"
        } else {
            "full"
        };
        let host = if n.turn_host.contains(':') {
            format!("[{}]", n.turn_host)
        } else {
            n.turn_host.clone()
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<28} {:>7} {:>7} {:>12} {:>7} {:<9} {}\n",
            n.id,
            n.version,
            format!("{host}:{}", n.turn_port),
            n.allocations,
            n.max_allocations,
            n.relay_bytes_per_sec,
            n.signal_peers,
            state,
            if n.http_url.is_empty() {
                "-"
            } else {
                &n.http_url
            },
        ));
    }
    for b in &reg.bad {
        out.push_str(&format!("BAD RECORD {}: {} (skipped)\n", b.key, b.error));
    }
    out.push_str(&format!("{} live node(s)", nodes.len()));
    if !reg.bad.is_empty() {
        out.push_str(&format!(
            ", {} bad record(s) (not counted; listed above)",
            reg.bad.len()
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            version: "0.1.0".into(),
            turn_host: "192.0.2.1".into(),
            turn_port: 3478,
            turns_port: None,
            turn_addr: None,
            turns_addr: None,
            tls_domain: None,
            http_url: String::new(),
            allocations: 1,
            max_allocations: 10,
            relay_bytes_per_sec: 0,
            max_relay_bytes_per_sec: 0,
            signal_peers: 0,
            draining: false,
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn records_that_do_not_decode_or_are_missing_are_reported_with_their_key() {
        let keys = Keys::new("tern:");
        let good = serde_json::to_string(&rec("b")).unwrap();
        let mut partial = serde_json::to_value(rec("c")).unwrap();
        partial.as_object_mut().unwrap().remove("turn_port");
        let ids: Vec<String> = ["b", "x", "c", "gone"].map(String::from).to_vec();
        let recs = vec![
            Some(good),
            Some("{not json".to_string()),
            Some(partial.to_string()),
            None,
        ];
        let reg = decode(&keys, &ids, recs);
        assert_eq!(reg.nodes, [rec("b")]);
        let keys_bad: Vec<&str> = reg.bad.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys_bad, ["tern:node:x", "tern:node:c", "tern:node:gone"]);
        assert!(
            reg.bad[1].error.contains("missing field `turn_port`"),
            "{:?}",
            reg.bad
        );
        assert!(reg.bad[2].error.contains("no record"), "{:?}", reg.bad);
        let table = render(&reg);
        assert!(
            table.contains("BAD RECORD tern:node:x: does not decode"),
            "{table}"
        );
        assert!(
            table.ends_with("1 live node(s), 3 bad record(s) (not counted; listed above)\n"),
            "{table}"
        );
        let clean = render(&Registry {
            nodes: vec![rec("b")],
            bad: Vec::new(),
        });
        assert!(
            clean.ends_with("\n1 live node(s)\n") && !clean.contains("BAD"),
            "{clean}"
        );
    }
}
