//! The node registry's records and the Redis key layout, and the pure choice of a healthy
//! node for steering (`/api/ice`, ALTERNATE-SERVER). No IO here.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::turn::alternates::Alternates;

/// One node as it announces itself under `{prefix}node:{id}` (JSON, with a TTL of one
/// lease, refreshed every driver tick).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub version: String,
    /// Host for `turn:`/`turns:` URLs (a name or an IP literal, without brackets).
    pub turn_host: String,
    pub turn_port: u16,
    /// `turns:` port, when the node has TLS.
    pub turns_port: Option<u16>,
    /// Address for ALTERNATE-SERVER over UDP and TCP (RFC 8489 §14.15), when known.
    pub turn_addr: Option<SocketAddr>,
    /// Address and certificate name for ALTERNATE-SERVER + ALTERNATE-DOMAIN over TLS.
    pub turns_addr: Option<SocketAddr>,
    pub tls_domain: Option<String>,
    /// Base URL of the node's HTTP API ("" when not advertised).
    pub http_url: String,
    pub allocations: u32,
    pub max_allocations: u32,
    /// Relayed bytes per second, both directions, over the last tick.
    pub relay_bytes_per_sec: u64,
    /// 0: no ceiling.
    pub max_relay_bytes_per_sec: u64,
    /// WebSocket signaling peers (native and PeerJS) connected to the node.
    pub signal_peers: u64,
    pub draining: bool,
    pub updated_unix_ms: u64,
}

impl NodeRecord {
    /// Not draining and under its configured ceilings.
    pub fn healthy(&self) -> bool {
        !self.draining
            && self.allocations < self.max_allocations
            && (self.max_relay_bytes_per_sec == 0
                || self.relay_bytes_per_sec < self.max_relay_bytes_per_sec)
    }

    /// Fraction of its ceilings in use: the larger of allocations and bandwidth.
    pub fn load(&self) -> f64 {
        let a = f64::from(self.allocations) / f64::from(self.max_allocations.max(1));
        let b = if self.max_relay_bytes_per_sec == 0 {
            0.0
        } else {
            self.relay_bytes_per_sec as f64 / self.max_relay_bytes_per_sec as f64
        };
        a.max(b)
    }
}

/// Healthy nodes other than `self_id`, least loaded first (ties by id, so every node
/// steers the same way).
pub fn healthy_others<'a>(nodes: &'a [NodeRecord], self_id: &str) -> Vec<&'a NodeRecord> {
    let mut v: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| n.id != self_id && n.healthy())
        .collect();
    v.sort_by(|a, b| a.load().total_cmp(&b.load()).then_with(|| a.id.cmp(&b.id)));
    v
}

/// ALTERNATE-SERVER targets from the registry: the healthy other nodes, least loaded first.
pub fn alternates(nodes: &[NodeRecord], self_id: &str) -> Alternates {
    let others = healthy_others(nodes, self_id);
    let udp: Vec<SocketAddr> = others.iter().filter_map(|n| n.turn_addr).collect();
    let tls = others
        .iter()
        .filter_map(|n| Some((n.turns_addr?, n.tls_domain.clone()?)))
        .collect();
    Alternates::from_lists(udp.clone(), udp, tls)
}

/// Redis keys, all under `cluster.key_prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Sorted set of node ids scored by their record's expiry (Unix ms): lets a reader list
    /// the live nodes without SCAN.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// A node's record (JSON, TTL one lease).
    pub fn node(&self, id: &str) -> String {
        format!("{}node:{id}", self.prefix)
    }

    /// A node's signaling peers and their rooms (hash peer id → JSON, TTL one lease): what
    /// other nodes resync from after a gap, a reconnect, or when the node appears.
    pub fn members(&self, id: &str) -> String {
        format!("{}members:{id}", self.prefix)
    }

    /// A PeerJS id's claim (string: the node holding it, TTL one lease).
    pub fn peerjs_id(&self, id: &str) -> String {
        format!("{}peerjs:id:{id}", self.prefix)
    }

    /// A pub/sub channel.
    pub fn channel(&self, name: &str) -> String {
        format!("{}bus:{name}", self.prefix)
    }

    /// A node's per-user allocation counts (hash user → count, TTL one lease): the quota
    /// leases. A node that dies stops renewing it and its users' quota frees.
    pub fn quota(&self, id: &str) -> String {
        format!("{}quota:{id}", self.prefix)
    }

    /// A node's per-user lease deadlines (sorted set user → Unix ms, TTL one lease): when
    /// the user's latest allocation there ends unless refreshed; renewed by each Allocate
    /// and Refresh. Other nodes count a user's allocations there only until then.
    pub fn quota_lease(&self, id: &str) -> String {
        format!("{}quota-lease:{id}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, allocs: u32, draining: bool) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            version: "0".into(),
            turn_host: "127.0.0.1".into(),
            turn_port: 3478,
            turns_port: None,
            turn_addr: Some("127.0.0.1:3478".parse().unwrap()),
            turns_addr: None,
            tls_domain: None,
            http_url: String::new(),
            allocations: allocs,
            max_allocations: 10,
            relay_bytes_per_sec: 0,
            max_relay_bytes_per_sec: 0,
            signal_peers: 0,
            draining,
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn least_loaded_healthy_other_first() {
        let mut full = node("c", 10, false);
        full.turn_port = 1;
        let nodes = vec![
            node("a", 1, false),
            node("b", 5, false),
            node("d", 0, true),
            full,
            node("e", 2, false),
        ];
        let ids: Vec<_> = healthy_others(&nodes, "a").iter().map(|n| &n.id).collect();
        assert_eq!(ids, ["e", "b"]);
        let mut bw = node("f", 0, false);
        bw.max_relay_bytes_per_sec = 100;
        bw.relay_bytes_per_sec = 100;
        assert!(!bw.healthy());
        bw.relay_bytes_per_sec = 90;
        assert!(bw.healthy());
        assert!((bw.load() - 0.9).abs() < 1e-9);
    }
}
