//! Cluster mode's metrics (`[cluster]` only; a single node exports none of them).

use std::sync::Arc;

use super::collect::{Face, Families};
use crate::cluster::ClusterView;
use crate::metrics_def::metric_table;

metric_table! { pub DEFS;
    CLUSTER_REDIS_UP: Gauge "tern_cluster_redis_up" []
        "Cluster mode: 1 while the last Redis round trip succeeded; 0 while this node works alone \
        (local quota, its own ICE URLs, cross-node requests refused).";
    CLUSTER_NODES: Gauge "tern_cluster_nodes" []
        "Cluster mode: live nodes in the registry as last read (this one included; 0 while Redis \
        is unreachable).";
    CLUSTER_REDIS_CONNECTS: Counter "tern_cluster_redis_connects_total" []
        "Cluster mode: connections made to Redis (the first and every reconnection).";
    CLUSTER_REDIS_ERRORS: Counter "tern_cluster_redis_errors_total" []
        "Cluster mode: failed Redis connects and round trips (each drops the connection).";
    CLUSTER_QUOTA_LEASE_OPS: Counter "tern_cluster_quota_lease_operations_total" ["op"]
        "Cluster mode: per-user quota lease operations: a user's count written, the node's \
        leases renewed, or rewritten whole (after a reconnect or a Redis restarted empty).";
    CLUSTER_ICE_STEERED: Counter "tern_cluster_ice_steered_total" []
        "Cluster mode: /api/ice and /api/turn answers naming another node (this one draining or \
        over its ceilings).";
    CLUSTER_BUS_MESSAGES: Counter "tern_cluster_bus_messages_total" ["direction"]
        "Cluster mode: bus messages (room joins, leaves, signals, relay tickets; PeerJS ids and \
        messages) published by this node or received from others.";
    CLUSTER_BUS_LATENCY: Histogram "tern_cluster_bus_latency_seconds" []
        "Cluster mode: time from a bus message's publication on another node to its arrival \
        here (cross-node deliveries; includes the two hosts' clock offset).";
    CLUSTER_BUS_RESYNCS: Counter "tern_cluster_bus_resyncs_total" []
        "Cluster mode: other nodes' member lists re-read (after a sequence gap, a reconnect, or \
        a node appearing).";
    CLUSTER_BUS_DROPPED: Counter "tern_cluster_bus_dropped_total" []
        "Cluster mode: bus messages dropped on this node (a full queue, or Redis unreachable); \
        receivers repair the gap by a resync.";
    CLUSTER_BUS_ROOM_CHANNELS: Gauge "tern_cluster_bus_room_channels" []
        "Cluster mode: room channels this node subscribes to (the rooms with a member here, \
        the LAN rooms, the PeerJS realm): only these rooms' traffic reaches it.";
    CLUSTER_BAD_RECORDS: Counter "tern_cluster_bad_records_total" ["record"]
        "Cluster mode: records read from Redis that did not decode and were skipped: another \
        node's registry record, a member list entry, or a bus message.";
    CLUSTER_BUS_SHARDED: Gauge "tern_cluster_bus_sharded" []
        "Cluster mode: 1 when the bus uses sharded pub/sub (SPUBLISH/SSUBSCRIBE), 0 for plain \
        PUBLISH/SUBSCRIBE (Redis without it, or cluster.sharded_pubsub = false).";
}

/// Cluster mode's collector.
pub(super) fn collector(view: Arc<ClusterView>) -> Face<Arc<ClusterView>> {
    Face::new(DEFS.iter(), view, read)
}

fn read(view: &Arc<ClusterView>, f: &mut Families) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &view.stats;
    f.sample(&CLUSTER_REDIS_UP, &[], u64::from(s.redis_up.load(Relaxed)));
    f.sample(&CLUSTER_NODES, &[], s.nodes.load(Relaxed));
    f.sample(&CLUSTER_REDIS_CONNECTS, &[], s.connects.load(Relaxed));
    f.sample(&CLUSTER_REDIS_ERRORS, &[], s.redis_errors.load(Relaxed));
    for (op, n) in [
        ("write", &s.quota_writes),
        ("renew", &s.quota_renewals),
        ("rewrite", &s.quota_rewrites),
    ] {
        f.sample(&CLUSTER_QUOTA_LEASE_OPS, &[op], n.load(Relaxed));
    }
    f.sample(&CLUSTER_ICE_STEERED, &[], s.steered_ice.load(Relaxed));
    f.sample(
        &CLUSTER_BUS_MESSAGES,
        &["published"],
        s.bus_published.load(Relaxed),
    );
    f.sample(
        &CLUSTER_BUS_MESSAGES,
        &["received"],
        s.bus_received.load(Relaxed),
    );
    let latency = *s.bus_latency.lock().unwrap_or_else(|e| e.into_inner());
    f.histogram(
        &CLUSTER_BUS_LATENCY,
        &[],
        &crate::cluster::BUS_LATENCY_BOUNDS,
        &latency,
    );
    f.sample(&CLUSTER_BUS_RESYNCS, &[], s.bus_resyncs.load(Relaxed));
    let hub_dropped = view.hub_bus_dropped();
    f.sample(
        &CLUSTER_BUS_DROPPED,
        &[],
        s.bus_dropped.load(Relaxed) + hub_dropped,
    );
    f.sample(
        &CLUSTER_BUS_ROOM_CHANNELS,
        &[],
        s.bus_room_channels.load(Relaxed),
    );
    for kind in crate::cluster::BadRecord::ALL {
        let n = s.bad_records[kind as usize].load(Relaxed);
        f.sample(&CLUSTER_BAD_RECORDS, &[kind.label()], n);
    }
    f.sample(
        &CLUSTER_BUS_SHARDED,
        &[],
        u64::from(s.bus_sharded.load(Relaxed)),
    );
}
