//! RFC 6062 TCP allocations: Connect, ConnectionAttempt, ConnectionBind and the peer
//! connection table with its 30-second timers. The bytes of a bound pair never pass
//! through here: the IO driver splices them.

use std::net::SocketAddr;

use super::server::Server;
use super::{ConnId, FiveTuple, Now, RelayId};

impl Server {
    /// Sets the index of this shard's worker; it becomes the top 8 bits of every
    /// CONNECTION-ID this shard hands out (see [`super::conn_shard`]).
    pub fn set_shard_index(&mut self, index: u8) {
        self.shard_index = index;
    }

    /// Whether `tuple` is the control connection of an allocation on this shard.
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.by_tuple.contains_key(tuple)
    }

    /// The driver's connect for peer connection `conn` finished (RFC 6062 §5.2): on
    /// success the Connect success response (with CONNECTION-ID) is queued in the outbox
    /// and the 30 s ConnectionBind timer starts; on failure a 447 response is queued and
    /// the core forgets `conn`. Returns whether the driver keeps the socket (`false`:
    /// close it, e.g. the allocation went meanwhile or `ok` was false).
    pub fn tcp_connect_done(&mut self, _now: Now, _conn: ConnId, _ok: bool) -> bool {
        false
    }

    /// A peer connected to TCP relay listener `relay` (RFC 6062 §5.3). `Some(conn)`: keep
    /// the socket without reading from it until it is bound; a ConnectionAttempt
    /// indication is queued in the outbox. `None`: no permission or over the limit, close it.
    pub fn tcp_peer_accepted(
        &mut self,
        _now: Now,
        _relay: RelayId,
        _peer: SocketAddr,
    ) -> Option<ConnId> {
        None
    }

    /// The driver closed peer connection `conn` (either side of a bound pair ended, or a
    /// peer waiting for its ConnectionBind hung up).
    pub fn tcp_conn_closed(&mut self, _conn: ConnId) {}

    /// Messages for clients produced outside a request: Connect responses, ConnectionAttempt
    /// indications and 447 timeouts (RFC 6062 §5.2, §5.3). Each goes on control connection
    /// `tuple`; the driver calls this after every call into the core.
    pub fn drain_outbox(&mut self, mut f: impl FnMut(&FiveTuple, &[u8])) {
        for (t, m) in self.outbox.drain(..) {
            f(&t, &m);
        }
    }
}
