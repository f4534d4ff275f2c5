//! The TURN face's metrics: the data path the IO workers count (`crate::net`, summed over
//! their snapshots), the kernel fast path (read from its BPF maps at each worker's
//! housekeeping, also included in `tern_relay_*`) and the TURN cores' control path
//! (summed over the shards' snapshots). Three tables, one collector.

use super::collect::{Face, Families};
use crate::metrics_def::metric_table;
use crate::net::TurnStatsSource;
use crate::turn::stats::{
    result_label, AuthFailure, MethodLabel, ALLOCATION_FAMILIES, FAMILIES, LIFETIME_SECONDS_BOUNDS,
    REQUEST_SECONDS_BOUNDS, RESULT_CODES, TCP_BIND_RESULTS, TCP_CONNECT_RESULTS, TCP_CONN_STATES,
    TCP_PEER_RESULTS, TRANSPORTS,
};

// The relay data path and TCP client connections (the workers' NetStats).
metric_table! { pub RELAY;
    RELAY_BYTES: Counter "tern_relay_bytes_total" ["direction", "transport"]
        "Bytes sent on the relay path: to peers (payload) and to clients (with TURN framing).";
    RELAY_PACKETS: Counter "tern_relay_packets_total" ["direction", "transport"]
        "Packets relayed, by direction and client transport.";
    RELAY_DROPPED: Counter "tern_relay_dropped_packets_total" ["reason"]
        "Packets not relayed, by reason.";
    RELAY_GRO_BUFFERS: Counter "tern_relay_gro_buffers_total" []
        "UDP GRO buffers (datagrams coalesced by the kernel) received and split into datagrams.";
    TCP_ACCEPTED: Counter "tern_turn_tcp_connections_accepted_total" []
        "TCP client connections accepted by the TURN listeners.";
    TCP_REFUSED: Counter "tern_turn_tcp_connections_refused_total" []
        "TCP client connections refused because their source IP reached turn.tcp_max_per_ip.";
    TCP_CLOSED: Counter "tern_turn_tcp_connections_closed_total" ["reason"]
        "TCP client connections closed by Tern, by reason.";
    TCP_RELAY_BYTES: Counter "tern_turn_tcp_relay_bytes_total" ["direction"]
        "Bytes spliced between RFC 6062 client data connections and their peers.";
    TCP_RELAY_CHUNKS: Counter "tern_turn_tcp_relay_chunks_total" ["direction"]
        "Socket reads (client_to_peer: writes) that carried the spliced bytes.";
    TCP_RELAY_PEER_CONNECTIONS: Gauge "tern_turn_tcp_relay_peer_connections" []
        "Peer TCP sockets the workers hold: connecting, waiting for ConnectionBind, or spliced.";
    TCP_RELAY_CONNECT_FAILURES: Counter "tern_turn_tcp_relay_connect_failures_total" []
        "Outgoing RFC 6062 peer connects that failed at the socket level or timed out (447).";
    TCP_RELAY_THROTTLED: Counter "tern_turn_tcp_relay_throttled_total" []
        "Times a spliced RFC 6062 connection waited for its turn.max_bytes_per_sec budget.";
    TCP_HANDOVERS: Counter "tern_turn_tcp_handovers_total" []
        "Client data connections moved to the worker owning their CONNECTION-ID.";
}

// Kernel fast path (turn.kernel_fast_path).
metric_table! { pub FASTPATH;
    FASTPATH_PACKETS: Counter "tern_fastpath_packets_total" ["direction"]
        "UDP datagrams of channel bindings forwarded by the kernel fast path (also in tern_relay_packets_total).";
    FASTPATH_BYTES: Counter "tern_fastpath_bytes_total" ["direction"]
        "Application bytes (ChannelData payload) forwarded by the kernel fast path.";
    FASTPATH_BINDINGS: Gauge "tern_fastpath_bindings" []
        "Channel bindings in the kernel fast path's maps.";
    FASTPATH_MAP_FULL: Counter "tern_fastpath_map_full_total" []
        "Channel bindings the fast path's maps refused (full); relayed in user space instead.";
    FASTPATH_MODE: Gauge "tern_fastpath_mode" ["mode"]
        "1 for what relays channel bindings now (after the fast path's fallbacks), 0 for the others.";
}

// The TURN cores (TurnStats): requests, allocations, permissions, channels, RFC 6062.
metric_table! { pub TURN;
    REQUESTS: Counter "tern_turn_requests_total" ["method", "result"]
        "STUN/TURN requests answered, by method and result (success or error code).";
    REQUEST_DURATION: Histogram "tern_turn_request_duration_seconds" []
        "Time to handle one STUN/TURN request, from decoding to the response written.";
    AUTH_FAILURES: Counter "tern_turn_auth_failures_total" ["reason"]
        "Requests that failed authentication, by reason.";
    RATE_LIMITED: Counter "tern_turn_rate_limited_total" []
        "Unauthenticated requests dropped by the per-source rate limit.";
    PEER_DENIED: Counter "tern_turn_peer_denied_total" []
        "CreatePermission/ChannelBind requests refused by the peer address policy (403).";
    MALFORMED: Counter "tern_turn_malformed_messages_total" []
        "STUN messages dropped as malformed (framing, FINGERPRINT, attributes).";
    UNKNOWN_ATTRIBUTES: Counter "tern_turn_unknown_attribute_requests_total" []
        "Requests answered 420 for an unknown comprehension-required attribute.";
    BINDINGS: Counter "tern_stun_bindings_total" []
        "STUN Binding requests answered with the client's address.";
    SEND_INDICATIONS: Counter "tern_turn_send_indications_total" ["result"]
        "Send indications from clients, forwarded or dropped (no allocation or permission).";
    ALLOCATIONS: Gauge "tern_turn_allocations" ["transport", "family"]
        "Live allocations by client transport and relayed address family (dual: IPv4 and IPv6).";
    ALLOCATIONS_CREATED: Counter "tern_turn_allocations_created_total" []
        "Allocations created.";
    ALLOCATIONS_ENDED: Counter "tern_turn_allocations_ended_total" ["reason"]
        "Allocations ended: expired, or deleted (Refresh with lifetime 0, TCP connection closed).";
    ALLOCATION_LIFETIME: Histogram "tern_turn_allocation_lifetime_seconds" []
        "How long ended allocations lived.";
    PERMISSIONS: Gauge "tern_turn_permissions" ["transport", "family"]
        "Live permissions by client transport and peer address family.";
    PERMISSIONS_CREATED: Counter "tern_turn_permissions_created_total" []
        "Permissions installed (refreshes of a live permission not counted).";
    CHANNELS: Gauge "tern_turn_channels" ["transport", "family"]
        "Live channel bindings by client transport and peer address family.";
    CHANNELS_CREATED: Counter "tern_turn_channels_created_total" []
        "Channel bindings created.";
    RESERVATIONS_CREATED: Counter "tern_turn_reservations_created_total" []
        "Relay ports reserved by EVEN-PORT with the R bit.";
    RELAY_PORTS_IN_USE: Gauge "tern_turn_relay_ports_in_use" ["family"]
        "Relay ports taken (allocated or reserved), summed over the relay addresses of a family.";
    RELAY_PORTS_FREE: Gauge "tern_turn_relay_ports_free" ["family"]
        "Relay ports free, summed over the relay addresses of a family.";
    TCP_ALLOCATIONS: Gauge "tern_turn_tcp_allocations" []
        "Live RFC 6062 TCP allocations (also counted in tern_turn_allocations).";
    TCP_CONNECTS: Counter "tern_turn_tcp_connects_total" ["result"]
        "RFC 6062 Connect requests: ok, failed (447), timeout (447 after 30 s), refused.";
    TCP_PEER_INCOMING: Counter "tern_turn_tcp_peer_connections_incoming_total" ["result"]
        "Peer connections to TCP relays: attempt_sent, no_permission, over_limit.";
    TCP_BINDS: Counter "tern_turn_tcp_connection_binds_total" ["result"]
        "RFC 6062 ConnectionBinds: ok, rejected, expired (none within 30 s).";
    TCP_PEER_CONNECTIONS: Gauge "tern_turn_tcp_peer_connections" ["state"]
        "Live RFC 6062 peer connections by state: connecting, pending, bound.";
}

/// The TURN face's collector (present when TURN runs).
pub(super) fn collector(src: TurnStatsSource) -> Face<TurnStatsSource> {
    Face::new(RELAY.iter().chain(FASTPATH).chain(TURN), src, read)
}

fn read(src: &TurnStatsSource, f: &mut Families) {
    let net = src.net();
    let t = src.turn();
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
        ("gro_overflow", net.drop_gro_overflow),
        ("bandwidth", net.drop_bandwidth),
        ("user_bandwidth", net.drop_user_bandwidth),
        ("invalid", net.drop_invalid),
    ] {
        f.sample(&RELAY_DROPPED, &[reason], v);
    }
    f.sample(&RELAY_GRO_BUFFERS, &[], net.gro_buffers);
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
    let mode = crate::fastpath::effective();
    for e in crate::fastpath::Effective::ALL {
        f.sample(&FASTPATH_MODE, &[e.label()], u64::from(e == mode));
    }
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
        if let Some(p) = src.relay_ports(fi == 1) {
            f.sample(&RELAY_PORTS_IN_USE, &[fam], p.in_use as u64);
            f.sample(&RELAY_PORTS_FREE, &[fam], p.free as u64);
        }
    }
}
