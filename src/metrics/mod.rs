//! Prometheus metrics (issue 5): the one registry, the full list of metrics Tern exports,
//! the scrape-time collectors and the metrics listener (`/metrics`, `/healthz`, `/readyz`,
//! in `server.rs`). docs/metrics.md describes each metric.
//!
//! Each face declares its metrics once, in one table ([`crate::metrics_def::metric_table!`])
//! beside the collector that reads them: `daemon.rs`, `turn.rs` (the relay data path, the
//! kernel fast path, the TURN cores), `http.rs` (signaling, the WebSocket relay),
//! `usage.rs`, `cluster.rs`, and `crate::api::http_metrics` (the HTTP face's own table, next
//! to the per-route counters that register themselves). [`TABLES`] is the full list, built
//! from them. `collect.rs` turns counter snapshots into families.
//!
//! Owns names, help texts, labels and the sums taken at scrape time: the TURN workers keep
//! their counters as plain integers and publish snapshots; a scrape reads and adds them.
//! It must not put work on the data path (no shared atomic or lock per packet), and label
//! values are bounded sets only (never a user name, a room name or an address).

mod cluster;
mod collect;
mod daemon;
mod http;
mod server;
mod turn;
mod usage;

use std::sync::Arc;

use prometheus::Registry;

use crate::metrics_def::Def;

pub use server::{readiness, MetricsError, MetricsService};

/// Every face's table: together, every metric Tern defines (the process_* metrics come
/// from the prometheus crate).
pub const TABLES: &[&[&Def]] = &[
    daemon::DEFS,
    turn::RELAY,
    turn::FASTPATH,
    turn::TURN,
    http::SIGNAL,
    http::RELAY_WS,
    crate::api::http_metrics::DEFS,
    usage::DEFS,
    cluster::DEFS,
];

/// Every metric Tern defines, face by face.
pub fn all() -> impl Iterator<Item = &'static Def> {
    TABLES.iter().flat_map(|t| t.iter().copied())
}

/// Errors building the registry.
#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct RegistryError(#[from] prometheus::Error);

/// The registry: process metrics plus the faces that are running.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Registers the process collector and a collector per running face.
    pub fn new(
        turn: Option<crate::net::TurnStatsSource>,
        http: Option<crate::api::HttpStatsSource>,
    ) -> Result<Metrics, RegistryError> {
        let registry = Registry::new();
        registry.register(Box::new(daemon::collector()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        if let Some(src) = turn {
            registry.register(Box::new(turn::collector(src)))?;
        }
        if let Some(src) = http {
            for c in src.http_metrics().collectors() {
                registry.register(c)?;
            }
            registry.register(Box::new(http::collector(src)))?;
        }
        Ok(Metrics { registry })
    }

    /// Adds the usage accounting counters (when `[usage]` is on).
    pub fn register_usage(&self, ledger: Arc<crate::usage::Ledger>) -> Result<(), RegistryError> {
        self.registry.register(Box::new(usage::collector(ledger)))?;
        Ok(())
    }

    /// Cluster mode's metrics (`[cluster]` only; a single node exports none of them).
    pub fn add_cluster(
        &mut self,
        view: Arc<crate::cluster::ClusterView>,
    ) -> Result<(), RegistryError> {
        self.registry.register(Box::new(cluster::collector(view)))?;
        Ok(())
    }

    /// The Prometheus text exposition of everything (format 0.0.4).
    pub fn encode(&self) -> Result<String, RegistryError> {
        Ok(prometheus::TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics_def::MetricType;

    #[test]
    fn names_follow_the_naming_rules() {
        let mut seen = std::collections::HashSet::new();
        for d in all() {
            assert!(d.name.starts_with("tern_"), "{}", d.name);
            assert!(seen.insert(d.name), "{} defined twice", d.name);
            match d.kind {
                MetricType::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                _ => assert!(!d.name.ends_with("_total"), "{}", d.name),
            }
            if d.kind == MetricType::Histogram {
                assert!(d.name.ends_with("_seconds"), "{}", d.name);
            }
            for l in d.labels {
                assert!(
                    !["user", "username", "ip", "addr", "address", "room", "peer"].contains(l),
                    "{}: unbounded label {l}",
                    d.name
                );
            }
        }
    }

    #[test]
    fn docs_list_every_metric() {
        let doc = include_str!("../../docs/metrics.md");
        for d in all() {
            assert!(
                doc.contains(&format!("`{}`", d.name)),
                "docs/metrics.md does not describe {}",
                d.name
            );
            for l in d.labels {
                assert!(
                    doc.contains(&format!("`{l}`")),
                    "docs/metrics.md does not name label {l} of {}",
                    d.name
                );
            }
        }
    }
}
