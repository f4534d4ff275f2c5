//! One client's allocation (RFC 8656 §2, §5): relayed addresses, lifetime, permissions
//! and channel bindings, and its RFC 6062 peer connections. Plain data; `tables.rs` keeps
//! them and the lookup indexes in step.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::auth::Verified;
use super::{ChannelNumber, ConnId, FiveTuple, RelayId, RelayUsage};

/// A relay socket of an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    pub id: RelayId,
    /// Address the socket is bound to (returned to the port pool on close).
    pub local: SocketAddr,
    /// Address put in XOR-RELAYED-ADDRESS.
    pub advertised: SocketAddr,
}

/// A channel binding (RFC 8656 §12). After it expires it stays here, inactive, for the
/// cooldown: neither its number nor its peer may be bound to anything else meanwhile, so
/// late packets cannot reach the wrong peer.
#[derive(Debug, Clone, Copy)]
pub struct Channel {
    pub number: ChannelNumber,
    pub peer: SocketAddr,
    pub expires: Instant,
    /// In the data-path tables (false during the cooldown).
    pub active: bool,
}

/// How long an expired channel's number and peer stay reserved (RFC 8656 §12: 5 minutes).
pub const CHANNEL_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug)]
pub struct Allocation {
    /// Unique for the life of the server, so a timer for a deleted allocation whose slot
    /// was reused does nothing.
    pub id: u64,
    pub tuple: FiveTuple,
    pub username: String,
    pub quota_user: String,
    /// The credential that created it, still honoured for this allocation's own requests
    /// after a reload removed it (not under `strict_expiry`).
    pub cred: Verified,
    /// `[IPv4, IPv6]` relays (RFC 8656 §7.2 dual allocation).
    pub relays: [Option<Relay>; 2],
    pub expires: Instant,
    /// When the allocation's pending timer entry fires (at or before `expires`).
    pub timer_at: Instant,
    /// Permissions by peer IP; expiry lives in the server's table.
    pub perms: Vec<IpAddr>,
    pub channels: Vec<Channel>,
    /// The Allocate transaction, answered again if retransmitted (RFC 8656 §7.2).
    pub txid: [u8; 12],
    pub lifetime_secs: u32,
    pub reservation_token: Option<u64>,
    /// ADDITIONAL-ADDRESS-FAMILY asked for IPv6 and we have none: ADDRESS-ERROR-CODE 440.
    pub v6_refused: bool,
    /// When the Allocate succeeded (for the lifetime histogram and the log line).
    pub created: Instant,
    /// An RFC 6062 TCP allocation: its relay is a TCP listener, peers are reached with
    /// Connect and ConnectionBind, never with Send indications or channels (§5).
    pub tcp: bool,
    /// Its peer connections in any state (RFC 6062 §5.2, §5.3), at most
    /// `tcp_relay_max_connections`.
    pub conns: Vec<ConnId>,
    /// Usage accounting (`usage_tap`). No index covers it, so the server updates it in
    /// place through a shared reference and the tables stay the only writer of the rest.
    pub usage: Cell<UsageMark>,
}

/// What usage accounting has read of an allocation: the counters of relays already closed
/// (one family of a dual allocation), the total reported so far, and when.
#[derive(Debug, Clone, Copy)]
pub struct UsageMark {
    pub closed: RelayUsage,
    pub sent: RelayUsage,
    pub at: Instant,
}

impl UsageMark {
    pub fn new(now: Instant) -> Self {
        Self {
            closed: RelayUsage::default(),
            sent: RelayUsage::default(),
            at: now,
        }
    }
}

impl Allocation {
    /// The relay that serves peers of `peer`'s family.
    pub fn relay_for(&self, peer: IpAddr) -> Option<Relay> {
        self.relays[family_index(peer)]
    }

    /// Index of the allocation's family in `stats::ALLOCATION_FAMILIES`.
    pub fn family(&self) -> usize {
        allocation_family(&self.relays)
    }
}

/// Where a peer connection is in its life (RFC 6062 §5.2-§5.4).
#[derive(Debug, Clone)]
pub enum ConnState {
    /// The driver is connecting to the peer for a Connect request; the request is answered
    /// when it finishes, signed with the credential that authenticated it.
    Connecting { txid: [u8; 12], cred: Verified },
    /// Connected (or accepted from a peer), waiting for the client's ConnectionBind.
    Pending,
    /// Spliced to the client data connection `data`.
    Bound { data: FiveTuple },
}

impl ConnState {
    /// Index in `stats::TCP_CONN_STATES`.
    pub fn index(&self) -> usize {
        match self {
            ConnState::Connecting { .. } => 0,
            ConnState::Pending => 1,
            ConnState::Bound { .. } => 2,
        }
    }
}

/// One peer connection of a TCP allocation.
#[derive(Debug)]
pub struct PeerConn {
    pub slot: usize,
    /// The owning allocation's id (guards against a reused slot).
    pub alloc_id: u64,
    pub peer: SocketAddr,
    pub state: ConnState,
    /// End of the current state's 30 s wait (meaningless once bound). A timer entry
    /// earlier than this is stale and ignored.
    pub deadline: Instant,
}

/// 0 IPv4, 1 IPv6, 2 both (`stats::ALLOCATION_FAMILIES`).
pub fn allocation_family(relays: &[Option<Relay>; 2]) -> usize {
    match relays {
        [Some(_), Some(_)] => 2,
        [None, Some(_)] => 1,
        _ => 0,
    }
}

/// 0 for IPv4, 1 for IPv6.
pub fn family_index(ip: IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}
