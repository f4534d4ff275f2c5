//! The per-shard TURN server: its state, its public API, and the timers. The only
//! `impl Server`. Requests are handled by `method/` (free functions over a [`Cx`] that
//! borrows this state for one call); every effect on the outside world leaves through
//! [`Server::poll_output`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::allocation::{family_index, CHANNEL_COOLDOWN};
use super::method::teardown::{self, DeleteReason};
use super::method::{self, connect, Cx};
use super::ratelimit::RateLimiter;
use super::server_config::{ServerConfig, Shared};
use super::stats::{TurnStats, REQUEST_SECONDS_BOUNDS};
use super::tables::{PermissionExpiry, Tables};
use super::timers::{TimerKind, Timers};
use super::usage_tap;
use super::{
    ChannelNumber, ChannelRoute, ConnId, FiveTuple, Now, Output, PeerRoute, RelayId, RelayIo,
};
use crate::usage::Event;

/// One worker shard's TURN server (RFC 8656). See the module docs for the contract.
pub struct Server {
    cfg: Arc<ServerConfig>,
    shared: Arc<Shared>,
    /// The allocations and every index over them (their only writer).
    tables: Tables,
    timers: Timers,
    limiter: RateLimiter,
    stats: TurnStats,
    /// Top 8 bits of this shard's CONNECTION-IDs (RFC 6062).
    shard_index: u8,
    /// What the driver has yet to do ([`Server::poll_output`]).
    out: VecDeque<Output>,
}

impl Server {
    pub fn new(cfg: Arc<ServerConfig>, shared: Arc<Shared>) -> Server {
        let limiter = RateLimiter::new(cfg.unauth_rate_per_sec, cfg.unauth_burst);
        Server {
            cfg,
            shared,
            tables: Tables::default(),
            timers: Timers::default(),
            limiter,
            stats: TurnStats::default(),
            shard_index: 0,
            out: VecDeque::new(),
        }
    }

    /// This call's view of the state for the handlers in `method/`.
    fn cx(&mut self) -> Cx<'_> {
        Cx {
            cfg: &self.cfg,
            shared: &self.shared,
            tables: &mut self.tables,
            timers: &mut self.timers,
            limiter: &mut self.limiter,
            stats: &mut self.stats,
            out: &mut self.out,
            shard_index: self.shard_index,
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

    /// Sets the index of this shard's worker; it becomes the top 8 bits of every
    /// CONNECTION-ID this shard hands out (see [`super::conn_shard`]).
    pub fn set_shard_index(&mut self, index: u8) {
        self.shard_index = index;
    }

    /// Whether `tuple` is the control connection of an allocation on this shard.
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.tables.slot_of(tuple).is_some()
    }

    /// A STUN message from a client. Its answer, if any, is written into `out`
    /// (`out.len() >= 2048`) and announced by `poll_output` as `Output::Reply`,
    /// `Output::Forward` (a Send indication) or `Output::BindData`, after whatever else
    /// the message caused.
    pub fn handle_stun(
        &mut self,
        now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8],
        io: &mut impl RelayIo,
    ) {
        let mut cx = self.cx();
        if let Some(answer) = method::handle_stun(&mut cx, now, from, msg, out, io) {
            cx.emit(answer);
        }
    }

    /// The next thing the driver must do, in order; `None` when there is nothing left.
    /// The driver drains this after every call into the core (`Reply`, `Forward` and
    /// `BindData` refer to the buffers of the `handle_stun` call just made).
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// ChannelData from a client (RFC 8656 §12.5): the relay and peer, if the channel is
    /// bound and the peer's permission is alive. O(1), no allocation.
    pub fn channel_to_peer(
        &self,
        from: &FiveTuple,
        channel: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)> {
        self.tables.channel_to_peer(from, channel)
    }

    /// A datagram from `peer` on relay socket `relay` (RFC 8656 §11.6, §12.5): where it
    /// goes, if a permission exists. O(1), no allocation.
    pub fn peer_to_client(&self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute> {
        self.tables.peer_to_client(relay, peer)
    }

    /// Changes whenever the set [`Server::channel_routes`] yields may have changed.
    pub fn channel_routes_generation(&self) -> u64 {
        self.tables.routes_generation()
    }

    /// Every established channel binding (active, permission alive). Control path only:
    /// walks the channel index.
    pub fn channel_routes(&self, f: impl FnMut(ChannelRoute)) {
        self.tables.channel_routes(f)
    }

    /// The earliest time `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_at()
    }

    /// Expires allocations, permissions, channels, EVEN-PORT reservations and RFC 6062
    /// peer connection waits due at `now`; sends interim usage reports. `io` is only read
    /// (relay counters).
    pub fn handle_timeout(&mut self, now: Now, io: &mut impl RelayIo) {
        let mut cx = self.cx();
        while let Some((t, kind)) = cx.timers.pop_due(now.mono) {
            match kind {
                TimerKind::Allocation { slot, id } => {
                    let Some(a) = cx.tables.live(slot, id) else {
                        continue;
                    };
                    // Only the entry the allocation is waiting on counts; earlier ones
                    // were superseded by a shortening refresh.
                    if a.timer_at != t {
                        continue;
                    }
                    if a.expires <= now.mono {
                        teardown::delete(&mut cx, slot, DeleteReason::Expired, now.mono, io);
                    } else {
                        let at = a.expires;
                        cx.tables.set_timer_at(slot, at);
                        cx.push_timer(at, kind);
                    }
                }
                TimerKind::Permission { slot, id, ip } => {
                    match cx.tables.expire_permission(slot, id, ip, now.mono) {
                        PermissionExpiry::Removed { transport } => {
                            cx.stats.permission_removed(transport, family_index(ip));
                        }
                        // Refreshed since: one entry per permission, re-armed here
                        // rather than pushed on every refresh (bounded heap).
                        PermissionExpiry::Later(e) => cx.push_timer(e, kind),
                        PermissionExpiry::Gone => {}
                    }
                }
                TimerKind::Channel { slot, id, number } => {
                    let Some(a) = cx.tables.live(slot, id) else {
                        continue;
                    };
                    let Some(ch) = a.channels.iter().find(|c| c.number == number).copied() else {
                        continue;
                    };
                    let end = ch.expires + CHANNEL_COOLDOWN;
                    if ch.active && ch.expires <= now.mono {
                        teardown::deactivate_channel(&mut cx, slot, number);
                        cx.push_timer(end, kind);
                    } else if ch.active {
                        cx.push_timer(ch.expires, kind);
                    } else if end <= now.mono {
                        cx.tables.drop_channel(slot, number);
                    } else {
                        cx.push_timer(end, kind);
                    }
                }
                TimerKind::Reservations => {
                    cx.shared.ports.expire_reservations(now.mono);
                }
                TimerKind::TcpConn { conn } => connect::conn_timeout(&mut cx, now, conn),
                TimerKind::Usage { slot, id } => {
                    let Some(a) = cx.tables.live(slot, id) else {
                        continue;
                    };
                    usage_tap::report(cx.shared, a, Event::Interim, now.mono, io);
                    if let Some(at) = usage_tap::next_report(cx.shared, cx.cfg, now.mono) {
                        cx.push_timer(at, kind);
                    }
                }
            }
        }
        if cx.timers.wants_sweep() {
            let tables = &*cx.tables;
            cx.timers
                .compact(|at, kind| timer_can_act(tables, at, kind));
        }
    }

    /// A TCP/TLS client connection closed: its allocation goes (RFC 8656 §3.1). `io` is
    /// only read (relay counters).
    pub fn client_closed(&mut self, from: &FiveTuple, now: Now, io: &mut impl RelayIo) {
        let mut cx = self.cx();
        if let Some(slot) = cx.tables.slot_of(from) {
            teardown::delete(&mut cx, slot, DeleteReason::ClientClosed, now.mono, io);
        }
    }

    /// The driver's connect for peer connection `conn` finished (RFC 6062 §5.2): on
    /// success the Connect success response (with CONNECTION-ID) is queued and the 30 s
    /// ConnectionBind timer starts; on failure a 447 response is queued and the core
    /// forgets `conn`. Returns whether the driver keeps the socket (`false`: close it,
    /// e.g. the allocation went meanwhile or `ok` was false).
    pub fn tcp_connect_done(&mut self, now: Now, conn: ConnId, ok: bool) -> bool {
        connect::connect_done(&mut self.cx(), now, conn, ok)
    }

    /// A peer connected to TCP relay listener `relay` (RFC 6062 §5.3). `Some(conn)`: keep
    /// the socket without reading from it until it is bound; a ConnectionAttempt
    /// indication is queued. `None`: no permission or over the limit, close it.
    pub fn tcp_peer_accepted(
        &mut self,
        now: Now,
        relay: RelayId,
        peer: SocketAddr,
    ) -> Option<ConnId> {
        connect::peer_accepted(&mut self.cx(), now, relay, peer)
    }

    /// The driver closed peer connection `conn` (either side of a bound pair ended, or a
    /// peer waiting for its ConnectionBind hung up). One still connecting has its Connect
    /// answered with 447, so the client does not wait for an answer that cannot come.
    pub fn tcp_conn_closed(&mut self, conn: ConnId) {
        connect::conn_closed(&mut self.cx(), conn)
    }

    /// Counts the time the IO driver took to handle one request (the core has no clock).
    pub fn record_request_time(&mut self, took: std::time::Duration) {
        self.stats
            .request_seconds
            .observe(&REQUEST_SECONDS_BOUNDS, took.as_secs_f64());
    }

    /// The tables, for tests that check nothing is left behind.
    #[cfg(test)]
    pub(super) fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    /// The rate limiter, for tests of its per-source buckets.
    #[cfg(test)]
    pub(super) fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Timer entries held, for tests that bound the heap.
    #[cfg(test)]
    pub(super) fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Timer entries the heap has room for, for tests that check memory is given back.
    #[cfg(test)]
    pub(super) fn timer_capacity(&self) -> usize {
        self.timers.capacity()
    }
}

/// Whether a timer entry could still act when it fires: the checks `handle_timeout` makes
/// before acting, or `true` where it cannot tell cheaply (kept entries are harmless; a
/// dropped live one would be a state that never expires).
fn timer_can_act(tables: &Tables, at: Instant, kind: &TimerKind) -> bool {
    match *kind {
        TimerKind::Allocation { slot, id } => {
            tables.live(slot, id).is_some_and(|a| a.timer_at == at)
        }
        TimerKind::Permission { slot, id, .. } | TimerKind::Usage { slot, id } => {
            tables.live(slot, id).is_some()
        }
        TimerKind::Channel { slot, id, number } => tables
            .live(slot, id)
            .is_some_and(|a| a.channels.iter().any(|c| c.number == number)),
        TimerKind::Reservations => true,
        TimerKind::TcpConn { conn } => tables.conn(conn).is_some(),
    }
}
