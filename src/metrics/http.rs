//! The HTTP face's scrape-time metrics: signaling (native and PeerJS), the WebSocket
//! relay, and the API listener's connection counters ([`crate::api::http_metrics`], which
//! also holds the per-route request metrics that register themselves).

use super::collect::{Face, Families};
use crate::api::http_metrics::{
    HttpMetrics, DEFS as HTTP, HTTP_CONNECTIONS, HTTP_CONNECTIONS_ACCEPTED,
    HTTP_CONNECTIONS_CLOSED, HTTP_CONNECTIONS_REFUSED,
};
use crate::api::HttpStatsSource;
use crate::metrics_def::metric_table;
use crate::signal::{peerjs, rooms};

// Signaling: native rooms (/ws) and PeerJS.
metric_table! { pub SIGNAL;
    SIGNAL_CONNECTIONS: Gauge "tern_signal_connections" ["protocol"]
        "Open signaling WebSockets: native (/ws) and PeerJS.";
    SIGNAL_ROOMS: Gauge "tern_signal_rooms" []
        "Native signaling rooms with at least one member (named rooms and LAN groups).";
    SIGNAL_MESSAGES: Counter "tern_signal_messages_total" ["protocol", "type"]
        "Signaling messages received past the rate limit, by protocol and type (invalid: unparsable, unknown or too large).";
    SIGNAL_FORWARDED: Counter "tern_signal_forwarded_total" ["protocol"]
        "Signaling messages delivered to another peer.";
    SIGNAL_RATE_LIMITED: Counter "tern_signal_rate_limited_total" ["protocol"]
        "Signaling messages refused by the per-connection rate limit.";
    SIGNAL_REFUSED: Counter "tern_signal_refused_total" ["protocol", "reason"]
        "Signaling messages not carried out, by protocol and reason (each one told to its sender).";
    SIGNAL_LIMIT_CLOSED: Counter "tern_signal_limit_closed_total" ["protocol", "reason"]
        "Signaling connections closed for breaking a limit: native flood (1008); PeerJS rate_limit (1008), too_large (1009).";
    PEERJS_QUEUED_BYTES: Gauge "tern_peerjs_queued_bytes" []
        "Bytes held in queues for absent PeerJS peers.";
    SIGNAL_SLOW_CLOSED: Counter "tern_signal_slow_closed_total" ["protocol"]
        "Signaling connections closed (1008) because their queued outgoing bytes or frames went over the send budget.";
    PEERJS_CLIENTS: Gauge "tern_peerjs_clients" []
        "Registered PeerJS clients.";
    PEERJS_QUEUE_DROPPED: Counter "tern_peerjs_queued_dropped_total" []
        "PeerJS messages for absent peers dropped because the queue was full.";
    PEERJS_EXPIRED: Counter "tern_peerjs_expired_total" []
        "PeerJS messages for absent peers that expired (EXPIRE sent back).";
}

// The WebSocket data relay (/relay).
metric_table! { pub RELAY_WS;
    WS_RELAY_SESSIONS: Gauge "tern_ws_relay_sessions" []
        "WebSocket relay sessions granted and not yet finished.";
    WS_RELAY_SESSIONS_STARTED: Counter "tern_ws_relay_sessions_started_total" []
        "WebSocket relay sessions granted.";
    WS_RELAY_BYTES: Counter "tern_ws_relay_bytes_total" []
        "Payload bytes delivered through the WebSocket relay (both directions).";
    WS_RELAY_FRAMES: Counter "tern_ws_relay_frames_total" []
        "Frames delivered through the WebSocket relay (both directions).";
    WS_RELAY_OVERSIZED: Counter "tern_ws_relay_oversized_frames_total" []
        "WebSocket relay connections closed for a frame over relay_ws.max_frame_bytes (1009).";
    WS_RELAY_BAD_TICKETS: Counter "tern_ws_relay_bad_tickets_total" []
        "WebSocket relay connections refused for an unknown, used or expired ticket.";
    WS_RELAY_CANCELLED: Counter "tern_ws_relay_sessions_cancelled_total" []
        "WebSocket relay sessions ended before their second side came, because signaling \
        could not deliver its ticket (cluster mode: the bus refused it); a side already \
        connected is closed with 1013.";
}

/// The HTTP face's collector (present when the API runs); the per-route request metrics
/// are registered from [`HttpMetrics`] itself.
pub(super) fn collector(src: HttpStatsSource) -> Face<HttpStatsSource> {
    let read_here = HTTP.iter().filter(|d| !HttpMetrics::registers(d));
    Face::new(SIGNAL.iter().chain(RELAY_WS).chain(read_here), src, read)
}

fn read(src: &HttpStatsSource, f: &mut Families) {
    let s = src.snapshot();
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
    f.sample(
        &SIGNAL_RATE_LIMITED,
        &["peerjs"],
        s.peerjs.refused[peerjs::R_RATE],
    );
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
    for i in [peerjs::R_RATE, peerjs::R_TOO_LARGE] {
        let r = peerjs::REFUSAL_REASONS[i];
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
    f.sample(&WS_RELAY_CANCELLED, &[], s.relay_sessions_cancelled);
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
}
