//! The relay sockets of one worker's allocations (opened and closed by its shard through
//! [`RelayIo`]): UDP relay sockets, RFC 6062 TCP relay listeners and their peer
//! connections (`peers.rs`), and the batch that sends client→peer datagrams.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Registry};

use super::peers::Peers;
use super::{token, INDEX_MASK, K_RELAY};
use crate::net::mmsg::SendBatch;
use crate::net::socket;
use crate::net::stats::NetStats;
use crate::turn::{ConnId, RelayId, RelayIo, RelayUsage, Transport};

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
    usage: RelayUsage,
    /// `turn.max_bytes_per_sec` budgets: client→peer, peer→client.
    to_peer: ByteBucket,
    to_client: ByteBucket,
}

impl RelaySock {
    fn new(kind: RelayKind) -> RelaySock {
        RelaySock {
            kind,
            usage: RelayUsage::default(),
            to_peer: ByteBucket::default(),
            to_client: ByteBucket::default(),
        }
    }
}

/// A token bucket in bytes for one direction of one relayed address (`turn.max_bytes_per_sec`,
/// coturn's `max-bps`): refills at `rate` bytes/s and holds at most one second's worth, so
/// short bursts pass and the average stays at the cap. Plain integers: no allocation, no lock.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ByteBucket {
    tokens: u64,
    last: Option<Instant>,
}

impl ByteBucket {
    /// Bytes that may pass now at `rate` (0: no cap, `u64::MAX`).
    pub(super) fn available(&mut self, rate: u64, now: Instant) -> u64 {
        if rate == 0 {
            return u64::MAX;
        }
        match self.last {
            None => {
                self.tokens = rate;
                self.last = Some(now);
            }
            Some(last) => {
                let add = u128::from(rate) * now.saturating_duration_since(last).as_nanos()
                    / 1_000_000_000;
                // The clock moves on only once a whole byte is earned, so calls closer
                // together than a byte's worth of time still add up.
                if add > 0 {
                    self.tokens = (u128::from(self.tokens) + add).min(u128::from(rate)) as u64;
                    self.last = Some(now);
                }
            }
        }
        self.tokens
    }

    /// Spends `n` bytes (what was actually moved; at most what `available` said).
    pub(super) fn spend(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// Takes `n` bytes if they may pass now.
    pub(super) fn take(&mut self, n: u64, rate: u64, now: Instant) -> bool {
        if self.available(rate, now) < n {
            return false;
        }
        if rate != 0 {
            self.spend(n);
        }
        true
    }
}

/// The budgets of relay `id` (client→peer, peer→client) at `now`, `u64::MAX` without a cap.
/// A free function over the socket table so the splice can hold a peer connection (in
/// `Relays::peers`) at the same time.
pub(super) fn bandwidth_budget(
    socks: &mut [Option<RelaySock>],
    id: RelayId,
    rate: u64,
    now: Instant,
) -> (u64, u64) {
    match socks.get_mut(id.0 as usize).and_then(Option::as_mut) {
        Some(s) => (
            s.to_peer.available(rate, now),
            s.to_client.available(rate, now),
        ),
        None => (0, 0),
    }
}

/// Spends what a splice moved from relay `id`'s budgets.
pub(super) fn bandwidth_spend(
    socks: &mut [Option<RelaySock>],
    id: RelayId,
    to_peer: u64,
    to_client: u64,
) {
    if let Some(s) = socks.get_mut(id.0 as usize).and_then(Option::as_mut) {
        s.to_peer.spend(to_peer);
        s.to_client.spend(to_client);
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
    /// `turn.max_bytes_per_sec` (0: no cap); a reload changes it.
    pub(super) max_bytes_per_sec: u64,
}

impl Relays {
    pub(super) fn fd(&self, id: RelayId) -> Option<RawFd> {
        match &self.socks.get(id.0 as usize)?.as_ref()?.kind {
            RelayKind::Udp(s) => Some(s.as_raw_fd()),
            RelayKind::Tcp { .. } => None,
        }
    }

    /// Whether relay `id` is an RFC 6062 TCP relay listener.
    pub(super) fn is_tcp(&self, id: RelayId) -> bool {
        self.socks
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| matches!(s.kind, RelayKind::Tcp { .. }))
    }

    /// The TCP relay listener of `id` and its address.
    pub(super) fn tcp_listener(&self, id: RelayId) -> Option<(&TcpListener, SocketAddr)> {
        match &self.socks.get(id.0 as usize)?.as_ref()?.kind {
            RelayKind::Tcp { listener, addr } => Some((listener, *addr)),
            RelayKind::Udp(_) => None,
        }
    }

    /// The socket to send `len` payload bytes to a peer from, counting them for the
    /// allocation's log line. `Err(true)` when the relay's bandwidth cap drops the datagram
    /// (the caller counts it), `Err(false)` when `id` is not a UDP relay.
    pub(super) fn peer_send_fd(
        &mut self,
        id: RelayId,
        len: usize,
        now: Instant,
    ) -> Result<RawFd, bool> {
        let s = self
            .socks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(false)?;
        let RelayKind::Udp(sock) = &s.kind else {
            return Err(false);
        };
        if !s.to_peer.take(len as u64, self.max_bytes_per_sec, now) {
            return Err(true);
        }
        s.usage.to_peer_bytes += len as u64;
        s.usage.to_peer_packets += 1;
        Ok(sock.as_raw_fd())
    }

    /// Whether `len` bytes from a peer may go to the client of relay `id` now (its
    /// bandwidth cap).
    pub(super) fn allow_to_client(&mut self, id: RelayId, len: usize, now: Instant) -> bool {
        let rate = self.max_bytes_per_sec;
        self.socks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .is_some_and(|s| s.to_client.take(len as u64, rate, now))
    }

    /// Counts bytes spliced from a client data connection to a peer of TCP relay `id`.
    pub(super) fn count_to_peer(&mut self, id: RelayId, bytes: u64, chunks: u64) {
        if let Some(s) = self.socks.get_mut(id.0 as usize).and_then(Option::as_mut) {
            s.usage.to_peer_bytes += bytes;
            s.usage.to_peer_packets += chunks;
        }
    }

    fn slot(&mut self) -> io::Result<usize> {
        match self.free.pop() {
            Some(i) => Ok(i as usize),
            None => {
                if self.socks.len() > INDEX_MASK {
                    return Err(io::Error::other("too many relay sockets in one worker"));
                }
                self.socks.push(None);
                Ok(self.socks.len() - 1)
            }
        }
    }

    /// Counts payload relayed from peers to the client of relay `id`.
    pub(super) fn count_to_client(&mut self, id: RelayId, bytes: u64, packets: u64) {
        if let Some(s) = self.socks.get_mut(id.0 as usize).and_then(Option::as_mut) {
            s.usage.to_client_bytes += bytes;
            s.usage.to_client_packets += packets;
        }
    }
}

impl RelayIo for Relays {
    fn open_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut sock = UdpSocket::from_std(socket::relay_socket(addr, self.buffer_bytes)?);
        let idx = self.slot()?;
        if let Err(e) = self
            .registry
            .register(&mut sock, token(K_RELAY, idx), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(RelaySock::new(RelayKind::Udp(sock)));
        Ok(RelayId(idx as u32))
    }

    fn close_relay(&mut self, relay: RelayId) {
        let idx = relay.0 as usize;
        if let Some(s) = self.socks.get_mut(idx).and_then(Option::take) {
            let _ = match s.kind {
                RelayKind::Udp(mut u) => self.registry.deregister(&mut u),
                RelayKind::Tcp { mut listener, .. } => self.registry.deregister(&mut listener),
            };
            self.free.push(relay.0);
        }
    }

    fn open_tcp_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut listener =
            TcpListener::from_std(socket::tcp_relay_listener(addr, self.buffer_bytes)?);
        let addr = listener.local_addr()?;
        let idx = self.slot()?;
        if let Err(e) =
            self.registry
                .register(&mut listener, token(K_RELAY, idx), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(RelaySock::new(RelayKind::Tcp { listener, addr }));
        Ok(RelayId(idx as u32))
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

    fn close_tcp_conn(&mut self, conn: ConnId) {
        self.peers.close_by_core(&self.registry, conn);
    }

    fn usage(&self, relay: RelayId) -> RelayUsage {
        self.socks
            .get(relay.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.usage)
            .unwrap_or_default()
    }
}

/// Client→peer datagrams for one relay socket at a time, sent with one sendmmsg.
pub(super) struct PeerBatch {
    pub(super) batch: SendBatch,
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
    use super::ByteBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn byte_bucket_holds_one_second_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = ByteBucket::default();
        assert!(b.take(600, 1000, t0));
        assert!(b.take(400, 1000, t0));
        assert!(!b.take(1, 1000, t0), "the one-second burst is spent");
        // Half a second earns 500 bytes; fractions of a byte are kept for later.
        assert!(!b.take(501, 1000, t0 + Duration::from_millis(500)));
        assert!(b.take(500, 1000, t0 + Duration::from_millis(500)));
        assert_eq!(b.available(1000, t0 + Duration::from_micros(500_999)), 0);
        assert_eq!(b.available(1000, t0 + Duration::from_millis(502)), 2);
        // A long pause refills to one second's worth, not more.
        assert_eq!(b.available(1000, t0 + Duration::from_secs(60)), 1000);
        // Rate 0 is no cap.
        let mut free = ByteBucket::default();
        assert!(free.take(u64::MAX / 2, 0, t0));
        assert_eq!(free.available(0, t0), u64::MAX);
    }
}
