//! Prometheus metrics (issue 5): the one registry, every metric name Tern exports, the
//! scrape-time collectors and the metrics listener (`/metrics`, `/healthz`, `/readyz`,
//! in `metrics/server.rs`). docs/metrics.md describes each metric.
//!
//! Owns names, help texts, labels and the sums taken at scrape time: the TURN workers keep
//! their counters as plain integers and publish snapshots; a scrape reads and adds them.
//! It must not put work on the data path (no shared atomic or lock per packet), and label
//! values are bounded sets only (never a user name, a room name or an address).

mod collect;
mod server;

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::signal::{peerjs, rooms};
use crate::turn::stats::{
    result_label, AuthFailure, MethodLabel, ALLOCATION_FAMILIES, FAMILIES, LIFETIME_SECONDS_BOUNDS,
    REQUEST_SECONDS_BOUNDS, RESULT_CODES, TCP_BIND_RESULTS, TCP_CONNECT_RESULTS, TCP_CONN_STATES,
    TCP_PEER_RESULTS, TRANSPORTS,
};
use collect::Families;

pub use server::{readiness, MetricsError, MetricsService};

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric Tern exports: name (with the `tern_` prefix and base unit), help, labels.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def {
        name,
        help,
        kind,
        labels,
    }
}

use Kind::{Counter, Gauge, Histogram};

// The daemon.
pub const BUILD_INFO: Def = def(
    "tern_build_info",
    Gauge,
    &["version"],
    "Always 1; the version label is the running Tern's.",
);
pub const READY: Def = def(
    "tern_ready",
    Gauge,
    &[],
    "1 while every listener serves and no drain is running (what /readyz answers 200 for).",
);
pub const DRAINING: Def = def(
    "tern_draining",
    Gauge,
    &[],
    "1 from the first SIGTERM until exit (new allocations and signaling refused).",
);
// TURN data path (summed over the workers' snapshots).
pub const RELAY_BYTES: Def = def(
    "tern_relay_bytes_total",
    Counter,
    &["direction", "transport"],
    "Bytes sent on the relay path: to peers (payload) and to clients (with TURN framing).",
);
pub const RELAY_PACKETS: Def = def(
    "tern_relay_packets_total",
    Counter,
    &["direction", "transport"],
    "Packets relayed, by direction and client transport.",
);
pub const RELAY_DROPPED: Def = def(
    "tern_relay_dropped_packets_total",
    Counter,
    &["reason"],
    "Packets not relayed, by reason.",
);
pub const TCP_ACCEPTED: Def = def(
    "tern_turn_tcp_connections_accepted_total",
    Counter,
    &[],
    "TCP client connections accepted by the TURN listeners.",
);
pub const TCP_REFUSED: Def = def(
    "tern_turn_tcp_connections_refused_total",
    Counter,
    &[],
    "TCP client connections refused because their source IP reached turn.tcp_max_per_ip.",
);
pub const TCP_CLOSED: Def = def(
    "tern_turn_tcp_connections_closed_total",
    Counter,
    &["reason"],
    "TCP client connections closed by Tern, by reason.",
);
// RFC 6062 TCP relays (summed over the workers' snapshots).
pub const TCP_RELAY_BYTES: Def = def(
    "tern_turn_tcp_relay_bytes_total",
    Counter,
    &["direction"],
    "Bytes spliced between RFC 6062 client data connections and their peers.",
);
pub const TCP_RELAY_CHUNKS: Def = def(
    "tern_turn_tcp_relay_chunks_total",
    Counter,
    &["direction"],
    "Socket reads (client_to_peer: writes) that carried the spliced bytes.",
);
pub const TCP_RELAY_PEER_CONNECTIONS: Def = def(
    "tern_turn_tcp_relay_peer_connections",
    Gauge,
    &[],
    "Peer TCP sockets the workers hold: connecting, waiting for ConnectionBind, or spliced.",
);
pub const TCP_RELAY_CONNECT_FAILURES: Def = def(
    "tern_turn_tcp_relay_connect_failures_total",
    Counter,
    &[],
    "Outgoing RFC 6062 peer connects that failed at the socket level or timed out (447).",
);
pub const TCP_RELAY_THROTTLED: Def = def(
    "tern_turn_tcp_relay_throttled_total",
    Counter,
    &[],
    "Times a spliced RFC 6062 connection waited for its turn.max_bytes_per_sec budget.",
);
pub const TCP_HANDOVERS: Def = def(
    "tern_turn_tcp_handovers_total",
    Counter,
    &[],
    "Client data connections moved to the worker owning their CONNECTION-ID.",
);
// Kernel fast path (turn.kernel_fast_path; read from the BPF maps at each worker's
// housekeeping, also included in tern_relay_* above).
pub const FASTPATH_PACKETS: Def = def(
    "tern_fastpath_packets_total",
    Counter,
    &["direction"],
    "UDP datagrams of channel bindings forwarded by the kernel fast path (also in tern_relay_packets_total).",
);
pub const FASTPATH_BYTES: Def = def(
    "tern_fastpath_bytes_total",
    Counter,
    &["direction"],
    "Application bytes (ChannelData payload) forwarded by the kernel fast path.",
);
pub const FASTPATH_BINDINGS: Def = def(
    "tern_fastpath_bindings",
    Gauge,
    &[],
    "Channel bindings in the kernel fast path's maps.",
);
pub const FASTPATH_MAP_FULL: Def = def(
    "tern_fastpath_map_full_total",
    Counter,
    &[],
    "Channel bindings the fast path's maps refused (full); relayed in user space instead.",
);
// TURN control path (summed over the shards' snapshots).
pub const REQUESTS: Def = def(
    "tern_turn_requests_total",
    Counter,
    &["method", "result"],
    "STUN/TURN requests answered, by method and result (success or error code).",
);
pub const REQUEST_DURATION: Def = def(
    "tern_turn_request_duration_seconds",
    Histogram,
    &[],
    "Time to handle one STUN/TURN request, from decoding to the response written.",
);
pub const AUTH_FAILURES: Def = def(
    "tern_turn_auth_failures_total",
    Counter,
    &["reason"],
    "Requests that failed authentication, by reason.",
);
pub const RATE_LIMITED: Def = def(
    "tern_turn_rate_limited_total",
    Counter,
    &[],
    "Unauthenticated requests dropped by the per-source rate limit.",
);
pub const PEER_DENIED: Def = def(
    "tern_turn_peer_denied_total",
    Counter,
    &[],
    "CreatePermission/ChannelBind requests refused by the peer address policy (403).",
);
pub const MALFORMED: Def = def(
    "tern_turn_malformed_messages_total",
    Counter,
    &[],
    "STUN messages dropped as malformed (framing, FINGERPRINT, attributes).",
);
pub const UNKNOWN_ATTRIBUTES: Def = def(
    "tern_turn_unknown_attribute_requests_total",
    Counter,
    &[],
    "Requests answered 420 for an unknown comprehension-required attribute.",
);
pub const BINDINGS: Def = def(
    "tern_stun_bindings_total",
    Counter,
    &[],
    "STUN Binding requests answered with the client's address.",
);
pub const SEND_INDICATIONS: Def = def(
    "tern_turn_send_indications_total",
    Counter,
    &["result"],
    "Send indications from clients, forwarded or dropped (no allocation or permission).",
);
pub const ALLOCATIONS: Def = def(
    "tern_turn_allocations",
    Gauge,
    &["transport", "family"],
    "Live allocations by client transport and relayed address family (dual: IPv4 and IPv6).",
);
pub const ALLOCATIONS_CREATED: Def = def(
    "tern_turn_allocations_created_total",
    Counter,
    &[],
    "Allocations created.",
);
pub const ALLOCATIONS_ENDED: Def = def(
    "tern_turn_allocations_ended_total",
    Counter,
    &["reason"],
    "Allocations ended: expired, or deleted (Refresh with lifetime 0, TCP connection closed).",
);
pub const ALLOCATION_LIFETIME: Def = def(
    "tern_turn_allocation_lifetime_seconds",
    Histogram,
    &[],
    "How long ended allocations lived.",
);
pub const PERMISSIONS: Def = def(
    "tern_turn_permissions",
    Gauge,
    &["transport", "family"],
    "Live permissions by client transport and peer address family.",
);
pub const PERMISSIONS_CREATED: Def = def(
    "tern_turn_permissions_created_total",
    Counter,
    &[],
    "Permissions installed (refreshes of a live permission not counted).",
);
pub const CHANNELS: Def = def(
    "tern_turn_channels",
    Gauge,
    &["transport", "family"],
    "Live channel bindings by client transport and peer address family.",
);
pub const CHANNELS_CREATED: Def = def(
    "tern_turn_channels_created_total",
    Counter,
    &[],
    "Channel bindings created.",
);
pub const RESERVATIONS_CREATED: Def = def(
    "tern_turn_reservations_created_total",
    Counter,
    &[],
    "Relay ports reserved by EVEN-PORT with the R bit.",
);
pub const RELAY_PORTS_IN_USE: Def = def(
    "tern_turn_relay_ports_in_use",
    Gauge,
    &["family"],
    "Relay ports taken (allocated or reserved), summed over the relay addresses of a family.",
);
pub const RELAY_PORTS_FREE: Def = def(
    "tern_turn_relay_ports_free",
    Gauge,
    &["family"],
    "Relay ports free, summed over the relay addresses of a family.",
);
// RFC 6062 TCP allocations.
pub const TCP_ALLOCATIONS: Def = def(
    "tern_turn_tcp_allocations",
    Gauge,
    &[],
    "Live RFC 6062 TCP allocations (also counted in tern_turn_allocations).",
);
pub const TCP_CONNECTS: Def = def(
    "tern_turn_tcp_connects_total",
    Counter,
    &["result"],
    "RFC 6062 Connect requests: ok, failed (447), timeout (447 after 30 s), refused.",
);
pub const TCP_PEER_INCOMING: Def = def(
    "tern_turn_tcp_peer_connections_incoming_total",
    Counter,
    &["result"],
    "Peer connections to TCP relays: attempt_sent, no_permission, over_limit.",
);
pub const TCP_BINDS: Def = def(
    "tern_turn_tcp_connection_binds_total",
    Counter,
    &["result"],
    "RFC 6062 ConnectionBinds: ok, rejected, expired (none within 30 s).",
);
pub const TCP_PEER_CONNECTIONS: Def = def(
    "tern_turn_tcp_peer_connections",
    Gauge,
    &["state"],
    "Live RFC 6062 peer connections by state: connecting, pending, bound.",
);
// Signaling.
pub const SIGNAL_CONNECTIONS: Def = def(
    "tern_signal_connections",
    Gauge,
    &["protocol"],
    "Open signaling WebSockets: native (/ws) and PeerJS.",
);
pub const SIGNAL_ROOMS: Def = def(
    "tern_signal_rooms",
    Gauge,
    &[],
    "Native signaling rooms with at least one member (named rooms and LAN groups).",
);
pub const SIGNAL_MESSAGES: Def = def(
    "tern_signal_messages_total",
    Counter,
    &["protocol", "type"],
    "Signaling messages received past the rate limit, by protocol and type (invalid: unparsable, unknown or too large).",
);
pub const SIGNAL_FORWARDED: Def = def(
    "tern_signal_forwarded_total",
    Counter,
    &["protocol"],
    "Signaling messages delivered to another peer.",
);
pub const SIGNAL_RATE_LIMITED: Def = def(
    "tern_signal_rate_limited_total",
    Counter,
    &["protocol"],
    "Signaling messages refused by the per-connection rate limit.",
);
pub const SIGNAL_REFUSED: Def = def(
    "tern_signal_refused_total",
    Counter,
    &["protocol", "reason"],
    "Signaling messages not carried out, by protocol and reason (each one told to its sender).",
);
pub const SIGNAL_LIMIT_CLOSED: Def = def(
    "tern_signal_limit_closed_total",
    Counter,
    &["protocol", "reason"],
    "Signaling connections closed for breaking a limit: native flood (1008); PeerJS rate_limit (1008), too_large (1009).",
);
pub const PEERJS_QUEUED_BYTES: Def = def(
    "tern_peerjs_queued_bytes",
    Gauge,
    &[],
    "Bytes held in queues for absent PeerJS peers.",
);
pub const SIGNAL_SLOW_CLOSED: Def = def(
    "tern_signal_slow_closed_total",
    Counter,
    &["protocol"],
    "Signaling connections closed (1008) because their queued outgoing bytes or frames went over the send budget.",
);
pub const PEERJS_CLIENTS: Def = def(
    "tern_peerjs_clients",
    Gauge,
    &[],
    "Registered PeerJS clients.",
);
pub const PEERJS_QUEUE_DROPPED: Def = def(
    "tern_peerjs_queued_dropped_total",
    Counter,
    &[],
    "PeerJS messages for absent peers dropped because the queue was full.",
);
pub const PEERJS_EXPIRED: Def = def(
    "tern_peerjs_expired_total",
    Counter,
    &[],
    "PeerJS messages for absent peers that expired (EXPIRE sent back).",
);
// WebSocket relay.
pub const WS_RELAY_SESSIONS: Def = def(
    "tern_ws_relay_sessions",
    Gauge,
    &[],
    "WebSocket relay sessions granted and not yet finished.",
);
pub const WS_RELAY_SESSIONS_STARTED: Def = def(
    "tern_ws_relay_sessions_started_total",
    Counter,
    &[],
    "WebSocket relay sessions granted.",
);
pub const WS_RELAY_BYTES: Def = def(
    "tern_ws_relay_bytes_total",
    Counter,
    &[],
    "Payload bytes delivered through the WebSocket relay (both directions).",
);
pub const WS_RELAY_FRAMES: Def = def(
    "tern_ws_relay_frames_total",
    Counter,
    &[],
    "Frames delivered through the WebSocket relay (both directions).",
);
pub const WS_RELAY_OVERSIZED: Def = def(
    "tern_ws_relay_oversized_frames_total",
    Counter,
    &[],
    "WebSocket relay connections closed for a frame over relay_ws.max_frame_bytes (1009).",
);
pub const WS_RELAY_BAD_TICKETS: Def = def(
    "tern_ws_relay_bad_tickets_total",
    Counter,
    &[],
    "WebSocket relay connections refused for an unknown, used or expired ticket.",
);
// HTTP API.
pub const HTTP_REQUESTS: Def = def(
    "tern_http_requests_total",
    Counter,
    &["route", "status"],
    "HTTP requests by route template and status code (WebSocket upgrades count as 101; \
     heads refused before routing, e.g. 431, under route \"unparsed\").",
);
pub const HTTP_DURATION: Def = def(
    "tern_http_request_duration_seconds",
    Histogram,
    &["route"],
    "Time to answer an HTTP request (for WebSockets: the upgrade only).",
);
pub const HTTP_CONNECTIONS: Def = def(
    "tern_http_connections",
    Gauge,
    &[],
    "HTTP connections open on the API listener (plain or TLS, WebSockets included).",
);
pub const HTTP_CONNECTIONS_ACCEPTED: Def = def(
    "tern_http_connections_accepted_total",
    Counter,
    &[],
    "HTTP connections admitted under api.max_connections and api.max_connections_per_ip.",
);
pub const HTTP_CONNECTIONS_REFUSED: Def = def(
    "tern_http_connections_refused_total",
    Counter,
    &["reason"],
    "HTTP connections closed right after accept, by the cap reached.",
);
pub const HTTP_CONNECTIONS_CLOSED: Def = def(
    "tern_http_connections_closed_total",
    Counter,
    &["reason"],
    "HTTP connections closed by Tern: failed TLS handshake, no request head in time, a \
     client that stopped reading a response, or a request head over api.max_header_bytes \
     (answered 431).",
);

// Usage accounting (docs/usage.md): never a user in a label.
pub const USAGE_RECORDS: Def = def(
    "tern_usage_records_total",
    Counter,
    &[],
    "Usage records the TURN core reported (allocation starts, interim reads, ends).",
);
pub const USAGE_WRITTEN: Def = def(
    "tern_usage_records_written_total",
    Counter,
    &[],
    "Rollup rows (user, period) written to the usage store.",
);
pub const USAGE_PENDING: Def = def(
    "tern_usage_pending_rows",
    Gauge,
    &[],
    "Rollup rows waiting for the usage store (the write queue; grows while the store fails).",
);
pub const USAGE_STORE_ERRORS: Def = def(
    "tern_usage_store_errors_total",
    Counter,
    &[],
    "Failed usage store operations (the rows stay in memory and are retried).",
);
pub const USAGE_REDIS_WRITTEN: Def = def(
    "tern_usage_redis_rows_written_total",
    Counter,
    &[],
    "Cluster mode: rollup rows added to the cluster's Redis hashes.",
);
pub const USAGE_REDIS_PENDING: Def = def(
    "tern_usage_redis_pending_rows",
    Gauge,
    &[],
    "Cluster mode: rollup rows waiting for Redis (grows while Redis is away).",
);
pub const USAGE_REDIS_ERRORS: Def = def(
    "tern_usage_redis_errors_total",
    Counter,
    &[],
    "Cluster mode: failed usage writes or reads to Redis (the rows are kept and retried).",
);
pub const USAGE_STREAM_RECORDS: Def = def(
    "tern_usage_stream_records_total",
    Counter,
    &[],
    "Cluster mode: finished-allocation records sent to the usage stream.",
);
pub const USAGE_STREAM_DROPPED: Def = def(
    "tern_usage_stream_dropped_total",
    Counter,
    &[],
    "Cluster mode: finished-allocation records dropped from the full stream queue while Redis was away.",
);
pub const USAGE_BUDGET_REFUSALS: Def = def(
    "tern_usage_budget_refusals_total",
    Counter,
    &["reason"],
    "Allocate and Refresh requests refused with 486 because the user's byte budget is used up.",
);

pub const CLUSTER_REDIS_UP: Def = def(
    "tern_cluster_redis_up",
    Gauge,
    &[],
    "Cluster mode: 1 while the last Redis round trip succeeded; 0 while this node works alone \
     (local quota, its own ICE URLs, cross-node requests refused).",
);
pub const CLUSTER_NODES: Def = def(
    "tern_cluster_nodes",
    Gauge,
    &[],
    "Cluster mode: live nodes in the registry as last read (this one included; 0 while Redis \
     is unreachable).",
);
pub const CLUSTER_REDIS_CONNECTS: Def = def(
    "tern_cluster_redis_connects_total",
    Counter,
    &[],
    "Cluster mode: connections made to Redis (the first and every reconnection).",
);
pub const CLUSTER_REDIS_ERRORS: Def = def(
    "tern_cluster_redis_errors_total",
    Counter,
    &[],
    "Cluster mode: failed Redis connects and round trips (each drops the connection).",
);
pub const CLUSTER_QUOTA_LEASE_OPS: Def = def(
    "tern_cluster_quota_lease_operations_total",
    Counter,
    &["op"],
    "Cluster mode: per-user quota lease operations: a user's count written, the node's \
     leases renewed, or rewritten whole (after a reconnect or a Redis restarted empty).",
);
pub const CLUSTER_ICE_STEERED: Def = def(
    "tern_cluster_ice_steered_total",
    Counter,
    &[],
    "Cluster mode: /api/ice and /api/turn answers naming another node (this one draining or \
     over its ceilings).",
);
pub const CLUSTER_BUS_MESSAGES: Def = def(
    "tern_cluster_bus_messages_total",
    Counter,
    &["direction"],
    "Cluster mode: bus messages (room joins, leaves, signals, relay tickets; PeerJS ids and \
     messages) published by this node or received from others.",
);
pub const CLUSTER_BUS_LATENCY: Def = def(
    "tern_cluster_bus_latency_seconds",
    Histogram,
    &[],
    "Cluster mode: time from a bus message's publication on another node to its arrival \
     here (cross-node deliveries; includes the two hosts' clock offset).",
);
pub const CLUSTER_BUS_RESYNCS: Def = def(
    "tern_cluster_bus_resyncs_total",
    Counter,
    &[],
    "Cluster mode: other nodes' member lists re-read (after a sequence gap, a reconnect, or \
     a node appearing).",
);
pub const CLUSTER_BUS_DROPPED: Def = def(
    "tern_cluster_bus_dropped_total",
    Counter,
    &[],
    "Cluster mode: bus messages dropped on this node (a full queue, or Redis unreachable); \
     receivers repair the gap by a resync.",
);
pub const CLUSTER_BUS_ROOM_CHANNELS: Def = def(
    "tern_cluster_bus_room_channels",
    Gauge,
    &[],
    "Cluster mode: room channels this node subscribes to (the rooms with a member here, \
     the LAN rooms, the PeerJS realm): only these rooms' traffic reaches it.",
);
pub const CLUSTER_BUS_SHARDED: Def = def(
    "tern_cluster_bus_sharded",
    Gauge,
    &[],
    "Cluster mode: 1 when the bus uses sharded pub/sub (SPUBLISH/SSUBSCRIBE), 0 for plain \
     PUBLISH/SUBSCRIBE (Redis without it, or cluster.sharded_pubsub = false).",
);

/// Every metric defined above (the process_* metrics come from the prometheus crate).
pub const ALL: &[&Def] = &[
    &USAGE_RECORDS,
    &USAGE_WRITTEN,
    &USAGE_PENDING,
    &USAGE_STORE_ERRORS,
    &USAGE_REDIS_WRITTEN,
    &USAGE_REDIS_PENDING,
    &USAGE_REDIS_ERRORS,
    &USAGE_STREAM_RECORDS,
    &USAGE_STREAM_DROPPED,
    &USAGE_BUDGET_REFUSALS,
    &BUILD_INFO,
    &READY,
    &DRAINING,
    &RELAY_BYTES,
    &RELAY_PACKETS,
    &RELAY_DROPPED,
    &TCP_ACCEPTED,
    &TCP_REFUSED,
    &TCP_CLOSED,
    &TCP_RELAY_BYTES,
    &TCP_RELAY_CHUNKS,
    &TCP_RELAY_PEER_CONNECTIONS,
    &TCP_RELAY_CONNECT_FAILURES,
    &TCP_RELAY_THROTTLED,
    &TCP_HANDOVERS,
    &FASTPATH_PACKETS,
    &FASTPATH_BYTES,
    &FASTPATH_BINDINGS,
    &FASTPATH_MAP_FULL,
    &REQUESTS,
    &REQUEST_DURATION,
    &AUTH_FAILURES,
    &RATE_LIMITED,
    &PEER_DENIED,
    &MALFORMED,
    &UNKNOWN_ATTRIBUTES,
    &BINDINGS,
    &SEND_INDICATIONS,
    &ALLOCATIONS,
    &ALLOCATIONS_CREATED,
    &ALLOCATIONS_ENDED,
    &ALLOCATION_LIFETIME,
    &PERMISSIONS,
    &PERMISSIONS_CREATED,
    &CHANNELS,
    &CHANNELS_CREATED,
    &RESERVATIONS_CREATED,
    &RELAY_PORTS_IN_USE,
    &RELAY_PORTS_FREE,
    &TCP_ALLOCATIONS,
    &TCP_CONNECTS,
    &TCP_PEER_INCOMING,
    &TCP_BINDS,
    &TCP_PEER_CONNECTIONS,
    &SIGNAL_CONNECTIONS,
    &SIGNAL_ROOMS,
    &SIGNAL_MESSAGES,
    &SIGNAL_FORWARDED,
    &SIGNAL_RATE_LIMITED,
    &SIGNAL_REFUSED,
    &SIGNAL_LIMIT_CLOSED,
    &PEERJS_QUEUED_BYTES,
    &SIGNAL_SLOW_CLOSED,
    &PEERJS_CLIENTS,
    &PEERJS_QUEUE_DROPPED,
    &PEERJS_EXPIRED,
    &WS_RELAY_SESSIONS,
    &WS_RELAY_SESSIONS_STARTED,
    &WS_RELAY_BYTES,
    &WS_RELAY_FRAMES,
    &WS_RELAY_OVERSIZED,
    &WS_RELAY_BAD_TICKETS,
    &HTTP_REQUESTS,
    &HTTP_DURATION,
    &HTTP_CONNECTIONS,
    &HTTP_CONNECTIONS_ACCEPTED,
    &HTTP_CONNECTIONS_REFUSED,
    &HTTP_CONNECTIONS_CLOSED,
    &CLUSTER_REDIS_UP,
    &CLUSTER_NODES,
    &CLUSTER_REDIS_CONNECTS,
    &CLUSTER_REDIS_ERRORS,
    &CLUSTER_QUOTA_LEASE_OPS,
    &CLUSTER_ICE_STEERED,
    &CLUSTER_BUS_MESSAGES,
    &CLUSTER_BUS_LATENCY,
    &CLUSTER_BUS_RESYNCS,
    &CLUSTER_BUS_DROPPED,
    &CLUSTER_BUS_ROOM_CHANNELS,
    &CLUSTER_BUS_SHARDED,
];

const CLUSTER_DEFS: &[&Def] = &[
    &CLUSTER_REDIS_UP,
    &CLUSTER_NODES,
    &CLUSTER_REDIS_CONNECTS,
    &CLUSTER_REDIS_ERRORS,
    &CLUSTER_QUOTA_LEASE_OPS,
    &CLUSTER_ICE_STEERED,
    &CLUSTER_BUS_MESSAGES,
    &CLUSTER_BUS_LATENCY,
    &CLUSTER_BUS_RESYNCS,
    &CLUSTER_BUS_DROPPED,
    &CLUSTER_BUS_ROOM_CHANNELS,
    &CLUSTER_BUS_SHARDED,
];

const DAEMON_DEFS: &[&Def] = &[&BUILD_INFO, &READY, &DRAINING];

const TURN_DEFS: &[&Def] = &[
    &RELAY_BYTES,
    &RELAY_PACKETS,
    &RELAY_DROPPED,
    &TCP_ACCEPTED,
    &TCP_REFUSED,
    &TCP_CLOSED,
    &TCP_RELAY_BYTES,
    &TCP_RELAY_CHUNKS,
    &TCP_RELAY_PEER_CONNECTIONS,
    &TCP_RELAY_CONNECT_FAILURES,
    &TCP_RELAY_THROTTLED,
    &TCP_HANDOVERS,
    &FASTPATH_PACKETS,
    &FASTPATH_BYTES,
    &FASTPATH_BINDINGS,
    &FASTPATH_MAP_FULL,
    &REQUESTS,
    &REQUEST_DURATION,
    &AUTH_FAILURES,
    &RATE_LIMITED,
    &PEER_DENIED,
    &MALFORMED,
    &UNKNOWN_ATTRIBUTES,
    &BINDINGS,
    &SEND_INDICATIONS,
    &ALLOCATIONS,
    &ALLOCATIONS_CREATED,
    &ALLOCATIONS_ENDED,
    &ALLOCATION_LIFETIME,
    &PERMISSIONS,
    &PERMISSIONS_CREATED,
    &CHANNELS,
    &CHANNELS_CREATED,
    &RESERVATIONS_CREATED,
    &RELAY_PORTS_IN_USE,
    &RELAY_PORTS_FREE,
    &TCP_ALLOCATIONS,
    &TCP_CONNECTS,
    &TCP_PEER_INCOMING,
    &TCP_BINDS,
    &TCP_PEER_CONNECTIONS,
];

const HTTP_FACE_DEFS: &[&Def] = &[
    &SIGNAL_CONNECTIONS,
    &SIGNAL_ROOMS,
    &SIGNAL_MESSAGES,
    &SIGNAL_FORWARDED,
    &SIGNAL_RATE_LIMITED,
    &SIGNAL_REFUSED,
    &SIGNAL_LIMIT_CLOSED,
    &PEERJS_QUEUED_BYTES,
    &SIGNAL_SLOW_CLOSED,
    &PEERJS_CLIENTS,
    &PEERJS_QUEUE_DROPPED,
    &PEERJS_EXPIRED,
    &WS_RELAY_SESSIONS,
    &WS_RELAY_SESSIONS_STARTED,
    &WS_RELAY_BYTES,
    &WS_RELAY_FRAMES,
    &WS_RELAY_OVERSIZED,
    &WS_RELAY_BAD_TICKETS,
    &HTTP_CONNECTIONS,
    &HTTP_CONNECTIONS_ACCEPTED,
    &HTTP_CONNECTIONS_REFUSED,
    &HTTP_CONNECTIONS_CLOSED,
];

/// Upper bounds (seconds) of the HTTP request duration histogram.
const HTTP_SECONDS_BOUNDS: [f64; 10] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Per-route HTTP counters, updated by the API's middleware (control path: one request,
/// one labelled increment).
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn new() -> Arc<HttpMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(HTTP_REQUESTS.name, HTTP_REQUESTS.help),
            HTTP_REQUESTS.labels,
        )
        .expect("valid metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(HTTP_DURATION.name, HTTP_DURATION.help)
                .buckets(HTTP_SECONDS_BOUNDS.to_vec()),
            HTTP_DURATION.labels,
        )
        .expect("valid metric definition");
        Arc::new(HttpMetrics { requests, duration })
    }

    /// One answered request. `route` is the matched route template (bounded) or
    /// "unmatched"; never the raw path.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let mut buf = [0u8; 3];
        let status = status_label(status, &mut buf);
        self.requests.with_label_values(&[route, status]).inc();
        self.duration.with_label_values(&[route]).observe(seconds);
    }

    /// One request refused by the HTTP parser before any route saw it (431 for a head over
    /// `api.max_header_bytes`): counted under route "unparsed", with no duration.
    pub fn refused_unparsed(&self, status: u16) {
        let mut buf = [0u8; 3];
        let status = status_label(status, &mut buf);
        self.requests.with_label_values(&["unparsed", status]).inc();
    }
}

fn status_label(status: u16, buf: &mut [u8; 3]) -> &str {
    if !(100..=599).contains(&status) {
        return "other";
    }
    buf[0] = b'0' + (status / 100) as u8;
    buf[1] = b'0' + (status / 10 % 10) as u8;
    buf[2] = b'0' + (status % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("other")
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
        turn: Option<crate::net::StatsSource>,
        http: Option<crate::api::StatsSource>,
    ) -> Result<Metrics, RegistryError> {
        let registry = Registry::new();
        registry.register(Box::new(DaemonCollector {
            descs: descs(DAEMON_DEFS),
        }))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        if let Some(src) = turn {
            registry.register(Box::new(TurnCollector {
                descs: descs(TURN_DEFS),
                src,
            }))?;
        }
        if let Some(src) = http {
            let m = src.http_metrics();
            registry.register(Box::new(m.requests.clone()))?;
            registry.register(Box::new(m.duration.clone()))?;
            registry.register(Box::new(HttpCollector {
                descs: descs(HTTP_FACE_DEFS),
                src,
            }))?;
        }
        Ok(Metrics { registry })
    }

    /// Adds the usage accounting counters (when `[usage]` is on).
    pub fn register_usage(&self, ledger: Arc<crate::usage::Ledger>) -> Result<(), RegistryError> {
        self.registry.register(Box::new(UsageCollector {
            descs: descs(USAGE_DEFS),
            ledger,
        }))?;
        Ok(())
    }

    /// Cluster mode's metrics (`[cluster]` only; a single node exports none of them).
    pub fn add_cluster(
        &mut self,
        view: Arc<crate::cluster::ClusterView>,
    ) -> Result<(), RegistryError> {
        self.registry.register(Box::new(ClusterCollector {
            descs: descs(CLUSTER_DEFS),
            view,
        }))?;
        Ok(())
    }

    /// The Prometheus text exposition of everything (format 0.0.4).
    pub fn encode(&self) -> Result<String, RegistryError> {
        Ok(prometheus::TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

fn descs(defs: &[&Def]) -> Vec<Desc> {
    defs.iter()
        .map(|d| {
            Desc::new(
                d.name.to_string(),
                d.help.to_string(),
                d.labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .expect("valid metric definition")
        })
        .collect()
}

/// The daemon's version and lifecycle state.
struct DaemonCollector {
    descs: Vec<Desc>,
}

impl Collector for DaemonCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let st = &crate::lifecycle::STATE;
        let mut f = Families::default();
        f.sample(&BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1);
        f.sample(&READY, &[], u64::from(st.ready()));
        f.sample(&DRAINING, &[], u64::from(st.draining()));
        f.finish()
    }
}

/// Reads the TURN workers' snapshots at scrape time.
struct TurnCollector {
    descs: Vec<Desc>,
    src: crate::net::StatsSource,
}

impl Collector for TurnCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let net = self.src.net();
        let t = self.src.turn();
        let mut f = Families::default();
        for (dir, tr, bytes, packets) in [
            (
                "client_to_peer",
                "udp",
                net.client_to_peer_udp_bytes,
                net.client_to_peer_udp_packets,
            ),
            (
                "client_to_peer",
                "tcp",
                net.client_to_peer_tcp_bytes,
                net.client_to_peer_tcp_packets,
            ),
            (
                "peer_to_client",
                "udp",
                net.peer_to_client_udp_bytes,
                net.peer_to_client_udp_packets,
            ),
            (
                "peer_to_client",
                "tcp",
                net.peer_to_client_tcp_bytes,
                net.peer_to_client_tcp_packets,
            ),
            (
                "client_to_peer",
                "tls",
                net.client_to_peer_tls_bytes,
                net.client_to_peer_tls_packets,
            ),
            (
                "peer_to_client",
                "tls",
                net.peer_to_client_tls_bytes,
                net.peer_to_client_tls_packets,
            ),
        ] {
            f.sample(&RELAY_BYTES, &[dir, tr], bytes);
            f.sample(&RELAY_PACKETS, &[dir, tr], packets);
        }
        for (reason, v) in [
            ("no_channel", net.drop_no_channel),
            ("no_permission", net.drop_no_permission),
            ("tcp_queue_full", net.drop_tcp_queue_full),
            ("send_error", net.drop_send_error),
            ("truncated", net.drop_truncated),
            ("bandwidth", net.drop_bandwidth),
            ("user_bandwidth", net.drop_user_bandwidth),
            ("invalid", net.drop_invalid),
        ] {
            f.sample(&RELAY_DROPPED, &[reason], v);
        }
        f.sample(&TCP_ACCEPTED, &[], net.tcp_accepted);
        f.sample(&TCP_REFUSED, &[], net.tcp_rejected_per_ip);
        for (reason, v) in [
            ("garbage", net.tcp_closed_garbage),
            ("idle", net.tcp_closed_idle),
            ("backlog", net.tcp_closed_backlog),
            ("tls_error", net.tls_closed_error),
            ("tls_handshake_timeout", net.tls_closed_handshake_timeout),
        ] {
            f.sample(&TCP_CLOSED, &[reason], v);
        }
        for (dir, bytes, chunks) in [
            (
                "client_to_peer",
                net.tcp_relay_client_to_peer_bytes,
                net.tcp_relay_client_to_peer_chunks,
            ),
            (
                "peer_to_client",
                net.tcp_relay_peer_to_client_bytes,
                net.tcp_relay_peer_to_client_chunks,
            ),
        ] {
            f.sample(&TCP_RELAY_BYTES, &[dir], bytes);
            f.sample(&TCP_RELAY_CHUNKS, &[dir], chunks);
        }
        f.sample(&TCP_RELAY_PEER_CONNECTIONS, &[], net.tcp_relay_peer_sockets);
        f.sample(
            &TCP_RELAY_CONNECT_FAILURES,
            &[],
            net.tcp_relay_connect_failures,
        );
        f.sample(&TCP_RELAY_THROTTLED, &[], net.tcp_relay_throttled);
        f.sample(&TCP_HANDOVERS, &[], net.tcp_handovers);
        for (dir, packets, bytes) in [
            (
                "client_to_peer",
                net.fastpath_to_peer_packets,
                net.fastpath_to_peer_bytes,
            ),
            (
                "peer_to_client",
                net.fastpath_to_client_packets,
                net.fastpath_to_client_bytes,
            ),
        ] {
            f.sample(&FASTPATH_PACKETS, &[dir], packets);
            f.sample(&FASTPATH_BYTES, &[dir], bytes);
        }
        f.sample(&FASTPATH_BINDINGS, &[], net.fastpath_bindings);
        f.sample(&FASTPATH_MAP_FULL, &[], net.fastpath_map_full);
        for (mi, m) in MethodLabel::ALL.iter().enumerate() {
            for ri in 0..RESULT_CODES.len() {
                f.sample(&REQUESTS, &[m.name(), result_label(ri)], t.requests[mi][ri]);
            }
        }
        f.histogram(
            &REQUEST_DURATION,
            &[],
            &REQUEST_SECONDS_BOUNDS,
            &t.request_seconds,
        );
        for (i, r) in AuthFailure::ALL.iter().enumerate() {
            f.sample(&AUTH_FAILURES, &[r.name()], t.auth_failures[i]);
        }
        f.sample(&RATE_LIMITED, &[], t.rate_limited);
        f.sample(&PEER_DENIED, &[], t.peer_denied);
        f.sample(&MALFORMED, &[], t.malformed);
        f.sample(&UNKNOWN_ATTRIBUTES, &[], t.unknown_attributes);
        f.sample(&BINDINGS, &[], t.bindings);
        f.sample(&SEND_INDICATIONS, &["forwarded"], t.sends_forwarded);
        f.sample(&SEND_INDICATIONS, &["dropped"], t.sends_dropped);
        for (ti, tr) in TRANSPORTS.iter().enumerate() {
            for (fi, fam) in ALLOCATION_FAMILIES.iter().enumerate() {
                f.sample(&ALLOCATIONS, &[tr, fam], t.allocations_by[ti][fi]);
            }
            for (fi, fam) in FAMILIES.iter().enumerate() {
                f.sample(&PERMISSIONS, &[tr, fam], t.permissions_by[ti][fi]);
                f.sample(&CHANNELS, &[tr, fam], t.channels_by[ti][fi]);
            }
        }
        f.sample(&ALLOCATIONS_CREATED, &[], t.allocations_created);
        f.sample(&ALLOCATIONS_ENDED, &["expired"], t.allocations_expired);
        f.sample(&ALLOCATIONS_ENDED, &["deleted"], t.allocations_deleted);
        f.histogram(
            &ALLOCATION_LIFETIME,
            &[],
            &LIFETIME_SECONDS_BOUNDS,
            &t.allocation_lifetime_seconds,
        );
        f.sample(&PERMISSIONS_CREATED, &[], t.permissions_created);
        f.sample(&CHANNELS_CREATED, &[], t.channels_created);
        f.sample(&RESERVATIONS_CREATED, &[], t.reservations_created);
        f.sample(&TCP_ALLOCATIONS, &[], t.tcp_allocations);
        for (i, r) in TCP_CONNECT_RESULTS.iter().enumerate() {
            f.sample(&TCP_CONNECTS, &[r], t.tcp_connects[i]);
        }
        for (i, r) in TCP_PEER_RESULTS.iter().enumerate() {
            f.sample(&TCP_PEER_INCOMING, &[r], t.tcp_peer_incoming[i]);
        }
        for (i, r) in TCP_BIND_RESULTS.iter().enumerate() {
            f.sample(&TCP_BINDS, &[r], t.tcp_binds[i]);
        }
        for (i, st) in TCP_CONN_STATES.iter().enumerate() {
            f.sample(&TCP_PEER_CONNECTIONS, &[st], t.tcp_conns_by_state[i]);
        }
        for (fi, fam) in FAMILIES.iter().enumerate() {
            if let Some(p) = self.src.relay_ports(fi == 1) {
                f.sample(&RELAY_PORTS_IN_USE, &[fam], p.in_use as u64);
                f.sample(&RELAY_PORTS_FREE, &[fam], p.free as u64);
            }
        }
        f.finish()
    }
}

/// Reads the HTTP face's signaling and relay counters at scrape time.
struct HttpCollector {
    descs: Vec<Desc>,
    src: crate::api::StatsSource,
}

impl Collector for HttpCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.src.snapshot();
        let mut f = Families::default();
        f.sample(&SIGNAL_CONNECTIONS, &["native"], s.signal_peers as u64);
        f.sample(&SIGNAL_CONNECTIONS, &["peerjs"], s.peerjs_clients as u64);
        f.sample(&SIGNAL_ROOMS, &[], s.signal_rooms as u64);
        for (i, ty) in rooms::MESSAGE_TYPES.iter().enumerate() {
            f.sample(&SIGNAL_MESSAGES, &["native", ty], s.signal.messages[i]);
        }
        for (i, ty) in peerjs::MESSAGE_TYPES.iter().enumerate() {
            f.sample(&SIGNAL_MESSAGES, &["peerjs", ty], s.peerjs.messages[i]);
        }
        f.sample(&SIGNAL_FORWARDED, &["native"], s.signal.signals_forwarded);
        f.sample(&SIGNAL_FORWARDED, &["peerjs"], s.peerjs.forwarded);
        f.sample(&SIGNAL_RATE_LIMITED, &["native"], s.signal.rate_limited);
        f.sample(&SIGNAL_RATE_LIMITED, &["peerjs"], s.peerjs.refused[0]);
        for (i, r) in rooms::REFUSAL_REASONS.iter().enumerate() {
            f.sample(&SIGNAL_REFUSED, &["native", r], s.signal.refused[i]);
        }
        for (i, r) in peerjs::REFUSAL_REASONS.iter().enumerate() {
            f.sample(&SIGNAL_REFUSED, &["peerjs", r], s.peerjs.refused[i]);
        }
        f.sample(
            &SIGNAL_LIMIT_CLOSED,
            &["native", "flood"],
            s.signal.flood_closed,
        );
        // Every PeerJS rate or size refusal closes its sender.
        for (i, r) in peerjs::REFUSAL_REASONS.iter().enumerate().take(2) {
            f.sample(&SIGNAL_LIMIT_CLOSED, &["peerjs", r], s.peerjs.refused[i]);
        }
        f.sample(&PEERJS_QUEUED_BYTES, &[], s.peerjs.queued_bytes);
        f.sample(&SIGNAL_SLOW_CLOSED, &["native"], s.signal_slow_closed);
        f.sample(&SIGNAL_SLOW_CLOSED, &["peerjs"], s.peerjs_slow_closed);
        f.sample(&PEERJS_CLIENTS, &[], s.peerjs_clients as u64);
        f.sample(&PEERJS_QUEUE_DROPPED, &[], s.peerjs.queued_dropped);
        f.sample(&PEERJS_EXPIRED, &[], s.peerjs.expired);
        f.sample(&WS_RELAY_SESSIONS, &[], s.relay_sessions_active as u64);
        f.sample(&WS_RELAY_SESSIONS_STARTED, &[], s.relay_sessions_started);
        f.sample(&WS_RELAY_BYTES, &[], s.relay_bytes_forwarded);
        f.sample(&WS_RELAY_FRAMES, &[], s.relay_frames_forwarded);
        f.sample(&WS_RELAY_OVERSIZED, &[], s.relay_oversized_frames);
        f.sample(&WS_RELAY_BAD_TICKETS, &[], s.relay_bad_tickets);
        f.sample(&HTTP_CONNECTIONS, &[], s.connections_open as u64);
        f.sample(&HTTP_CONNECTIONS_ACCEPTED, &[], s.connections_accepted);
        let refused = [
            ("max_connections", s.connections_refused_total),
            ("max_connections_per_ip", s.connections_refused_per_ip),
        ];
        for (reason, n) in refused {
            f.sample(&HTTP_CONNECTIONS_REFUSED, &[reason], n);
        }
        let closed = [
            ("tls_handshake", s.tls_handshakes_failed),
            ("header_timeout", s.header_timeouts_first),
            ("idle_timeout", s.header_timeouts_keep_alive),
            ("write_stall", s.write_stalls),
            ("header_too_large", s.header_too_large),
        ];
        for (reason, n) in closed {
            f.sample(&HTTP_CONNECTIONS_CLOSED, &[reason], n);
        }
        f.finish()
    }
}

const USAGE_DEFS: &[&Def] = &[
    &USAGE_RECORDS,
    &USAGE_WRITTEN,
    &USAGE_PENDING,
    &USAGE_STORE_ERRORS,
    &USAGE_REDIS_WRITTEN,
    &USAGE_REDIS_PENDING,
    &USAGE_REDIS_ERRORS,
    &USAGE_STREAM_RECORDS,
    &USAGE_STREAM_DROPPED,
    &USAGE_BUDGET_REFUSALS,
];

/// Reads the usage ledger's counters at scrape time.
struct UsageCollector {
    descs: Vec<Desc>,
    ledger: Arc<crate::usage::Ledger>,
}

impl Collector for UsageCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.ledger.stats;
        let mut f = Families::default();
        f.sample(&USAGE_RECORDS, &[], s.records.load(Relaxed));
        f.sample(&USAGE_WRITTEN, &[], s.rows_written.load(Relaxed));
        f.sample(&USAGE_PENDING, &[], s.pending_rows.load(Relaxed));
        f.sample(&USAGE_STORE_ERRORS, &[], s.store_errors.load(Relaxed));
        f.sample(
            &USAGE_REDIS_WRITTEN,
            &[],
            s.redis_rows_written.load(Relaxed),
        );
        f.sample(
            &USAGE_REDIS_PENDING,
            &[],
            s.redis_pending_rows.load(Relaxed),
        );
        f.sample(&USAGE_REDIS_ERRORS, &[], s.redis_errors.load(Relaxed));
        f.sample(&USAGE_STREAM_RECORDS, &[], s.stream_records.load(Relaxed));
        f.sample(&USAGE_STREAM_DROPPED, &[], s.stream_dropped.load(Relaxed));
        for (i, b) in crate::usage::Budget::ALL.iter().enumerate() {
            f.sample(
                &USAGE_BUDGET_REFUSALS,
                &[b.label()],
                s.budget_refusals[i].load(Relaxed),
            );
        }
        f.finish()
    }
}

/// Reads cluster mode's counters at scrape time.
struct ClusterCollector {
    descs: Vec<Desc>,
    view: Arc<crate::cluster::ClusterView>,
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.view.stats;
        let mut f = Families::default();
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
        let hub_dropped = self.view.hub_bus_dropped();
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
        f.sample(
            &CLUSTER_BUS_SHARDED,
            &[],
            u64::from(s.bus_sharded.load(Relaxed)),
        );
        f.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_naming_rules() {
        let mut seen = std::collections::HashSet::new();
        for d in ALL {
            assert!(d.name.starts_with("tern_"), "{}", d.name);
            assert!(seen.insert(d.name), "{} defined twice", d.name);
            match d.kind {
                Kind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                _ => assert!(!d.name.ends_with("_total"), "{}", d.name),
            }
            if d.kind == Kind::Histogram {
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
        for d in DAEMON_DEFS
            .iter()
            .chain(TURN_DEFS)
            .chain(HTTP_FACE_DEFS)
            .chain(USAGE_DEFS)
            .chain(CLUSTER_DEFS)
        {
            assert!(ALL.iter().any(|a| a.name == d.name));
        }
    }

    #[test]
    fn docs_list_every_metric() {
        let doc = include_str!("../docs/metrics.md");
        for d in ALL {
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

    #[test]
    fn status_labels() {
        let mut b = [0u8; 3];
        assert_eq!(status_label(200, &mut b), "200");
        assert_eq!(status_label(101, &mut b), "101");
        assert_eq!(status_label(503, &mut b), "503");
        assert_eq!(status_label(42, &mut b), "other");
    }

    #[test]
    fn http_metrics_encode() {
        let registry = Registry::new();
        let m = HttpMetrics::new();
        registry.register(Box::new(m.requests.clone())).unwrap();
        registry.register(Box::new(m.duration.clone())).unwrap();
        m.observe("/api/ice", 200, 0.002);
        m.observe("/api/ice", 200, 0.003);
        m.observe("unmatched", 404, 0.0001);
        m.refused_unparsed(431);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains("tern_http_requests_total{route=\"/api/ice\",status=\"200\"} 2"));
        assert!(text.contains("tern_http_requests_total{route=\"unmatched\",status=\"404\"} 1"));
        assert!(text.contains("tern_http_requests_total{route=\"unparsed\",status=\"431\"} 1"));
        assert!(!text.contains("tern_http_request_duration_seconds_count{route=\"unparsed\"}"));
        assert!(text.contains("tern_http_request_duration_seconds_count{route=\"/api/ice\"} 2"));
    }
}
