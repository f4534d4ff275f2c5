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
/// reuses a number). Named for what it is so it is not read as TURN's RFC 6062
/// CONNECTION-ID (`crate::turn::ConnId`), which once shared its name.
pub type WsId = u64;

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
    /// Cluster mode: publish an event or resync a node through the cluster driver.
    Bus(bus::BusCmd),
}
