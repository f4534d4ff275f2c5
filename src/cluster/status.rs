//! `tern cluster status` and the connection check of `tern check-config`: short-lived
//! reads of the registry, each bounded by a timeout.

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

/// The live nodes' records, read from Redis within `timeout`.
pub fn live_nodes(cfg: &ClusterConfig, timeout: Duration) -> Result<Vec<NodeRecord>, String> {
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
                return Ok(Vec::new());
            }
            let mut mget = redis::cmd("MGET");
            for id in &ids {
                mget.arg(keys.node(id));
            }
            let recs: Vec<Option<String>> = mget.query_async(&mut c).await?;
            Ok::<_, redis::RedisError>(recs)
        };
        let recs = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| "no answer within the timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let mut nodes: Vec<NodeRecord> = recs
            .into_iter()
            .flatten()
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    })
}

/// The table `tern cluster status` prints.
pub fn render(nodes: &[NodeRecord]) -> String {
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
    out.push_str(&format!("{} live node(s)\n", nodes.len()));
    out
}
