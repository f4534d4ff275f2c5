//! Sans-IO TURN server (RFC 8656): allocations, permissions, channels, nonces, auth,
//! quotas and peer policy. Takes bytes, the sender and `now`; never touches a socket or clock.
//! It must not spawn threads or tasks, and the per-packet lookups (`channel_to_peer`,
//! `peer_to_client`, Send indications) must not allocate, lock or log.
//!
//! Files: `server.rs` (the [`Server`]: its state, public API and timers; the only
//! `impl Server`), `method/` (one file per request method, as free functions over the
//! state a call borrows, plus `teardown.rs`), `tables.rs` (the allocation slab and every
//! index over it, their only writer), `allocation.rs` (the plain data the tables hold),
//! `request.rs` (typed decoding of request attributes), `timers.rs` (the timer heap),
//! `quota.rs` (allocation quotas per user and in total), `auth.rs` + `nonce.rs`
//! (credentials), `ports.rs` (relay port pool), `policy.rs` (peer addresses),
//! `ratelimit.rs`, `stats.rs`, `server_config.rs`, `alternates.rs` (300 Try Alternate
//! targets), `usage_tap.rs` (usage records and byte budgets, `crate::usage`),
//! `cluster_hook.rs` (cluster mode's quota snapshot and registry alternates); tests in
//! `tests/`. Imports go one way: `server.rs` → `method/` → `tables.rs`, `request.rs`,
//! `timers.rs`, `allocation.rs`; nothing imports `server.rs` back.
//!
//! # Contract with the IO driver (`crate::net`)
//! One [`Server`] per worker shard. The driver calls in with what happened and takes
//! what to do out of ONE queue, [`Server::poll_output`], which it drains after every call
//! (str0m / quinn-proto style):
//! - every STUN message from a client goes to `Server::handle_stun`, which writes any
//!   answer into the caller's buffer and queues it as [`Output::Reply`] (or
//!   [`Output::Forward`] for a Send indication, [`Output::BindData`] for an RFC 6062
//!   ConnectionBind);
//! - ChannelData from a client: `Server::channel_to_peer` (O(1), allocation-free, no
//!   output: the driver sends the payload itself);
//! - a datagram arriving on a relay socket: `Server::peer_to_client` (likewise);
//! - `Server::handle_timeout` when `Server::poll_timeout` is due;
//! - `Server::client_closed` when a TCP/TLS client connection closes;
//! - RFC 6062: connects finishing (`Server::tcp_connect_done`), peers accepted on a TCP
//!   relay listener (`Server::tcp_peer_accepted`), peer connections it closed
//!   (`Server::tcp_conn_closed`).
//!
//! What the core asks of the driver — answers, messages for other connections
//! ([`Output::Send`]), relay sockets and peer connections to close — is all in that
//! queue. The exception is [`RelayIo`], called synchronously during a request: opening a
//! relay socket (the port must be bound before the success answer names it; the port
//! numbers come from the core's shared pool), starting an RFC 6062 peer connect (a
//! connect that cannot start is answered 447 in the same response), and reading a relay's
//! counters (`RelayIo::usage`, no effect).

mod allocation;
pub mod alternates;
pub mod auth;
pub mod cluster_hook;
mod method;
pub mod nonce;
pub mod policy;
pub mod ports;
mod quota;
pub mod ratelimit;
mod request;
mod server;
mod server_config;
pub mod stats;
mod tables;
#[cfg(test)]
mod tests;
mod timers;
mod usage_tap;

pub use quota::QuotaError;
pub use server::Server;
pub use server_config::{RelayAddr, ServerConfig, Shared};
pub use stats::TurnStats;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use crate::stun::ChannelNumber;

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

/// What the core asks its driver to do, taken from [`Server::poll_output`] in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The answer to the STUN message just handled: send `out[..len]` (the buffer given to
    /// `handle_stun`) back to the client on the same 5-tuple.
    Reply { len: usize },
    /// The Send indication just handled (RFC 8656 §10.2): send `msg[payload]` from relay
    /// socket `relay` to `peer`.
    Forward {
        relay: RelayId,
        peer: SocketAddr,
        payload: Range<usize>,
    },
    /// The ConnectionBind just handled succeeded (RFC 6062 §5.4): send `out[..len]` on
    /// this TCP/TLS connection; from then on it is the client data connection of peer
    /// connection `conn`, carrying raw bytes both ways (no more STUN framing).
    BindData { conn: ConnId, len: usize },
    /// A message made outside a request — a Connect's deferred answer, a
    /// ConnectionAttempt indication, a 447 (RFC 6062 §5.2, §5.3) — for control connection
    /// `to`.
    Send { to: FiveTuple, msg: Vec<u8> },
    /// Close relay socket or TCP relay listener `relay` (its allocation or family ended).
    CloseRelay(RelayId),
    /// Close RFC 6062 peer connection `conn` in whatever state it is (connecting, waiting
    /// for ConnectionBind, or bound: then its client data connection closes too). Not
    /// asked for a connection the driver reported closed (`Server::tcp_conn_closed`).
    ClosePeerConn(ConnId),
}

/// CONNECTION-ID of an RFC 6062 peer data connection (§6.2.1). Unique across shards: the
/// top 8 bits are the index of the shard that owns the allocation ([`ConnId::shard`]).
/// Its own type so it cannot be mixed up with a table slot, a relay index or the
/// signaling face's connection numbers (`crate::signal::WsId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u32);

impl ConnId {
    /// The id a CONNECTION-ID attribute carries (RFC 6062 §6.2.1). Any value is a
    /// syntactically valid id; whether it names a live connection is the core's question.
    pub const fn from_wire(v: u32) -> ConnId {
        ConnId(v)
    }

    /// The 32-bit value for the CONNECTION-ID attribute.
    pub const fn to_wire(self) -> u32 {
        self.0
    }

    /// The id of shard `shard`'s connection `counter` (the low 24 bits).
    pub(crate) const fn new(shard: u8, counter: u32) -> ConnId {
        ConnId(((shard as u32) << 24) | (counter & 0x00FF_FFFF))
    }

    /// The shard (worker index) owning this peer connection: where a ConnectionBind for
    /// it must be handled (RFC 6062 §5.4).
    pub const fn shard(self) -> usize {
        conn_shard(self.0)
    }
}

/// The shard owning the peer connection whose CONNECTION-ID attribute value is `wire`
/// (what the TCP driver routes a ConnectionBind by before any core has read it).
pub const fn conn_shard(wire: u32) -> usize {
    (wire >> 24) as usize
}

/// Where peer data arriving on a relay socket goes (RFC 8656 §11.6, §12.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    pub client: FiveTuple,
    /// Bound channel for this peer: frame as ChannelData; `None`: send a Data indication.
    pub channel: Option<ChannelNumber>,
}

/// An established channel binding (RFC 8656 §12): ChannelData `channel` from `client`
/// goes to `peer` through relay `relay`, and data from `peer` on `relay` comes back as
/// ChannelData `channel`. What the kernel fast path (`crate::fastpath`) may offload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelRoute {
    pub client: FiveTuple,
    pub channel: ChannelNumber,
    pub relay: RelayId,
    pub peer: SocketAddr,
}

/// What the core does synchronously during a request, implemented by the IO driver (a
/// fake in unit tests): opening relay sockets and starting peer connects, whose outcome
/// the answer depends on, and reading a relay's counters. Everything else the driver does
/// for the core comes out of [`Server::poll_output`].
pub trait RelayIo {
    /// Opens a UDP relay socket bound to exactly `addr`. `AddrInUse` makes the core try
    /// another port from its pool.
    fn open_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId>;
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
    /// What the relay socket carried so far (read just before it is closed, for the
    /// allocation's log line and usage report). Drivers that do not count return zeros.
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
