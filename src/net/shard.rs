//! What a worker needs from its protocol shard: the `turn::Server` API, as a trait so the
//! event loop can also be driven by a small fake in unit tests.

use std::net::SocketAddr;
use std::time::Instant;

use crate::stun::ChannelNumber;
use crate::turn::{
    ChannelRoute, ConnId, FiveTuple, Now, Output, PeerRoute, RelayId, RelayIo, TurnStats,
};

/// Size of the response buffer handed to [`Shard::handle_stun`].
pub const OUT_LEN: usize = 2048;

/// One worker's share of the TURN server state (RFC 8656), see `crate::turn`'s contract.
pub trait Shard {
    /// A STUN message from a client; any response is written into `out` and announced by
    /// `poll_output`.
    fn handle_stun(
        &mut self,
        now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    );
    /// What the shard asks of the worker, in order (drained after every call).
    fn poll_output(&mut self) -> Option<Output>;
    /// Where ChannelData `channel` from `from` goes (RFC 8656 §12.4).
    fn channel_to_peer(
        &mut self,
        from: &FiveTuple,
        channel: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)>;
    /// Where data from `peer` arriving on `relay` goes, if a permission allows it.
    fn peer_to_client(&mut self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute>;
    /// Expires what is due at `now`.
    fn handle_timeout(&mut self, now: Now, io: &mut impl RelayIo);
    /// When `handle_timeout` next needs to run.
    fn poll_timeout(&self) -> Option<Instant>;
    /// A TCP/TLS client connection closed: its allocation goes too (RFC 8656 §3.1).
    fn client_closed(&mut self, client: &FiveTuple, now: Now, io: &mut impl RelayIo);
    /// A reloaded configuration (SIGHUP): new requests see it, existing allocations keep
    /// running. Delivered through the worker's waker, off the data path.
    fn set_config(&mut self, _cfg: std::sync::Arc<crate::turn::ServerConfig>) {}
    /// The core's counters, published beside the worker's own (none for a test fake).
    fn turn_stats(&self) -> Option<&TurnStats> {
        None
    }
    /// How long the worker took to handle one request (for the core's histogram).
    fn record_request_time(&mut self, _took: std::time::Duration) {}
    /// The worker's index, called once at start (top bits of RFC 6062 CONNECTION-IDs).
    fn set_shard_index(&mut self, _index: u8) {}
    /// Whether `tuple` is an allocation's control connection on this shard.
    fn has_allocation(&self, _tuple: &FiveTuple) -> bool {
        false
    }
    /// RFC 6062 §5.2: the connect for `conn` finished; `false`: close the socket.
    fn tcp_connect_done(&mut self, _now: Now, _conn: ConnId, _ok: bool) -> bool {
        false
    }
    /// RFC 6062 §5.3: a peer connected to TCP relay `relay`; `None`: close it.
    fn tcp_peer_accepted(
        &mut self,
        _now: Now,
        _relay: RelayId,
        _peer: SocketAddr,
    ) -> Option<ConnId> {
        None
    }
    /// The driver closed peer connection `conn`.
    fn tcp_conn_closed(&mut self, _conn: ConnId) {}
    /// Changes whenever `channel_routes` may yield a different set (kernel fast path).
    fn channel_routes_generation(&self) -> u64 {
        0
    }
    /// Every established channel binding (active channel, permission alive).
    fn channel_routes(&self, _f: impl FnMut(ChannelRoute)) {}
}
