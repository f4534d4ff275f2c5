//! Signaling: the native room service (`/ws`) and the PeerJS-compatible server, each a
//! sans-IO state machine ([`rooms::RoomService`], [`peerjs::PeerJsService`]) plus a thin
//! driver ([`driver`]) over Tern's own RFC 6455 framing ([`ws`]).
//!
//! Owns peer ids, rooms, LAN grouping, message routing, heartbeats and relay grants.
//! It must not carry media or relay data (that is `relay_ws`), mint TURN credentials
//! (that is `api`), or trust anything a client says about who it is.

pub mod bus;
pub mod client_ip;
pub mod driver;
pub mod names;
pub mod peerjs;
pub mod protocol;

pub mod rooms;
pub mod ws;

/// Gives a map's memory back once it holds a quarter of its capacity (after a crowd of
/// peers or queued messages is gone); amortized O(1) since it halves at most per shrink.
pub(crate) fn shrink_map<K: Eq + std::hash::Hash, V>(m: &mut std::collections::HashMap<K, V>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// One signaling WebSocket, numbered by the driver (`driver::Hub` counts from 1 and never
/// reuses a number). Its own type so it cannot be confused with TURN's RFC 6062
/// CONNECTION-ID (`crate::turn::ConnId`, which once shared its name) or with a count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WsId(u64);

impl WsId {
    /// The driver's `n`-th connection (`driver::Hub` hands the numbers out; tests and the
    /// fuzz harness number their own).
    pub const fn new(n: u64) -> WsId {
        WsId(n)
    }
}

/// Test shorthand for a connection number.
#[cfg(test)]
pub(crate) const fn ws_id(n: u64) -> WsId {
    WsId(n)
}

impl std::fmt::Display for WsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An outgoing text frame: serialized once, shared by every recipient (a broadcast clones
/// a reference count, not the text) and handed to the socket without another copy.
pub type Text = axum::extract::ws::Utf8Bytes;

/// What a state machine asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Send a JSON text frame.
    Send { conn: WsId, text: Text },
    /// Send a WebSocket ping (browsers answer it without application code).
    Ping { conn: WsId },
    /// Close the connection with this WebSocket close code (RFC 6455 §7.4).
    Close {
        conn: WsId,
        code: u16,
        reason: &'static str,
    },
    /// Register a relay session and hand each side its ticket.
    Relay(rooms::RelayGrant),
    /// End the relay session of `ticket` if that side never connected (its ticket could
    /// not be delivered): a side already waiting is closed with `reason` at once
    /// (`crate::relay_ws::RelayHub::cancel`).
    CancelRelay {
        ticket: String,
        reason: &'static str,
    },
    /// Cluster mode: publish an event or resync a node through the cluster driver.
    Bus(bus::BusCmd),
}
