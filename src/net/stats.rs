//! Per-worker data-path counters: plain integers owned by one worker thread, published
//! once a second as a snapshot and summed by whoever reads them (metrics, tests).

use std::net::IpAddr;
use std::ops::AddAssign;
use std::sync::{Arc, Mutex};

use crate::turn::{Shared, TurnStats};

/// Relay ports of one address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortUse {
    pub in_use: usize,
    pub free: usize,
}

/// Read access to every worker's published counters, for the metrics face: cheap to
/// clone, sums at each call (a short lock per worker, never on the data path).
#[derive(Clone)]
pub struct TurnStatsSource {
    pub(super) workers: Vec<Arc<Mutex<WorkerStats>>>,
    pub(super) shared: Option<Arc<Shared>>,
    pub(super) relay_ips: Vec<IpAddr>,
}

impl TurnStatsSource {
    /// Data-path counters summed over workers.
    pub fn net(&self) -> NetStats {
        let mut sum = NetStats::default();
        for w in &self.workers {
            sum += w.lock().unwrap_or_else(|p| p.into_inner()).net;
        }
        sum
    }

    /// The TURN core's counters summed over the shards.
    pub fn turn(&self) -> TurnStats {
        let mut sum = TurnStats::default();
        for w in &self.workers {
            sum.add(&w.lock().unwrap_or_else(|p| p.into_inner()).turn);
        }
        sum
    }

    /// Relay ports of the IPv6 (`v6`) or IPv4 relay addresses; `None` without any.
    pub fn relay_ports(&self, v6: bool) -> Option<PortUse> {
        let shared = self.shared.as_ref()?;
        let mut ips: Vec<IpAddr> = self
            .relay_ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == v6)
            .collect();
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            return None;
        }
        let cap = shared.ports.capacity();
        let mut u = PortUse::default();
        for ip in ips {
            let used = shared.ports.used(ip).min(cap);
            u.in_use += used;
            u.free += cap - used;
        }
        Some(u)
    }
}

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
    pub client_to_peer_tls_packets: u64,
    pub client_to_peer_tls_bytes: u64,
    pub peer_to_client_tls_packets: u64,
    pub peer_to_client_tls_bytes: u64,
    /// ChannelData for a channel the client has not bound (RFC 8656 §12.4).
    pub drop_no_channel: u64,
    /// Peer data without a permission for the peer (RFC 8656 §9).
    pub drop_no_permission: u64,
    /// Peer data for a TCP client whose write queue is full.
    pub drop_tcp_queue_full: u64,
    /// Datagrams the kernel refused to send (full buffer, unreachable).
    pub drop_send_error: u64,
    /// Datagrams larger than the receive slot, or too large for a Data indication.
    pub drop_truncated: u64,
    /// Datagrams of a received UDP GRO buffer that found no room in the receive batch
    /// (more segments than a buffer can hold, or more head and tail room asked than the
    /// spill area has): `net::mmsg`.
    pub drop_gro_overflow: u64,
    /// Datagrams over their relayed address's `turn.max_bytes_per_sec`, either direction.
    pub drop_bandwidth: u64,
    /// Datagrams over their user's `turn.user_max_bytes_per_sec` (all of the user's relays
    /// on this node together), either direction.
    pub drop_user_bandwidth: u64,
    /// Client input that is neither STUN nor ChannelData.
    pub drop_invalid: u64,
    /// UDP GRO buffers received (several datagrams coalesced by the kernel) and split back
    /// into datagrams, on listeners and relay sockets.
    pub gro_buffers: u64,
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
    /// RFC 6062 TCP relays: bytes and reads spliced from client data connections to peers.
    pub tcp_relay_client_to_peer_bytes: u64,
    pub tcp_relay_client_to_peer_chunks: u64,
    /// RFC 6062 TCP relays: bytes and reads spliced from peers to client data connections.
    pub tcp_relay_peer_to_client_bytes: u64,
    pub tcp_relay_peer_to_client_chunks: u64,
    /// Peer TCP sockets open now (connecting, waiting for ConnectionBind, or spliced): a gauge.
    pub tcp_relay_peer_sockets: u64,
    /// Outgoing peer connects (RFC 6062 §5.2 Connect) that failed or timed out.
    pub tcp_relay_connect_failures: u64,
    /// Times a spliced data connection stopped at its relayed address's
    /// `turn.max_bytes_per_sec` budget (it waits; no byte is dropped).
    pub tcp_relay_throttled: u64,
    /// Client connections handed to the worker owning their CONNECTION-ID (ConnectionBind
    /// arriving on another worker, RFC 6062 §5.4).
    pub tcp_handovers: u64,
    /// Kernel fast path (`crate::fastpath`): datagrams and payload bytes it forwarded,
    /// already included in the `*_udp_*` counters above.
    pub fastpath_to_peer_packets: u64,
    pub fastpath_to_peer_bytes: u64,
    pub fastpath_to_client_packets: u64,
    pub fastpath_to_client_bytes: u64,
    /// Channel bindings in the fast path's maps now: a gauge.
    pub fastpath_bindings: u64,
    /// Bindings the maps refused (full): relayed in user space instead.
    pub fastpath_map_full: u64,
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
        self.client_to_peer_tls_packets += o.client_to_peer_tls_packets;
        self.client_to_peer_tls_bytes += o.client_to_peer_tls_bytes;
        self.peer_to_client_tls_packets += o.peer_to_client_tls_packets;
        self.peer_to_client_tls_bytes += o.peer_to_client_tls_bytes;
        self.drop_no_channel += o.drop_no_channel;
        self.drop_no_permission += o.drop_no_permission;
        self.drop_tcp_queue_full += o.drop_tcp_queue_full;
        self.drop_send_error += o.drop_send_error;
        self.drop_truncated += o.drop_truncated;
        self.drop_gro_overflow += o.drop_gro_overflow;
        self.drop_bandwidth += o.drop_bandwidth;
        self.drop_user_bandwidth += o.drop_user_bandwidth;
        self.drop_invalid += o.drop_invalid;
        self.gro_buffers += o.gro_buffers;
        self.tcp_closed_garbage += o.tcp_closed_garbage;
        self.tcp_closed_idle += o.tcp_closed_idle;
        self.tcp_rejected_per_ip += o.tcp_rejected_per_ip;
        self.tcp_closed_backlog += o.tcp_closed_backlog;
        self.tcp_accepted += o.tcp_accepted;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_closed_error += o.tls_closed_error;
        self.tls_closed_handshake_timeout += o.tls_closed_handshake_timeout;
        self.tcp_relay_client_to_peer_bytes += o.tcp_relay_client_to_peer_bytes;
        self.tcp_relay_client_to_peer_chunks += o.tcp_relay_client_to_peer_chunks;
        self.tcp_relay_peer_to_client_bytes += o.tcp_relay_peer_to_client_bytes;
        self.tcp_relay_peer_to_client_chunks += o.tcp_relay_peer_to_client_chunks;
        self.tcp_relay_peer_sockets += o.tcp_relay_peer_sockets;
        self.tcp_relay_connect_failures += o.tcp_relay_connect_failures;
        self.tcp_relay_throttled += o.tcp_relay_throttled;
        self.tcp_handovers += o.tcp_handovers;
        self.fastpath_to_peer_packets += o.fastpath_to_peer_packets;
        self.fastpath_to_peer_bytes += o.fastpath_to_peer_bytes;
        self.fastpath_to_client_packets += o.fastpath_to_client_packets;
        self.fastpath_to_client_bytes += o.fastpath_to_client_bytes;
        self.fastpath_bindings += o.fastpath_bindings;
        self.fastpath_map_full += o.fastpath_map_full;
    }
}
