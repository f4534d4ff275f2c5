//! Sans-IO TURN server (RFC 8656): allocations, permissions, channels, nonces, auth,
//! quotas and peer policy. Takes bytes, the sender and `now`; never touches a socket or clock.
//! It must not spawn threads or tasks, and the per-packet lookups (`channel_to_peer`,
//! `peer_to_client`, Send indications) must not allocate, lock or log.
//!
//! Files: `tables.rs` (the allocation slab and every index over it, their only writer),
//! `allocation.rs` (the plain data the tables hold), `request.rs` (typed decoding of
//! request attributes), `server.rs` (timers, expiry, deletion, the per-packet lookups),
//! `requests.rs` (authentication and the RFC 8656 methods), `tcp_relay.rs` (RFC 6062:
//! Connect, ConnectionBind, ConnectionAttempt), `reply.rs` (writing and counting answers),
//! `auth.rs` + `nonce.rs` (credentials), `ports.rs` (relay port pool), `policy.rs` (peer
//! addresses), `ratelimit.rs`, `stats.rs`, `server_config.rs`, `alternates.rs` (300 Try
//! Alternate targets), `usage_tap.rs` (usage records and byte budgets, `crate::usage`),
//! `cluster_hook.rs` (cluster mode's quota snapshot and registry alternates); tests in
//! `tests/`.
//!
//! `impl Server` still continues in `requests.rs`, `tcp_relay.rs` and `reply.rs`, which
//! import each other through it (issue 13: one way out, `poll_output`, is not done yet).
//! `tables.rs`, `request.rs` and `allocation.rs` import none of them.
//!
//! # Contract with the IO driver (`crate::net`)
//! One [`Server`] per worker shard. The driver:
//! - passes every STUN message from a client to `Server::handle_stun`, which writes any
//!   response into the caller's buffer and returns an [`Action`];
//! - for ChannelData from a client calls `Server::channel_to_peer` (O(1), allocation-free);
//! - for a datagram arriving on a relay socket calls `Server::peer_to_client`;
//! - calls `Server::handle_timeout` when `Server::poll_timeout` is due;
//! - calls `Server::client_closed` when a TCP/TLS client connection closes;
//! - may count each relay socket's traffic and report it through `RelayIo::usage`;
//! - for RFC 6062 TCP allocations: reports connects finishing (`Server::tcp_connect_done`),
//!   peers accepted on a TCP relay listener (`Server::tcp_peer_accepted`) and peer
//!   connections it closed (`Server::tcp_conn_closed`), splices the bound pair after
//!   `Action::BindData`, and after every call sends what `Server::drain_outbox` yields.
//!
//! Relay sockets are opened and closed through the [`RelayIo`] trait the driver implements;
//! the port numbers are chosen by the core's shared port pool.

mod allocation;
pub mod alternates;
pub mod auth;
pub mod cluster_hook;
pub mod nonce;
pub mod policy;
pub mod ports;
pub mod ratelimit;
mod reply;
mod request;
mod requests;
mod server;
mod server_config;
pub mod stats;
mod tables;
mod tcp_relay;
#[cfg(test)]
mod tests;
mod usage_tap;

pub use server::Server;
pub use server_config::{QuotaError, RelayAddr, ServerConfig, Shared};
pub use stats::TurnStats;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

/// Transport between client and server (RFC 8656 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// The client's 5-tuple (RFC 8656 §2): identifies an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    /// The client's address as seen by the server.
    pub client: SocketAddr,
    /// The server's listening address the client reached.
    pub server: SocketAddr,
}

/// Handle of a relay socket owned by the IO driver: an index into the driver's own
/// relay table. The core only stores and compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayId(u32);

impl RelayId {
    /// The driver's handle for its relay table slot `index`.
    pub const fn from_index(index: usize) -> RelayId {
        RelayId(index as u32)
    }

    /// The driver's relay table slot.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// The time as the driver sees it: monotonic for lifetimes, Unix seconds for REST
/// credential expiry. Tests simulate both.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix_secs: u64,
}

/// What the driver does after `Server::handle_stun`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send (an indication consumed, a response ignored, or input dropped and counted).
    None,
    /// Send `out[..len]` back to the client on the same 5-tuple.
    Reply(usize),
    /// A Send indication: send `msg[payload]` from relay socket `relay` to `peer`.
    Forward {
        relay: RelayId,
        peer: SocketAddr,
        payload: Range<usize>,
    },
    /// A ConnectionBind succeeded (RFC 6062 §5.4): send `out[..len]` on this TCP/TLS
    /// connection; from then on it is the client data connection of peer connection
    /// `conn`, carrying raw bytes both ways (no more STUN framing).
    BindData { conn: ConnId, len: usize },
}

/// CONNECTION-ID of an RFC 6062 peer data connection (§6.2.1). Unique across shards: the
/// top 8 bits are the index of the shard that owns the allocation ([`conn_shard`]).
pub type ConnId = u32;

/// The shard (worker index) owning peer connection `id`: where a ConnectionBind for it
/// must be handled (RFC 6062 §5.4).
pub const fn conn_shard(id: ConnId) -> usize {
    (id >> 24) as usize
}

/// Where peer data arriving on a relay socket goes (RFC 8656 §11.6, §12.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    pub client: FiveTuple,
    /// Bound channel for this peer: frame as ChannelData; `None`: send a Data indication.
    pub channel: Option<u16>,
}

/// Relay sockets, implemented by the IO driver (a fake in unit tests).
pub trait RelayIo {
    /// Opens a UDP relay socket bound to exactly `addr`. `AddrInUse` makes the core try
    /// another port from its pool.
    fn open_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId>;
    /// Closes a relay socket or TCP relay listener (allocation deleted or expired).
    fn close_relay(&mut self, relay: RelayId);
    /// Opens a TCP relay listener bound to exactly `addr` for an RFC 6062 TCP allocation
    /// (§5.1), accepting peer connections (reported through `Server::tcp_peer_accepted`).
    /// Must let outgoing connections bind the same address (§5.2). `AddrInUse` makes the
    /// core try another port.
    fn open_tcp_relay(&mut self, _addr: SocketAddr) -> std::io::Result<RelayId> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Starts a non-blocking TCP connect to `peer` from the address of TCP relay `relay`
    /// (RFC 6062 §5.2); the outcome comes back through `Server::tcp_connect_done(conn, ..)`.
    /// `Err` means it could not even start (the core answers 447).
    fn tcp_connect(
        &mut self,
        _relay: RelayId,
        _peer: SocketAddr,
        _conn: ConnId,
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Closes peer connection `conn` in whatever state it is (connecting, waiting for
    /// ConnectionBind, or bound: then its client data connection closes too). Not called
    /// for a connection the driver reported closed through `Server::tcp_conn_closed`.
    fn close_tcp_conn(&mut self, _conn: ConnId) {}
    /// What the relay socket carried so far (read just before it is closed, for the
    /// allocation's log line). Drivers that do not count return zeros.
    fn usage(&self, _relay: RelayId) -> RelayUsage {
        RelayUsage::default()
    }
    /// Makes UDP relay `relay` share `cap` (`turn.user_max_bytes_per_sec`) with its user's
    /// other relays. Drivers without the cap ignore it.
    fn set_user_cap(&mut self, _relay: RelayId, _cap: std::sync::Arc<crate::usage::UserCap>) {}
}

/// Application data a relay socket carried, counted by the IO driver on its data path
/// (payload bytes, without TURN framing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayUsage {
    pub to_peer_bytes: u64,
    pub to_peer_packets: u64,
    pub to_client_bytes: u64,
    pub to_client_packets: u64,
}

impl std::ops::AddAssign for RelayUsage {
    fn add_assign(&mut self, o: RelayUsage) {
        self.to_peer_bytes += o.to_peer_bytes;
        self.to_peer_packets += o.to_peer_packets;
        self.to_client_bytes += o.to_client_bytes;
        self.to_client_packets += o.to_client_packets;
    }
}
