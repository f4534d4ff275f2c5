//! Per-worker data-path counters: plain integers owned by one worker thread, published
//! once a second as a snapshot and summed by whoever reads them (metrics, tests).

use std::ops::AddAssign;

use crate::turn::TurnStats;

/// What one worker publishes: its data-path counters and its TURN shard's counters.
#[derive(Clone, Debug, Default)]
pub struct WorkerStats {
    pub net: NetStats,
    pub turn: TurnStats,
}

/// Packets and bytes relayed, by direction and client transport, and drops by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub client_to_peer_udp_packets: u64,
    pub client_to_peer_udp_bytes: u64,
    pub client_to_peer_tcp_packets: u64,
    pub client_to_peer_tcp_bytes: u64,
    pub peer_to_client_udp_packets: u64,
    pub peer_to_client_udp_bytes: u64,
    pub peer_to_client_tcp_packets: u64,
    pub peer_to_client_tcp_bytes: u64,
    /// ChannelData for a channel the client has not bound (RFC 8656 §12.4).
    pub drop_no_channel: u64,
    /// Peer data without a permission for the peer (RFC 8656 §9).
    pub drop_no_permission: u64,
    /// Peer data for a TCP client whose write queue is full.
    pub drop_tcp_queue_full: u64,
    /// Datagrams the kernel refused to send (full buffer, unreachable).
    pub drop_send_error: u64,
    /// Datagrams larger than the receive slot.
    pub drop_truncated: u64,
    /// Client input that is neither STUN nor ChannelData.
    pub drop_invalid: u64,
    /// TCP connections closed for garbage or oversized frames.
    pub tcp_closed_garbage: u64,
    /// TCP connections closed because no message completed within the idle timeout.
    pub tcp_closed_idle: u64,
    /// TCP connections refused because their source IP had tcp_max_per_ip open already.
    pub tcp_rejected_per_ip: u64,
    /// TCP connections closed because control responses could not be queued.
    pub tcp_closed_backlog: u64,
    /// TCP connections accepted (TLS included).
    pub tcp_accepted: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS connections closed for a protocol error (plain text on a TLS port, a bad or
    /// truncated record, a failed handshake).
    pub tls_closed_error: u64,
    /// TLS connections closed because the handshake did not finish within
    /// tls.handshake_timeout_secs.
    pub tls_closed_handshake_timeout: u64,
}

impl AddAssign for NetStats {
    fn add_assign(&mut self, o: NetStats) {
        self.client_to_peer_udp_packets += o.client_to_peer_udp_packets;
        self.client_to_peer_udp_bytes += o.client_to_peer_udp_bytes;
        self.client_to_peer_tcp_packets += o.client_to_peer_tcp_packets;
        self.client_to_peer_tcp_bytes += o.client_to_peer_tcp_bytes;
        self.peer_to_client_udp_packets += o.peer_to_client_udp_packets;
        self.peer_to_client_udp_bytes += o.peer_to_client_udp_bytes;
        self.peer_to_client_tcp_packets += o.peer_to_client_tcp_packets;
        self.peer_to_client_tcp_bytes += o.peer_to_client_tcp_bytes;
        self.drop_no_channel += o.drop_no_channel;
        self.drop_no_permission += o.drop_no_permission;
        self.drop_tcp_queue_full += o.drop_tcp_queue_full;
        self.drop_send_error += o.drop_send_error;
        self.drop_truncated += o.drop_truncated;
        self.drop_invalid += o.drop_invalid;
        self.tcp_closed_garbage += o.tcp_closed_garbage;
        self.tcp_closed_idle += o.tcp_closed_idle;
        self.tcp_rejected_per_ip += o.tcp_rejected_per_ip;
        self.tcp_closed_backlog += o.tcp_closed_backlog;
        self.tcp_accepted += o.tcp_accepted;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_closed_error += o.tls_closed_error;
        self.tls_closed_handshake_timeout += o.tls_closed_handshake_timeout;
    }
}
