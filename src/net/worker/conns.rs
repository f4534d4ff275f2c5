//! TURN over TCP and TLS (RFC 8656 §3.1) for one worker: its TCP/TLS listeners, accepting
//! within the per-IP limit, the table of client connections (by slot, the mio token, and
//! by 5-tuple), framing client input through [`Inbound`], write queues, idle timeout.
//!
//! Owns: the listeners, every client connection and both indexes, kept in step by
//! [`Conns::take`] and the methods that insert. Must not: call the core except through
//! [`Inbound`] and the caller's predicate, or close a connection's allocation or peer
//! connection itself: what reading a connection or closing one means for the core and
//! for the relays is returned ([`Read`], the taken [`Conn`]) for the worker to apply.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use super::inbound::{Answer, Inbound};
use super::splice::{Client, Splice};
use super::token::{Tok, MAX_BATCHES_PER_TURN};
use crate::net::link::{is_tls_error, Link};
use crate::net::stats::NetStats;
use crate::net::tcp::{InBuf, IpPermit, OutBuf, PerIpLimit, MAX_FRAME};
use crate::stun::{classify, connection_bind_id, tcp_frame_len, Kind, CHANNEL_DATA_HEADER};
use crate::turn::{conn_shard, ConnId, FiveTuple, Now, Transport};

/// Peer data queued for a slow TCP client before further data is dropped.
const TCP_DATA_QUEUE: usize = 256 * 1024;
/// Queue size past which even a control response cannot be queued: the client is not
/// reading at all, so the connection is closed.
const TCP_HARD_QUEUE: usize = 1024 * 1024;
/// Client→peer bytes a spliced connection buffers (its InBuf); the peer→client side is
/// the client's OutBuf data limit ([`TCP_DATA_QUEUE`]). Past either, the reading side waits.
const SPLICE_QUEUE: usize = TCP_DATA_QUEUE;

/// What a TCP listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenMode {
    Plain,
    Tls,
    /// Plain TURN/TCP or TLS, told apart by the first byte (`turn.sniff_tls`).
    Sniff,
}

pub(super) struct Conn {
    sock: TcpStream,
    link: Link,
    opened: Instant,
    tuple: FiveTuple,
    inbuf: InBuf,
    out: OutBuf,
    /// Last message from the client, or (control connections) peer data sent to it, or
    /// (data connections) bytes spliced either way. The idle timeout runs from here for
    /// connections that are neither a control connection nor a bound data connection.
    last_message: Instant,
    dirty: bool,
    /// Set once this is an RFC 6062 client data connection carrying raw bytes (§5.4).
    splice: Option<Splice>,
    /// Already moved to another worker once: a legitimate data connection needs one move,
    /// so a client cannot bounce its connection between workers with forged IDs.
    handed_over: bool,
    /// This connection's slot in turn.tcp_max_per_ip. Released once it is bound as an
    /// RFC 6062 data connection: the allocation's turn.tcp_relay_max_connections (an
    /// authenticated quota) governs those, so one client can use its whole allowance.
    permit: Option<IpPermit>,
}

impl Conn {
    pub(super) fn tuple(&self) -> &FiveTuple {
        &self.tuple
    }

    /// The splice state of a data connection (RFC 6062 §5.4).
    pub(super) fn splice(&self) -> Option<&Splice> {
        self.splice.as_ref()
    }

    /// The connection leaves for another worker (`handover.rs`): it is nobody's dirty
    /// connection there, and may not move again.
    pub(super) fn hand_over(&mut self) {
        self.dirty = false;
        self.handed_over = true;
    }
}

/// What reading a client connection asks of the worker.
pub(super) enum Read {
    /// Read what there was; `true` if more may wait (fairness cap).
    Open(bool),
    /// Close it ([`Conns::close`]).
    Close(CloseReason),
    /// ConnectionBind succeeded: the rest of its InBuf is raw client data (RFC 6062 §5.4).
    Bind(ConnId),
    /// ConnectionBind for another worker's CONNECTION-ID: move the connection there.
    HandOver(usize),
}

/// Why a TCP connection is closed (counted, logged at debug).
#[derive(Clone, Copy, Debug)]
pub(super) enum CloseReason {
    Eof,
    Error,
    Garbage,
    Idle,
    Backlog,
    TlsError,
    HandshakeTimeout,
}

/// Settings of a worker's TCP/TLS side.
pub(super) struct ConnParams {
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) handshake_timeout: Duration,
    pub(super) idle: Duration,
    pub(super) per_ip: PerIpLimit,
}

/// A worker's TCP/TLS listeners and client connections.
pub(super) struct Conns {
    registry: Registry,
    p: ConnParams,
    listeners: Vec<(SocketAddr, TcpListener, ListenMode)>,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_tuple: HashMap<FiveTuple, usize>,
    /// Connections with queued output, flushed by [`Self::flush_dirty`].
    dirty: Vec<usize>,
    /// accept() failed (e.g. out of file descriptors): retry at the next housekeeping
    /// instead of spinning.
    accept_retry: bool,
}

impl Conns {
    pub(super) fn new(registry: Registry, p: ConnParams) -> Conns {
        Conns {
            registry,
            p,
            listeners: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_tuple: HashMap::new(),
            dirty: Vec::new(),
            accept_retry: false,
        }
    }

    /// Registers `l`, bound to `addr`, as the next listener.
    pub(super) fn add_listener(
        &mut self,
        addr: SocketAddr,
        l: std::net::TcpListener,
        mode: ListenMode,
    ) -> io::Result<()> {
        let mut t = TcpListener::from_std(l);
        let tok = Tok::TcpListener(self.listeners.len()).token();
        self.registry.register(&mut t, tok, Interest::READABLE)?;
        self.listeners.push((addr, t, mode));
        Ok(())
    }

    pub(super) fn tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.p.tls.as_ref()
    }

    pub(super) fn get(&self, ci: usize) -> Option<&Conn> {
        self.slots.get(ci).and_then(Option::as_ref)
    }

    /// Whether `ci` is an RFC 6062 data connection carrying raw bytes.
    pub(super) fn is_spliced(&self, ci: usize) -> bool {
        self.get(ci).is_some_and(|c| c.splice.is_some())
    }

    /// Client connection `ci` spliced: its state and its side of the splice.
    pub(super) fn spliced(&mut self, ci: usize) -> Option<(&mut Splice, Client<'_>)> {
        let c = self.slots.get_mut(ci)?.as_mut()?;
        let sp = c.splice.as_mut()?;
        Some((
            sp,
            Client {
                sock: &mut c.sock,
                link: &mut c.link,
                inbuf: &mut c.inbuf,
                out: &mut c.out,
                last_message: &mut c.last_message,
            },
        ))
    }

    /// `ci` becomes the data connection spliced to peer connection `id` in peer slot
    /// `peer` (RFC 6062 §5.4): its per-IP permit goes, its InBuf holds a splice's worth.
    pub(super) fn bind(&mut self, ci: usize, id: ConnId, peer: usize) {
        if let Some(c) = self.slots.get_mut(ci).and_then(Option::as_mut) {
            c.permit = None;
            c.inbuf.set_max(SPLICE_QUEUE);
            c.dirty = false;
            c.splice = Some(Splice::new(id, peer));
        }
    }

    /// A free slot with `sock` registered under its token (the slot is free again on
    /// error).
    fn register(&mut self, sock: &mut TcpStream) -> io::Result<usize> {
        let ci = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let tok = Tok::Conn(ci).token();
        if let Err(e) = self
            .registry
            .register(sock, tok, Interest::READABLE | Interest::WRITABLE)
        {
            self.free.push(ci);
            return Err(e);
        }
        Ok(ci)
    }

    /// Files `c` (accepted, or handed over by another worker) in both indexes.
    fn insert(&mut self, ci: usize, c: Conn) {
        self.by_tuple.insert(c.tuple, ci);
        self.slots[ci] = Some(c);
    }

    /// A connection another worker handed over, registered here; its slot.
    pub(super) fn adopt(&mut self, mut c: Conn) -> io::Result<usize> {
        let ci = self.register(&mut c.sock)?;
        self.insert(ci, c);
        Ok(ci)
    }

    /// Removes connection `ci` from both indexes and the poll (its socket goes with the
    /// result).
    pub(super) fn take(&mut self, ci: usize) -> Option<Conn> {
        let mut c = self.slots.get_mut(ci).and_then(Option::take)?;
        let _ = self.registry.deregister(&mut c.sock);
        self.by_tuple.remove(&c.tuple);
        self.free.push(ci);
        Some(c)
    }

    /// [`Self::take`], counted by `reason`. What the connection was to the core (an
    /// allocation's control connection, or a data connection with its peer) is the
    /// caller's to end.
    pub(super) fn close(
        &mut self,
        ci: usize,
        reason: CloseReason,
        stats: &mut NetStats,
    ) -> Option<Conn> {
        let c = self.take(ci)?;
        match reason {
            CloseReason::Garbage => stats.tcp_closed_garbage += 1,
            CloseReason::Idle => stats.tcp_closed_idle += 1,
            CloseReason::Backlog => stats.tcp_closed_backlog += 1,
            CloseReason::TlsError => stats.tls_closed_error += 1,
            CloseReason::HandshakeTimeout => stats.tls_closed_handshake_timeout += 1,
            CloseReason::Eof | CloseReason::Error => {}
        }
        tracing::debug!(client = %c.tuple.client, ?reason, "TCP connection closed");
        Some(c)
        // The socket and the per-IP permit go with the caller's `c`.
    }

    fn mark_dirty(&mut self, ci: usize) {
        if let Some(c) = self.slots.get_mut(ci).and_then(Option::as_mut) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(ci);
            }
        }
    }

    /// Writes out the connections with queued output; those that failed go to `failed`
    /// (the caller closes them).
    #[inline]
    pub(super) fn flush_dirty(&mut self, failed: &mut Vec<usize>) {
        while let Some(ci) = self.dirty.pop() {
            if let Some(c) = self.slots.get_mut(ci).and_then(Option::as_mut) {
                c.dirty = false;
                if c.link.flush(&mut c.sock, &mut c.out).is_err() {
                    failed.push(ci);
                }
            }
        }
    }

    /// Queues peer data `frame` for stream client `to` (flushed by [`Self::flush_dirty`]),
    /// counted in `stats`.
    #[inline]
    pub(super) fn push_data(
        &mut self,
        to: &FiveTuple,
        frame: &[u8],
        now: Instant,
        stats: &mut NetStats,
    ) {
        let Some((ci, conn)) = self
            .by_tuple
            .get(to)
            .and_then(|&ci| self.slots[ci].as_mut().map(|c| (ci, c)))
        else {
            stats.drop_send_error += 1;
            return;
        };
        let len = frame.len() as u64;
        if !conn.out.push_data(frame) {
            stats.drop_tcp_queue_full += 1;
            return;
        }
        // A client that only receives is not idle (its allocation's lifetime governs it).
        conn.last_message = now;
        if to.transport == Transport::Tls {
            stats.peer_to_client_tls_packets += 1;
            stats.peer_to_client_tls_bytes += len;
        } else {
            stats.peer_to_client_tcp_packets += 1;
            stats.peer_to_client_tcp_bytes += len;
        }
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(ci);
        }
    }

    /// Queues a message the core made outside a request (RFC 6062 §5.2/§5.3) for control
    /// connection `to`; `Some(ci)` if its queue is past the hard limit (the caller closes it).
    pub(super) fn send_control(&mut self, to: &FiveTuple, msg: &[u8]) -> Option<usize> {
        let ci = *self.by_tuple.get(to)?;
        let c = self.slots.get_mut(ci).and_then(Option::as_mut)?;
        if c.splice.is_some() {
            // Never STUN into a raw byte stream.
            return None;
        }
        if !c.out.push_control(msg) {
            return Some(ci);
        }
        self.mark_dirty(ci);
        None
    }

    /// Takes (and clears) the accept-failed flag: the caller retries every listener.
    pub(super) fn take_accept_retry(&mut self) -> bool {
        std::mem::take(&mut self.accept_retry)
    }

    pub(super) fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// New TCP clients on listener `li`, within the per-IP limit. `true` if more may wait.
    pub(super) fn accept(&mut self, li: usize, now: Now, stats: &mut NetStats) -> bool {
        for _ in 0..256 {
            let Some((server, l, mode)) = self.listeners.get(li) else {
                return false;
            };
            let (server, mode) = (*server, *mode);
            let (mut sock, client) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // EMFILE and friends: try again a little later rather than spin.
                    tracing::debug!(error = %e, "TCP accept failed");
                    self.accept_retry = true;
                    return false;
                }
            };
            let Some(permit) = self.p.per_ip.try_acquire(client.ip()) else {
                stats.tcp_rejected_per_ip += 1;
                tracing::debug!(%client, "TCP connection refused: turn.tcp_max_per_ip reached");
                continue;
            };
            let _ = sock.set_nodelay(true);
            let (link, transport) = match (mode, &self.p.tls) {
                (ListenMode::Tls, Some(cfg)) => match Link::tls(cfg) {
                    Ok(l) => (l, Transport::Tls),
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS session setup failed");
                        continue;
                    }
                },
                // A sniffed connection is filed as TCP until its first byte says otherwise.
                (ListenMode::Sniff, Some(_)) => (Link::Sniff, Transport::Tcp),
                _ => (Link::Plain, Transport::Tcp),
            };
            // The address the client reached (the listener may be a wildcard).
            let server = sock.local_addr().unwrap_or(server);
            let ci = match self.register(&mut sock) {
                Ok(ci) => ci,
                Err(e) => {
                    tracing::debug!(error = %e, "TCP register failed");
                    continue;
                }
            };
            let tuple = FiveTuple {
                transport,
                client,
                server,
            };
            stats.tcp_accepted += 1;
            self.insert(
                ci,
                Conn {
                    sock,
                    link,
                    opened: now.mono,
                    tuple,
                    inbuf: InBuf::default(),
                    out: OutBuf::new(TCP_DATA_QUEUE, TCP_HARD_QUEUE),
                    last_message: now.mono,
                    dirty: false,
                    splice: None,
                    handed_over: false,
                    permit: Some(permit),
                },
            );
        }
        true
    }

    /// Writes what `ci` has queued; `false` if the connection failed (the caller closes it).
    pub(super) fn writable(&mut self, ci: usize) -> bool {
        match self.slots.get_mut(ci).and_then(Option::as_mut) {
            Some(c) => c.link.flush(&mut c.sock, &mut c.out).is_ok(),
            None => true,
        }
    }

    /// Frames from client `ci` (not spliced): first those already buffered (a handed-over
    /// connection arrives with its ConnectionBind unread), then what the socket has.
    /// `shard` is this worker's index and `workers` their number (RFC 6062 §5.4: a
    /// ConnectionBind belongs to the worker that issued its CONNECTION-ID).
    pub(super) fn read(
        &mut self,
        ci: usize,
        cx: &mut Inbound<'_>,
        shard: usize,
        workers: usize,
        now: Now,
    ) -> Read {
        let mut stop = None;
        let mut more = true;
        for turn in 0..=MAX_BATCHES_PER_TURN {
            let Some(conn) = self.slots.get_mut(ci).and_then(Option::as_mut) else {
                return Read::Open(false);
            };
            loop {
                let data = conn.inbuf.data();
                let n = match tcp_frame_len(data) {
                    Ok(None) => break,
                    Ok(Some(n)) if n > MAX_FRAME || n == 0 => {
                        stop = Some(Read::Close(CloseReason::Garbage));
                        break;
                    }
                    Ok(Some(n)) if n > data.len() => break,
                    Ok(Some(n)) => n,
                    Err(_) => {
                        stop = Some(Read::Close(CloseReason::Garbage));
                        break;
                    }
                };
                let frame = &data[..n];
                conn.last_message = now.mono;
                match classify(frame) {
                    Kind::ChannelData { channel, len } => {
                        let payload = &frame[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
                        // SAFETY: `inbuf` is neither refilled nor compacted before the
                        // flush after this frame loop.
                        unsafe { cx.channel_data(&conn.tuple, channel, payload, now.mono) };
                    }
                    Kind::Stun => {
                        // A control connection's own requests stay here.
                        let foreign = connection_bind_id(frame)
                            .map(conn_shard)
                            .filter(|&t| t != shard && t < workers);
                        if let Some(target) = foreign.filter(|_| !conn.handed_over) {
                            if !cx.core.has_allocation(&conn.tuple) {
                                stop = Some(Read::HandOver(target));
                                break;
                            }
                        }
                        // SAFETY: as above.
                        match unsafe { cx.stun(now, conn.tuple, frame) } {
                            None => {}
                            Some(Answer::Reply(len)) => {
                                let queued = conn.out.push_control(&cx.out[..len]);
                                if !queued {
                                    stop = Some(Read::Close(CloseReason::Backlog));
                                }
                            }
                            Some(Answer::Bind(id, len)) => {
                                stop = Some(if conn.out.push_control(&cx.out[..len]) {
                                    Read::Bind(id)
                                } else {
                                    Read::Close(CloseReason::Backlog)
                                });
                            }
                        }
                    }
                    Kind::Invalid => {
                        cx.stats.drop_invalid += 1;
                        stop = Some(Read::Close(CloseReason::Garbage));
                    }
                }
                match stop {
                    // The ConnectionBind itself is consumed; what follows is raw data.
                    Some(Read::Bind(_)) => {
                        conn.inbuf.consume(n);
                        break;
                    }
                    Some(_) => break,
                    None => conn.inbuf.consume(n),
                }
            }
            cx.to_peer.flush(cx.stats);
            if stop.is_some() {
                break;
            }
            if conn.link.flush(&mut conn.sock, &mut conn.out).is_err() {
                stop = Some(Read::Close(CloseReason::Error));
                break;
            }
            if turn == MAX_BATCHES_PER_TURN {
                break;
            }
            let was_sniffing = matches!(conn.link, Link::Sniff);
            let was_handshaking = conn.link.handshaking();
            let filled = conn
                .link
                .fill(&mut conn.sock, &mut conn.inbuf, self.p.tls.as_ref());
            if was_sniffing && conn.link.is_tls() {
                // The sniffed first byte opened TLS: the 5-tuple's transport says so.
                self.by_tuple.remove(&conn.tuple);
                conn.tuple.transport = Transport::Tls;
                self.by_tuple.insert(conn.tuple, ci);
            }
            if was_handshaking && conn.link.is_tls() && !conn.link.handshaking() {
                cx.stats.tls_handshakes += 1;
            }
            let reason = match filled {
                Ok(0) => CloseReason::Eof,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_tls_error(&e) => {
                    tracing::debug!(client = %conn.tuple.client, error = %e, "TLS error");
                    CloseReason::TlsError
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => CloseReason::Garbage,
                Err(_) => CloseReason::Error,
            };
            stop = Some(Read::Close(reason));
            break;
        }
        if stop.is_none() {
            // TLS handshake records produced by the last read wait for no frame.
            if let Some(conn) = self.slots.get_mut(ci).and_then(Option::as_mut) {
                if conn.link.flush(&mut conn.sock, &mut conn.out).is_err() {
                    stop = Some(Read::Close(CloseReason::Error));
                }
            }
        }
        stop.unwrap_or(Read::Open(more))
    }

    /// Housekeeping: the connections to close (into `out`): handshakes past
    /// `turn.tls_handshake_timeout`, and idle ones that are neither an allocation's control
    /// connection (`has_allocation`) nor a bound data connection. The others' queues grown
    /// by a burst go back to the allocator once drained.
    pub(super) fn expired(
        &mut self,
        now: Instant,
        has_allocation: impl Fn(&FiveTuple) -> bool,
        out: &mut Vec<(usize, CloseReason)>,
    ) {
        for (ci, slot) in self.slots.iter_mut().enumerate() {
            let Some(c) = slot.as_mut() else {
                continue;
            };
            // A handshake (or a sniffed first byte) gets handshake_timeout, however
            // slowly its bytes trickle in.
            if c.link.handshaking()
                && now.saturating_duration_since(c.opened) >= self.p.handshake_timeout
            {
                out.push((ci, CloseReason::HandshakeTimeout));
            } else if now.saturating_duration_since(c.last_message) >= self.p.idle
                // An allocation's control connection lives as long as the allocation (its
                // lifetime and Refresh govern it): an RFC 6062 client may send nothing on
                // it for minutes while its data connections carry the traffic. A bound data
                // connection is an application's TCP stream, quiet as long as it likes: it
                // ends with its peer or its allocation (RFC 6062 §5.5).
                && !has_allocation(&c.tuple)
                && c.splice.is_none()
            {
                out.push((ci, CloseReason::Idle));
            } else {
                c.inbuf.trim();
                c.out.trim();
            }
        }
    }
}
