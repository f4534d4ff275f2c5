//! The relay sockets of one worker's allocations (opened by its shard through
//! [`RelayIo`], closed when it asks through `Output`): UDP relay sockets, RFC 6062 TCP relay listeners and their peer
//! connections (`peers.rs`), and the batch that sends client→peer datagrams.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Registry};

use super::peers::Peers;
use super::token::{Tok, MAX_SLOT};
use crate::fastpath::{self, Offload, Wanted};
use crate::net::gso::GsoBatch;
use crate::net::socket;
use crate::net::stats::NetStats;
use crate::rate::TokenBucket;
use crate::turn::{ConnId, RelayId, RelayIo, RelayUsage, Server, Transport};

/// What a relay is: a UDP socket, or a TCP listener for an RFC 6062 allocation (§5.1).
pub(super) enum RelayKind {
    Udp(UdpSocket),
    Tcp {
        listener: TcpListener,
        /// The exact address bound, which outgoing peer connects bind too (§5.2).
        addr: SocketAddr,
    },
}

/// A relay socket and what it carried (plain integers: only this worker writes them).
pub(super) struct RelaySock {
    kind: RelayKind,
    /// The exact address bound (what the kernel fast path matches peer datagrams on).
    addr: SocketAddr,
    usage: RelayUsage,
    cap: Option<RelayCap>,
    /// `turn.user_max_bytes_per_sec`: the cap shared with the user's other relays (any
    /// worker); atomics only, and only consulted when set.
    user_cap: Option<std::sync::Arc<crate::usage::UserCap>>,
}

impl RelaySock {
    fn new(kind: RelayKind, addr: SocketAddr, max_bytes_per_sec: u64) -> RelaySock {
        RelaySock {
            kind,
            addr,
            usage: RelayUsage::default(),
            cap: RelayCap::new(max_bytes_per_sec, Instant::now()),
            user_cap: None,
        }
    }
}

/// `turn.max_bytes_per_sec` budgets of one relayed address (coturn's `max-bps`), one per
/// direction, each holding one second's worth; `None` on a relay without a cap.
pub(super) struct RelayCap {
    to_peer: TokenBucket,
    to_client: TokenBucket,
}

impl RelayCap {
    fn new(rate: u64, now: Instant) -> Option<RelayCap> {
        let rate = rate as f64;
        (rate > 0.0).then(|| RelayCap {
            to_peer: TokenBucket::new(rate, rate, now),
            to_client: TokenBucket::new(rate, rate, now),
        })
    }
}

/// The budgets of relay `id` (client→peer, peer→client) in bytes at `now`, `u64::MAX`
/// without a cap. A free function over the socket table so the splice can hold a peer
/// connection (in `Relays::peers`) at the same time.
pub(super) fn bandwidth_budget(
    socks: &mut [Option<RelaySock>],
    id: RelayId,
    now: Instant,
) -> (u64, u64) {
    match socks.get_mut(id.index()).and_then(Option::as_mut) {
        Some(RelaySock { cap: Some(c), .. }) => (
            c.to_peer.available(now) as u64,
            c.to_client.available(now) as u64,
        ),
        _ => (u64::MAX, u64::MAX),
    }
}

/// Spends what a splice moved from relay `id`'s budgets.
pub(super) fn bandwidth_spend(
    socks: &mut [Option<RelaySock>],
    id: RelayId,
    to_peer: u64,
    to_client: u64,
) {
    if let Some(Some(RelaySock { cap: Some(c), .. })) = socks.get_mut(id.index()) {
        c.to_peer.spend(to_peer as f64);
        c.to_client.spend(to_client as f64);
    }
}

/// The relay sockets of this worker's allocations; the shard opens and closes them.
pub struct Relays {
    pub(super) registry: Registry,
    pub(super) socks: Vec<Option<RelaySock>>,
    pub(super) free: Vec<u32>,
    pub(super) buffer_bytes: usize,
    /// Peer connections of the TCP relays (RFC 6062).
    pub(super) peers: Peers,
    /// `turn.max_bytes_per_sec` (0: no cap) for relays opened from now on.
    pub(super) max_bytes_per_sec: u64,
    /// This worker's side of the kernel fast path (`turn.kernel_fast_path`), if loaded.
    pub(super) fast: Option<Offload>,
    /// Reused list of the bindings to offload (control path).
    pub(super) fast_wanted: Vec<Wanted>,
    /// Counter growth read from the fast path's maps, not yet in the worker's `NetStats`.
    pub(super) fast_folded: RelayUsage,
}

/// Moves `turn.max_bytes_per_sec` tokens between capped relays' buckets and the fast path:
/// what the program left unspent goes back, then everything the buckets hold is granted to
/// it (so the user-space path of the same relay finds its bucket empty until the next
/// exchange, and the relay as a whole stays within its cap).
fn exchange_budgets(fast: &mut Offload, socks: &mut [Option<RelaySock>], now: Instant) {
    fast.exchange_budgets(|relay, left, live| {
        let c = socks.get_mut(relay.index())?.as_mut()?.cap.as_mut()?;
        c.to_peer.spend(-(left.to_peer as f64));
        c.to_client.spend(-(left.to_client as f64));
        if !live {
            return None;
        }
        let to_peer = c.to_peer.available(now).floor();
        let to_client = c.to_client.available(now).floor();
        c.to_peer.spend(to_peer);
        c.to_client.spend(to_client);
        Some(fastpath::Budget {
            to_peer: to_peer as i64,
            to_client: to_client as i64,
        })
    });
}

/// Adds what the fast path forwarded for `relay` to its usage (the allocation's byte
/// counts) and to what the worker's counters have yet to take.
fn fold_fast(
    socks: &mut [Option<RelaySock>],
    unfolded: &mut RelayUsage,
    relay: RelayId,
    u: RelayUsage,
) {
    if let Some(Some(s)) = socks.get_mut(relay.index()) {
        s.usage += u;
    }
    *unfolded += u;
}

impl Relays {
    pub(super) fn fd(&self, id: RelayId) -> Option<RawFd> {
        match &self.socks.get(id.index())?.as_ref()?.kind {
            RelayKind::Udp(s) => Some(s.as_raw_fd()),
            RelayKind::Tcp { .. } => None,
        }
    }

    /// Whether relay `id` is an RFC 6062 TCP relay listener.
    pub(super) fn is_tcp(&self, id: RelayId) -> bool {
        self.socks
            .get(id.index())
            .and_then(Option::as_ref)
            .is_some_and(|s| matches!(s.kind, RelayKind::Tcp { .. }))
    }

    /// The TCP relay listener of `id` and its address.
    pub(super) fn tcp_listener(&self, id: RelayId) -> Option<(&TcpListener, SocketAddr)> {
        match &self.socks.get(id.index())?.as_ref()?.kind {
            RelayKind::Tcp { listener, addr } => Some((listener, *addr)),
            RelayKind::Udp(_) => None,
        }
    }

    /// The socket to send `len` payload bytes to a peer from, counting them for the
    /// allocation's log line; `None` if `id` is not a UDP relay, or if its bandwidth cap
    /// drops the datagram (counted in `stats`).
    pub(super) fn peer_send_fd(
        &mut self,
        id: RelayId,
        len: usize,
        now: Instant,
        stats: &mut NetStats,
    ) -> Option<RawFd> {
        let s = self.socks.get_mut(id.index())?.as_mut()?;
        let RelayKind::Udp(sock) = &s.kind else {
            return None;
        };
        if let Some(c) = &mut s.cap {
            if !c.to_peer.try_take(len as f64, now) {
                stats.drop_bandwidth += 1;
                return None;
            }
        }
        if let Some(u) = &s.user_cap {
            if !u.allow_to_peer(len, now) {
                stats.drop_user_bandwidth += 1;
                return None;
            }
        }
        s.usage.to_peer_bytes += len as u64;
        s.usage.to_peer_packets += 1;
        Some(sock.as_raw_fd())
    }

    /// Whether `len` bytes from a peer may go to the client of relay `id` now; a datagram
    /// over its bandwidth cap is counted in `stats`.
    pub(super) fn allow_to_client(
        &mut self,
        id: RelayId,
        len: usize,
        now: Instant,
        stats: &mut NetStats,
    ) -> bool {
        let Some(Some(s)) = self.socks.get_mut(id.index()) else {
            return false;
        };
        if let Some(c) = &mut s.cap {
            if !c.to_client.try_take(len as f64, now) {
                stats.drop_bandwidth += 1;
                return false;
            }
        }
        if let Some(u) = &s.user_cap {
            if !u.allow_to_client(len, now) {
                stats.drop_user_bandwidth += 1;
                return false;
            }
        }
        true
    }

    /// Makes the fast path's maps hold this shard's established channel bindings, if they
    /// changed since the last call (control path: after the core ran, and at housekeeping).
    pub(super) fn sync_fast_path(&mut self, core: &Server) {
        let Some(fast) = &mut self.fast else {
            return;
        };
        let generation = core.channel_routes_generation();
        if fast.is_synced(generation) {
            return;
        }
        let mut wanted = std::mem::take(&mut self.fast_wanted);
        wanted.clear();
        let socks = &self.socks;
        core.channel_routes(|route| {
            if let Some(Some(RelaySock {
                kind: RelayKind::Udp(_),
                addr,
                cap,
                ..
            })) = socks.get(route.relay.index())
            {
                wanted.push(Wanted {
                    route,
                    relay_addr: *addr,
                    capped: cap.is_some(),
                });
            }
        });
        let (socks, unfolded) = (&mut self.socks, &mut self.fast_folded);
        fast.sync(generation, &wanted, |r, u| fold_fast(socks, unfolded, r, u));
        self.fast_wanted = wanted;
        exchange_budgets(fast, &mut self.socks, Instant::now());
    }

    /// Housekeeping: reads the fast path's counters into the relays' usage and `stats`
    /// (as the user-space path counts: payload bytes to peers, ChannelData frames to
    /// clients).
    pub(super) fn poll_fast_path(&mut self, stats: &mut NetStats) {
        let Some(fast) = &mut self.fast else {
            return;
        };
        let (socks, unfolded) = (&mut self.socks, &mut self.fast_folded);
        fast.poll(|r, u| fold_fast(socks, unfolded, r, u));
        exchange_budgets(fast, &mut self.socks, Instant::now());
        let u = std::mem::take(&mut self.fast_folded);
        stats.client_to_peer_udp_packets += u.to_peer_packets;
        stats.client_to_peer_udp_bytes += u.to_peer_bytes;
        stats.peer_to_client_udp_packets += u.to_client_packets;
        stats.peer_to_client_udp_bytes +=
            u.to_client_bytes + u.to_client_packets * fastpath::CHANNEL_DATA_HEADER;
        stats.fastpath_to_peer_packets += u.to_peer_packets;
        stats.fastpath_to_peer_bytes += u.to_peer_bytes;
        stats.fastpath_to_client_packets += u.to_client_packets;
        stats.fastpath_to_client_bytes += u.to_client_bytes;
        stats.fastpath_bindings = fast.bindings() as u64;
        stats.fastpath_map_full = fast.failed;
    }

    /// A reloaded `turn.max_bytes_per_sec`: every relay gets fresh budgets at the new rate
    /// (or none).
    pub(super) fn set_max_bytes_per_sec(&mut self, rate: u64) {
        if let Some(f) = &mut self.fast {
            // Which relays are capped may have changed.
            f.invalidate();
        }
        self.max_bytes_per_sec = rate;
        let now = Instant::now();
        for s in self.socks.iter_mut().flatten() {
            s.cap = RelayCap::new(rate, now);
        }
    }

    /// Counts bytes spliced from a client data connection to a peer of TCP relay `id`.
    pub(super) fn count_to_peer(&mut self, id: RelayId, bytes: u64, chunks: u64) {
        if let Some(s) = self.socks.get_mut(id.index()).and_then(Option::as_mut) {
            s.usage.to_peer_bytes += bytes;
            s.usage.to_peer_packets += chunks;
        }
    }

    /// `Output::CloseRelay`: closes a relay socket or TCP relay listener (its allocation
    /// or family ended).
    pub(super) fn close(&mut self, relay: RelayId) {
        if let Some(fast) = &mut self.fast {
            let (socks, unfolded) = (&mut self.socks, &mut self.fast_folded);
            fast.remove_relay(relay, |r, u| fold_fast(socks, unfolded, r, u));
        }
        let idx = relay.index();
        if let Some(s) = self.socks.get_mut(idx).and_then(Option::take) {
            let _ = match s.kind {
                RelayKind::Udp(mut u) => self.registry.deregister(&mut u),
                RelayKind::Tcp { mut listener, .. } => self.registry.deregister(&mut listener),
            };
            self.free.push(idx as u32);
        }
    }

    /// `Output::ClosePeerConn`: closes an RFC 6062 peer connection; returns the client
    /// data connection slot it was spliced to (closed by the worker, which owns it).
    pub(super) fn close_peer(&mut self, conn: ConnId) -> Option<usize> {
        self.peers.close_by_core(&self.registry, conn)
    }

    fn slot(&mut self) -> io::Result<usize> {
        match self.free.pop() {
            Some(i) => Ok(i as usize),
            None => {
                if self.socks.len() > MAX_SLOT {
                    return Err(io::Error::other("too many relay sockets in one worker"));
                }
                self.socks.push(None);
                Ok(self.socks.len() - 1)
            }
        }
    }

    /// Counts payload relayed from peers to the client of relay `id`.
    pub(super) fn count_to_client(&mut self, id: RelayId, bytes: u64, packets: u64) {
        if let Some(s) = self.socks.get_mut(id.index()).and_then(Option::as_mut) {
            s.usage.to_client_bytes += bytes;
            s.usage.to_client_packets += packets;
        }
    }
}

impl RelayIo for Relays {
    fn open_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut sock = UdpSocket::from_std(socket::relay_socket(addr, self.buffer_bytes)?);
        let idx = self.slot()?;
        if let Err(e) =
            self.registry
                .register(&mut sock, Tok::Relay(idx).token(), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(RelaySock::new(
            RelayKind::Udp(sock),
            addr,
            self.max_bytes_per_sec,
        ));
        Ok(RelayId::from_index(idx))
    }

    fn open_tcp_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut listener =
            TcpListener::from_std(socket::tcp_relay_listener(addr, self.buffer_bytes)?);
        let addr = listener.local_addr()?;
        let idx = self.slot()?;
        if let Err(e) =
            self.registry
                .register(&mut listener, Tok::Relay(idx).token(), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(RelaySock::new(
            RelayKind::Tcp { listener, addr },
            addr,
            self.max_bytes_per_sec,
        ));
        Ok(RelayId::from_index(idx))
    }

    fn tcp_connect(&mut self, relay: RelayId, peer: SocketAddr, conn: ConnId) -> io::Result<()> {
        let Some((_, from)) = self.tcp_listener(relay) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a TCP relay",
            ));
        };
        let r = socket::tcp_relay_connect(from, peer, self.buffer_bytes).and_then(|sock| {
            let state = super::peers::PeerState::connecting();
            self.peers.add(&self.registry, sock, conn, relay, state)
        });
        if r.is_err() {
            self.peers.connect_failures += 1;
        }
        r
    }

    fn set_user_cap(&mut self, relay: RelayId, cap: std::sync::Arc<crate::usage::UserCap>) {
        // UDP relays only: an RFC 6062 splice is paced by turn.max_bytes_per_sec.
        if let Some(s) = self.socks.get_mut(relay.index()).and_then(Option::as_mut) {
            if matches!(s.kind, RelayKind::Udp(_)) {
                s.user_cap = Some(cap);
            }
        }
    }

    fn usage(&self, relay: RelayId) -> RelayUsage {
        let mut u = self
            .socks
            .get(relay.index())
            .and_then(Option::as_ref)
            .map(|s| s.usage)
            .unwrap_or_default();
        if let Some(fast) = &self.fast {
            // What the kernel forwarded since the last housekeeping read.
            u += fast.pending(relay);
        }
        u
    }
}

/// Client→peer datagrams for one relay socket at a time, sent with one sendmmsg.
pub(super) struct PeerBatch {
    pub(super) batch: GsoBatch,
    pub(super) fd: RawFd,
    pub(super) transport: Transport,
}

impl PeerBatch {
    /// Queues `data` to `peer` from relay socket `fd`, flushing first if the batch holds
    /// another socket's datagrams or is full.
    ///
    /// # Safety
    /// `data` must stay valid until the next [`Self::flush`].
    pub(super) unsafe fn push(
        &mut self,
        fd: RawFd,
        transport: Transport,
        data: &[u8],
        peer: SocketAddr,
        stats: &mut NetStats,
    ) {
        if !self.batch.is_empty() && (self.fd != fd || self.transport != transport) {
            self.flush(stats);
        }
        if self.batch.is_full() {
            self.flush(stats);
        }
        self.fd = fd;
        self.transport = transport;
        self.batch.push(data, peer, None);
    }

    pub(super) fn flush(&mut self, stats: &mut NetStats) {
        if self.batch.is_empty() {
            return;
        }
        let f = self.batch.flush(self.fd);
        let (packets, bytes) = match self.transport {
            Transport::Udp => (
                &mut stats.client_to_peer_udp_packets,
                &mut stats.client_to_peer_udp_bytes,
            ),
            Transport::Tcp => (
                &mut stats.client_to_peer_tcp_packets,
                &mut stats.client_to_peer_tcp_bytes,
            ),
            Transport::Tls => (
                &mut stats.client_to_peer_tls_packets,
                &mut stats.client_to_peer_tls_bytes,
            ),
        };
        *packets += f.sent as u64;
        *bytes += f.sent_bytes as u64;
        stats.drop_send_error += f.failed as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::RelayCap;
    use std::time::Instant;

    #[test]
    fn rate_zero_is_no_cap() {
        assert!(RelayCap::new(0, Instant::now()).is_none());
        assert!(RelayCap::new(1000, Instant::now()).is_some());
    }
}
