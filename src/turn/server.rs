//! The per-shard TURN server state machine: allocation tables, the per-packet lookups,
//! timers. Request handling is in `requests.rs`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::allocation::{family_index, Allocation, CHANNEL_COOLDOWN};
use super::ratelimit::RateLimiter;
use super::server_config::{ServerConfig, Shared};
use super::stats::{
    transport_index, TurnStats, LIFETIME_SECONDS_BOUNDS, REQUEST_SECONDS_BOUNDS, TRANSPORTS,
};
use super::tables::{PermissionExpiry, Tables};
use super::usage_tap;
use super::{ConnId, FiveTuple, Now, PeerRoute, RelayId, RelayIo, RelayUsage};
use crate::usage::Event;

/// What a timer entry is for. Entries are checked against the live state when they fire,
/// so refreshes just push a later entry and stale ones are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKind {
    Allocation {
        slot: usize,
        id: u64,
    },
    Permission {
        slot: usize,
        id: u64,
        ip: IpAddr,
    },
    Channel {
        slot: usize,
        id: u64,
        number: u16,
    },
    Reservations,
    /// The 30 s wait of an RFC 6062 peer connection (connecting, or awaiting its bind).
    TcpConn {
        conn: ConnId,
    },
    /// An allocation's interim usage report (`usage_tap`).
    Usage {
        slot: usize,
        id: u64,
    },
}

/// Why an allocation goes away (for counters and the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeleteReason {
    Expired,
    Refreshed0,
    ClientClosed,
}

impl DeleteReason {
    fn label(self) -> &'static str {
        match self {
            DeleteReason::Expired => "expired",
            DeleteReason::Refreshed0 => "refresh_zero",
            DeleteReason::ClientClosed => "client_closed",
        }
    }
}

/// One worker shard's TURN server (RFC 8656). See the module docs for the contract.
pub struct Server {
    pub(super) cfg: Arc<ServerConfig>,
    pub(super) shared: Arc<Shared>,
    /// The allocations and every index over them (their only writer).
    pub(super) tables: Tables,
    pub(super) timers: BinaryHeap<Reverse<(Instant, TimerKind)>>,
    pub(super) limiter: RateLimiter,
    pub(super) stats: TurnStats,
    /// Top 8 bits of this shard's CONNECTION-IDs (RFC 6062).
    pub(super) shard_index: u8,
    /// Messages for clients made outside a request (see `drain_outbox`).
    pub(super) outbox: Vec<(FiveTuple, Vec<u8>)>,
}

impl Server {
    pub fn new(cfg: Arc<ServerConfig>, shared: Arc<Shared>) -> Server {
        let limiter = RateLimiter::new(cfg.unauth_rate_per_sec, cfg.unauth_burst);
        Server {
            cfg,
            shared,
            tables: Tables::default(),
            timers: BinaryHeap::new(),
            limiter,
            stats: TurnStats::default(),
            shard_index: 0,
            outbox: Vec::new(),
        }
    }

    /// Swaps the configuration (reload). Existing allocations keep their lifetimes; new
    /// requests see the new credentials, limits and policy.
    pub fn set_config(&mut self, cfg: Arc<ServerConfig>) {
        self.limiter
            .set_limits(cfg.unauth_rate_per_sec, cfg.unauth_burst);
        super::usage_tap::reconfigured(&self.shared, &cfg);
        self.cfg = cfg;
    }

    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.cfg
    }

    pub fn stats(&self) -> &TurnStats {
        &self.stats
    }

    /// Allocations held by this shard.
    pub fn allocation_count(&self) -> usize {
        self.tables.len()
    }

    /// ChannelData from a client (RFC 8656 §12.5): the relay and peer, if the channel is
    /// bound and the peer's permission is alive. O(1), no allocation.
    pub fn channel_to_peer(&self, from: &FiveTuple, channel: u16) -> Option<(RelayId, SocketAddr)> {
        self.tables.channel_to_peer(from, channel)
    }

    /// A datagram from `peer` on relay socket `relay` (RFC 8656 §11.6, §12.5): where it
    /// goes, if a permission exists. O(1), no allocation.
    pub fn peer_to_client(&self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute> {
        self.tables.peer_to_client(relay, peer)
    }

    /// The earliest time `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Expires allocations, permissions, channels and EVEN-PORT reservations due at `now`.
    pub fn handle_timeout(&mut self, now: Now, io: &mut impl RelayIo) {
        while let Some(Reverse((t, kind))) = self.timers.peek().copied() {
            if t > now.mono {
                break;
            }
            self.timers.pop();
            match kind {
                TimerKind::Allocation { slot, id } => {
                    let Some(a) = self.live(slot, id) else {
                        continue;
                    };
                    // Only the entry the allocation is waiting on counts; earlier ones
                    // were superseded by a shortening refresh.
                    if a.timer_at != t {
                        continue;
                    }
                    if a.expires <= now.mono {
                        self.delete(slot, DeleteReason::Expired, now.mono, io);
                    } else {
                        let at = a.expires;
                        self.tables.set_timer_at(slot, at);
                        self.push_timer(at, kind);
                    }
                }
                TimerKind::Permission { slot, id, ip } => {
                    match self.tables.expire_permission(slot, id, ip, now.mono) {
                        PermissionExpiry::Removed { transport } => {
                            self.stats.permission_removed(transport, family_index(ip));
                        }
                        // Refreshed since: one entry per permission, re-armed here
                        // rather than pushed on every refresh (bounded heap).
                        PermissionExpiry::Later(e) => self.push_timer(e, kind),
                        PermissionExpiry::Gone => {}
                    }
                }
                TimerKind::Channel { slot, id, number } => {
                    let Some(a) = self.live(slot, id) else {
                        continue;
                    };
                    let Some(ch) = a.channels.iter().find(|c| c.number == number).copied() else {
                        continue;
                    };
                    let end = ch.expires + CHANNEL_COOLDOWN;
                    if ch.active && ch.expires <= now.mono {
                        self.deactivate_channel(slot, number);
                        self.push_timer(end, kind);
                    } else if ch.active {
                        self.push_timer(ch.expires, kind);
                    } else if end <= now.mono {
                        self.tables.drop_channel(slot, number);
                    } else {
                        self.push_timer(end, kind);
                    }
                }
                TimerKind::Reservations => {
                    self.shared.ports.expire_reservations(now.mono);
                }
                TimerKind::TcpConn { conn } => self.tcp_conn_timeout(now, conn, io),
                TimerKind::Usage { slot, id } => {
                    let Some(a) = self.tables.live(slot, id) else {
                        continue;
                    };
                    usage_tap::report(&self.shared, a, Event::Interim, now.mono, io);
                    if let Some(at) = usage_tap::next_report(&self.shared, &self.cfg, now.mono) {
                        self.push_timer(at, kind);
                    }
                }
            }
        }
    }

    /// A TCP/TLS client connection closed: its allocation goes (RFC 8656 §3.1).
    pub fn client_closed(&mut self, from: &FiveTuple, now: Now, io: &mut impl RelayIo) {
        if let Some(slot) = self.tables.slot_of(from) {
            self.delete(slot, DeleteReason::ClientClosed, now.mono, io);
        }
    }

    /// Counts the time the IO driver took to handle one request (the core has no clock).
    pub fn record_request_time(&mut self, took: std::time::Duration) {
        self.stats
            .request_seconds
            .observe(&REQUEST_SECONDS_BOUNDS, took.as_secs_f64());
    }

    pub(super) fn live(&self, slot: usize, id: u64) -> Option<&Allocation> {
        self.tables.live(slot, id)
    }

    /// Takes an expired channel out of the data path; it stays in the allocation for
    /// the cooldown.
    pub(super) fn deactivate_channel(&mut self, slot: usize, number: u16) {
        let Some(transport) = self.tables.get(slot).map(|a| a.tuple.transport) else {
            return;
        };
        if let Some(peer) = self.tables.deactivate_channel(slot, number) {
            self.stats
                .channel_deactivated(transport, family_index(peer.ip()));
        }
    }

    /// Removes an allocation and everything hanging off it; closes its relay sockets and
    /// returns ports and quota.
    pub(super) fn delete(
        &mut self,
        slot: usize,
        reason: DeleteReason,
        now: Instant,
        io: &mut impl RelayIo,
    ) {
        let Some((a, conns)) = self.tables.remove(slot) else {
            return;
        };
        usage_tap::report(&self.shared, &a, Event::End, now, io);
        let transport = a.tuple.transport;
        for ip in &a.perms {
            self.stats.permission_removed(transport, family_index(*ip));
        }
        for ch in a.channels.iter().filter(|c| c.active) {
            self.stats
                .channel_deactivated(transport, family_index(ch.peer.ip()));
        }
        // RFC 6062: the peer connections go with their allocation, before its listener.
        for (c, pc) in conns {
            self.stats.tcp_conns_by_state[pc.state.index()] -= 1;
            io.close_tcp_conn(c);
        }
        if a.tcp {
            self.stats.tcp_allocations -= 1;
        }
        let mut usage = RelayUsage::default();
        for r in a.relays.iter().flatten() {
            usage += io.usage(r.id);
            io.close_relay(r.id);
            self.shared.ports.release(r.local);
        }
        self.shared.release_quota(&a.quota_user);
        self.stats.allocation_removed(transport, a.family());
        match reason {
            DeleteReason::Expired => self.stats.allocations_expired += 1,
            DeleteReason::Refreshed0 | DeleteReason::ClientClosed => {
                self.stats.allocations_deleted += 1
            }
        }
        let lived = now.saturating_duration_since(a.created);
        self.stats
            .allocation_lifetime_seconds
            .observe(&LIFETIME_SECONDS_BOUNDS, lived.as_secs_f64());
        // Issue 5 item 8: one line per ended allocation, for accounting from journald.
        // The user name only: never a password or key.
        tracing::info!(
            user = %a.username,
            transport = TRANSPORTS[transport_index(transport)],
            tcp_relay = a.tcp,
            client = %a.tuple.client,
            relayed = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
            reason = reason.label(),
            duration_secs = (lived.as_millis() as f64) / 1000.0,
            bytes_to_peer = usage.to_peer_bytes,
            packets_to_peer = usage.to_peer_packets,
            bytes_to_client = usage.to_client_bytes,
            packets_to_client = usage.to_client_packets,
            "allocation ended"
        );
    }

    /// Refresh with REQUESTED-ADDRESS-FAMILY and LIFETIME 0 on a dual-stack allocation
    /// (RFC 8656 §7.3): only that family's relay goes, with its permissions and channels;
    /// the allocation lives on with the other family.
    pub(super) fn delete_family(&mut self, slot: usize, v6: bool, io: &mut impl RelayIo) {
        let fi = usize::from(v6);
        let Some((tuple, username)) = self.tables.get(slot).map(|a| (a.tuple, a.username.clone()))
        else {
            return;
        };
        // Pending timer entries of what goes here find nothing and do nothing.
        let Some(gone) = self.tables.remove_family(slot, fi) else {
            return;
        };
        for _ in 0..gone.perms {
            self.stats.permission_removed(tuple.transport, fi);
        }
        for _ in 0..gone.active_channels {
            self.stats.channel_deactivated(tuple.transport, fi);
        }
        let r = gone.relay;
        // The closed relay's counters stay with the allocation for its later reports.
        if let Some(a) = self.tables.get(slot) {
            let mut mark = a.usage.get();
            mark.closed += io.usage(r.id);
            a.usage.set(mark);
        }
        io.close_relay(r.id);
        self.shared.ports.release(r.local);
        let ti = transport_index(tuple.transport);
        self.stats.allocations_by[ti][gone.old_family] -= 1;
        self.stats.allocations_by[ti][gone.new_family] += 1;
        tracing::info!(
            user = %username,
            client = %tuple.client,
            relayed = %r.advertised,
            "allocation released one address family"
        );
    }

    pub(super) fn push_timer(&mut self, at: Instant, kind: TimerKind) {
        self.timers.push(Reverse((at, kind)));
    }
}
