//! The relay sockets of one worker's allocations (opened by its shard through
//! [`RelayIo`], closed when it asks through `Output`): UDP relay sockets, RFC 6062 TCP
//! relay listeners and their peer connections (`peers.rs`), the batch that sends
//! client→peer datagrams, and the framing of peer datagrams for their client.
//!
//! Owns: the relay sockets with their usage counters and `turn.max_bytes_per_sec` buckets,
//! the peer connection table, the worker's side of the kernel fast path. Checks both
//! bandwidth caps of a packet before spending either. Must not: touch client connections
//! (`Output::ClosePeerConn` returns the client slot for the worker to close), or allocate
//! per packet. Calls the core only for RFC 6062 peer accepts and connects (control path)
//! and to read its channel routes for the fast path.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Registry};

use super::peers::{PeerConn, PeerEvent, PeerState, Peers};
use super::token::{Tok, MAX_SLOT};
use crate::fastpath::{self, Offload, Wanted};
use crate::net::gso::GsoBatch;
use crate::net::socket;
use crate::net::stats::NetStats;
use crate::rate::TokenBucket;
use crate::stun::{
    write_channel_data_header, write_data_indication, ChannelNumber, CHANNEL_DATA_HEADER,
};
use crate::turn::{ConnId, Now, RelayId, RelayIo, RelayUsage, Server, Transport};
use crate::usage::UserCap;

/// Peer connections accepted from one relay listener per turn.
const ACCEPT_BATCH: usize = 64;

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

/// Which way a relayed packet goes: picks the bucket of a [`RelayCap`] and of a `UserCap`.
#[derive(Clone, Copy)]
enum Dir {
    ToPeer,
    ToClient,
}

/// Whether `len` bytes may pass a relay's `turn.max_bytes_per_sec` bucket and its user's
/// `turn.user_max_bytes_per_sec` cap now, spending both only when both allow it (a packet
/// one of them drops costs the other nothing); a drop is counted in `stats` by which cap.
#[inline]
fn admit(
    cap: &mut Option<RelayCap>,
    user: Option<&UserCap>,
    dir: Dir,
    len: usize,
    now: Instant,
    stats: &mut NetStats,
) -> bool {
    let mut bucket = cap.as_mut().map(|c| match dir {
        Dir::ToPeer => &mut c.to_peer,
        Dir::ToClient => &mut c.to_client,
    });
    // The relay's bucket is only looked at first: the user's cap (shared atomics, no
    // refund) spends when it allows, and only then the relay's bucket.
    if let Some(b) = &mut bucket {
        if b.available(now) < len as f64 {
            stats.drop_bandwidth += 1;
            return false;
        }
    }
    if let Some(u) = user {
        let ok = match dir {
            Dir::ToPeer => u.allow_to_peer(len, now),
            Dir::ToClient => u.allow_to_client(len, now),
        };
        if !ok {
            stats.drop_user_bandwidth += 1;
            return false;
        }
    }
    if let Some(b) = bucket {
        b.spend(len as f64);
    }
    true
}

/// The relay sockets of this worker's allocations; the shard opens and closes them.
pub struct Relays {
    registry: Registry,
    socks: Vec<Option<RelaySock>>,
    free: Vec<u32>,
    buffer_bytes: usize,
    /// UDP GRO on new relay sockets (`WorkerParams::udp_gro`).
    udp_gro: bool,
    /// Peer connections of the TCP relays (RFC 6062).
    peers: Peers,
    /// `turn.max_bytes_per_sec` (0: no cap) for relays opened from now on.
    max_bytes_per_sec: u64,
    /// This worker's side of the kernel fast path (`turn.kernel_fast_path`), if loaded.
    fast: Option<Offload>,
    /// Reused list of the bindings to offload (control path).
    fast_wanted: Vec<Wanted>,
    /// Counter growth read from the fast path's maps, not yet in the worker's `NetStats`.
    fast_folded: RelayUsage,
}

/// What accepting peers on a TCP relay listener left to do.
pub(super) enum Accepted {
    /// Nothing more to accept now.
    Done,
    /// The batch ended with more waiting (fairness cap).
    More,
    /// accept() failed (e.g. out of file descriptors): retry at housekeeping.
    Retry,
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
    pub(super) fn new(
        registry: Registry,
        buffer_bytes: usize,
        udp_gro: bool,
        max_bytes_per_sec: u64,
        fast: Option<Offload>,
    ) -> Relays {
        Relays {
            registry,
            socks: Vec::new(),
            free: Vec::new(),
            buffer_bytes,
            udp_gro,
            peers: Peers::default(),
            max_bytes_per_sec,
            fast,
            fast_wanted: Vec::new(),
            fast_folded: RelayUsage::default(),
        }
    }

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
        if !admit(
            &mut s.cap,
            s.user_cap.as_deref(),
            Dir::ToPeer,
            len,
            now,
            stats,
        ) {
            return None;
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
        admit(
            &mut s.cap,
            s.user_cap.as_deref(),
            Dir::ToClient,
            len,
            now,
            stats,
        )
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

    /// The budgets of relay `id` (client→peer, peer→client) in bytes at `now`, `u64::MAX`
    /// without a cap: a splice moves at most this much, then reports it ([`Self::spliced`]).
    pub(super) fn bandwidth_budget(&mut self, id: RelayId, now: Instant) -> (u64, u64) {
        match self.socks.get_mut(id.index()).and_then(Option::as_mut) {
            Some(RelaySock { cap: Some(c), .. }) => (
                c.to_peer.available(now) as u64,
                c.to_client.available(now) as u64,
            ),
            _ => (u64::MAX, u64::MAX),
        }
    }

    /// What a splice on TCP relay `id` moved, `(bytes, chunks)` each way: counted for the
    /// allocation and spent from its budgets.
    pub(super) fn spliced(&mut self, id: RelayId, to_peer: (u64, u64), to_client: (u64, u64)) {
        let Some(s) = self.socks.get_mut(id.index()).and_then(Option::as_mut) else {
            return;
        };
        s.usage.to_peer_bytes += to_peer.0;
        s.usage.to_peer_packets += to_peer.1;
        s.usage.to_client_bytes += to_client.0;
        s.usage.to_client_packets += to_client.1;
        if let Some(c) = &mut s.cap {
            c.to_peer.spend(to_peer.0 as f64);
            c.to_client.spend(to_client.0 as f64);
        }
    }

    pub(super) fn peer(&self, slot: usize) -> Option<&PeerConn> {
        self.peers.get(slot)
    }

    pub(super) fn peer_mut(&mut self, slot: usize) -> Option<&mut PeerConn> {
        self.peers.get_mut(slot)
    }

    /// An event on peer socket `slot`.
    pub(super) fn peer_event(&mut self, slot: usize) -> PeerEvent {
        self.peers.event(slot)
    }

    /// Peer sockets open now, and connects that could not even start.
    pub(super) fn peer_counts(&self) -> (u64, u64) {
        (self.peers.open() as u64, self.peers.connect_failures)
    }

    /// Connects started before `deadline` and still unfinished.
    pub(super) fn connects_older_than(&self, deadline: Instant, out: &mut Vec<ConnId>) {
        self.peers.connects_older_than(deadline, out);
    }

    /// Closes peer connection `id` from the client's side (its data connection closed);
    /// `true` if it was still open (the core is then told).
    pub(super) fn close_peer_from_client(&mut self, id: ConnId) -> bool {
        self.peers.take(&self.registry, id).is_some()
    }

    /// Peer connection `id`, waiting for its ConnectionBind, is bound to client connection
    /// `ci` (RFC 6062 §5.4); its slot, or `None` if it is not waiting.
    pub(super) fn bind_peer(&mut self, id: ConnId, ci: usize) -> Option<usize> {
        let slot = self.peers.slot_of(id)?;
        let p = self.peers.get_mut(slot)?;
        if p.state != PeerState::Waiting {
            return None;
        }
        p.state = PeerState::Bound(ci);
        Some(slot)
    }

    /// Peers connecting to TCP relay listener `relay` (RFC 6062 §5.3), each offered to
    /// `core`, which refuses it (no permission, over the limit: the socket closes) or
    /// names it.
    pub(super) fn accept_peers(&mut self, relay: RelayId, core: &mut Server, now: Now) -> Accepted {
        for _ in 0..ACCEPT_BATCH {
            let Some((l, _)) = self.tcp_listener(relay) else {
                return Accepted::Done;
            };
            let (sock, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Done,
                Err(e) => {
                    tracing::debug!(error = %e, "TCP relay accept failed");
                    return Accepted::Retry;
                }
            };
            let _ = sock.set_nodelay(true);
            if let Some(id) = core.tcp_peer_accepted(now, relay, peer) {
                if let Err(e) =
                    self.peers
                        .add_mio(&self.registry, sock, id, relay, PeerState::Waiting)
                {
                    tracing::debug!(error = %e, "TCP relay peer registration failed");
                    core.tcp_conn_closed(id);
                }
            }
        }
        Accepted::More
    }

    /// The connect of peer connection `id` ended (RFC 6062 §5.2): `core` answers the
    /// client's Connect; the connection waits for its ConnectionBind, or goes.
    pub(super) fn connect_done(&mut self, core: &mut Server, id: ConnId, ok: bool, now: Now) {
        let keep = core.tcp_connect_done(now, id, ok);
        match self.peers.slot_of(id).and_then(|s| self.peers.get_mut(s)) {
            Some(p) if keep && ok => p.state = PeerState::Waiting,
            Some(_) => drop(self.peers.take(&self.registry, id)),
            None => {}
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
        let mut sock =
            UdpSocket::from_std(socket::relay_socket(addr, self.buffer_bytes, self.udp_gro)?);
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
            let state = PeerState::connecting();
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

/// Frames peer datagram `slot[at..at + len]` from `from` in place for its client: a
/// ChannelData header before it, padded to 4 bytes over a stream (RFC 8656 §12.4, §12.5),
/// or a Data indication around it (§11.4) with transaction id `txid`. The frame's range in
/// `slot`; `None` if no STUN message can carry it (over 65504 bytes from an IPv6 peer).
#[inline]
pub(super) fn frame_for_client(
    slot: &mut [u8],
    at: usize,
    len: usize,
    channel: Option<ChannelNumber>,
    stream: bool,
    from: SocketAddr,
    txid: [u8; 12],
) -> Option<Range<usize>> {
    let Some(ch) = channel else {
        return write_data_indication(slot, at, len, from, txid);
    };
    // A UDP payload always fits 16 bits (the slot holds at most 65536).
    write_channel_data_header(&mut slot[at - CHANNEL_DATA_HEADER..at], ch, len as u16);
    let mut end = at + len;
    if stream {
        let pad = (4 - len % 4) % 4;
        slot[end..end + pad].fill(0);
        end += pad;
    }
    Some(at - CHANNEL_DATA_HEADER..end)
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
    use super::{admit, Dir, RelayCap};
    use crate::net::stats::NetStats;
    use crate::usage::UserCaps;
    use std::time::Instant;

    /// A packet the user's cap drops leaves the relay's own bucket as it was (and the
    /// reverse), in both directions.
    #[test]
    fn a_drop_by_one_cap_spends_nothing_of_the_other() {
        let now = Instant::now();
        let users = UserCaps::default();
        users.set_rate(1000);
        let user = users.get("u").unwrap();
        for dir in [Dir::ToPeer, Dir::ToClient] {
            let mut cap = RelayCap::new(10_000, now);
            let mut stats = NetStats::default();
            let bucket = |c: &mut Option<RelayCap>| {
                let c = c.as_mut().unwrap();
                match dir {
                    Dir::ToPeer => c.to_peer.available(now),
                    Dir::ToClient => c.to_client.available(now),
                }
            };
            // The user's one second of burst (1000 bytes) passes both caps.
            assert!(admit(&mut cap, Some(&user), dir, 1000, now, &mut stats));
            assert_eq!(bucket(&mut cap), 9000.0);
            // The user's cap is spent: dropped, and the relay's bucket keeps its tokens.
            assert!(!admit(&mut cap, Some(&user), dir, 1000, now, &mut stats));
            assert_eq!(stats.drop_user_bandwidth, 1);
            assert_eq!(bucket(&mut cap), 9000.0);
            // Over the relay's bucket: dropped by it.
            assert!(!admit(&mut cap, None, dir, 9001, now, &mut stats));
            assert_eq!(stats.drop_bandwidth, 1);
            assert_eq!(bucket(&mut cap), 9000.0);
        }
    }

    #[test]
    fn rate_zero_is_no_cap() {
        assert!(RelayCap::new(0, Instant::now()).is_none());
        assert!(RelayCap::new(1000, Instant::now()).is_some());
    }
}
