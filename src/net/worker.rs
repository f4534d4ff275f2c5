//! One worker thread: a mio event loop owning its listener sockets (shared with the other
//! workers through SO_REUSEPORT), its TCP client connections, its [`Shard`] of the TURN
//! state and the relay sockets of that shard's allocations. Nothing here is shared with other
//! workers on the data path (DESIGN.md principle 2).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Registry, Token};

use super::link::{is_tls_error, Link};
use super::mmsg::{RecvBatch, SendBatch};
use super::shard::{Shard, OUT_LEN};
use super::socket::{self, ListenerPair};
use super::stats::{NetStats, WorkerStats};
use super::tcp::{InBuf, IpPermit, OutBuf, PerIpLimit, MAX_FRAME};
use crate::stun::{
    classify, tcp_frame_len, write_channel_data_header, write_data_indication, Kind,
    CHANNEL_DATA_HEADER, DATA_INDICATION_HEADROOM,
};
use crate::turn::{Action, FiveTuple, Now, RelayId, RelayIo, Transport};

/// Datagrams per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// Largest UDP payload we receive (a full-size datagram: nothing is ever truncated).
const MAX_DATAGRAM: usize = 65536;
/// Free bytes kept after a received peer payload: ChannelData padding over TCP (RFC 8656
/// §12.5) or the attribute padding and FINGERPRINT after a Data indication's DATA.
const TAIL_ROOM: usize = 16;
/// Batches read from one socket before the loop looks at other sockets (fairness).
const MAX_BATCHES_PER_TURN: usize = 16;
/// Peer data queued for a slow TCP client before further data is dropped.
const TCP_DATA_QUEUE: usize = 256 * 1024;
/// Queue size past which even a control response cannot be queued: the client is not
/// reading at all, so the connection is closed.
const TCP_HARD_QUEUE: usize = 1024 * 1024;
/// How often idle TCP connections are looked for and stats published.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

const KIND_SHIFT: u32 = 28;
const INDEX_MASK: usize = (1 << KIND_SHIFT) - 1;
const K_WAKER: usize = 0;
const K_UDP: usize = 1;
const K_TCP_LISTENER: usize = 2;
const K_CONN: usize = 3;
const K_RELAY: usize = 4;

/// The token that wakes a worker for shutdown.
pub const WAKER: Token = Token(K_WAKER << KIND_SHIFT);

fn token(kind: usize, index: usize) -> Token {
    Token((kind << KIND_SHIFT) | index)
}

/// The relay sockets of this worker's allocations; the shard opens and closes them.
pub struct Relays {
    registry: Registry,
    socks: Vec<Option<UdpSocket>>,
    free: Vec<u32>,
    buffer_bytes: usize,
}

impl Relays {
    fn fd(&self, id: RelayId) -> Option<RawFd> {
        self.socks
            .get(id.0 as usize)
            .and_then(|s| s.as_ref())
            .map(|s| s.as_raw_fd())
    }
}

impl RelayIo for Relays {
    fn open_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut sock = UdpSocket::from_std(socket::relay_socket(addr, self.buffer_bytes)?);
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                if self.socks.len() > INDEX_MASK {
                    return Err(io::Error::other("too many relay sockets in one worker"));
                }
                self.socks.push(None);
                self.socks.len() - 1
            }
        };
        if let Err(e) = self
            .registry
            .register(&mut sock, token(K_RELAY, idx), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(sock);
        Ok(RelayId(idx as u32))
    }

    fn close_relay(&mut self, relay: RelayId) {
        let idx = relay.0 as usize;
        if let Some(mut s) = self.socks.get_mut(idx).and_then(Option::take) {
            let _ = self.registry.deregister(&mut s);
            self.free.push(relay.0);
        }
    }
}

/// Client→peer datagrams for one relay socket at a time, sent with one sendmmsg.
struct PeerBatch {
    batch: SendBatch,
    fd: RawFd,
    transport: Transport,
}

impl PeerBatch {
    /// Queues `data` to `peer` from relay socket `fd`, flushing first if the batch holds
    /// another socket's datagrams or is full.
    ///
    /// # Safety
    /// `data` must stay valid until the next [`Self::flush`].
    unsafe fn push(
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
        self.batch.push(data, peer);
    }

    fn flush(&mut self, stats: &mut NetStats) {
        if self.batch.is_empty() {
            return;
        }
        let f = self.batch.flush(self.fd);
        if self.transport == Transport::Udp {
            stats.client_to_peer_udp_packets += f.sent as u64;
            stats.client_to_peer_udp_bytes += f.sent_bytes as u64;
        } else {
            stats.client_to_peer_tcp_packets += f.sent as u64;
            stats.client_to_peer_tcp_bytes += f.sent_bytes as u64;
        }
        stats.drop_send_error += f.failed as u64;
    }
}

struct UdpListener {
    addr: SocketAddr,
    sock: UdpSocket,
    /// Peer→client datagrams leaving through this socket.
    out: SendBatch,
}

/// What a TCP listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenMode {
    Plain,
    Tls,
    /// Plain TURN/TCP or TLS, told apart by the first byte (`turn.sniff_tls`).
    Sniff,
}

struct Conn {
    sock: TcpStream,
    link: Link,
    opened: Instant,
    tuple: FiveTuple,
    inbuf: InBuf,
    out: OutBuf,
    last_message: Instant,
    dirty: bool,
    _permit: IpPermit,
}

/// Why a TCP connection is closed (counted, logged at debug).
#[derive(Clone, Copy, Debug)]
enum CloseReason {
    Eof,
    Error,
    Garbage,
    Idle,
    Backlog,
    TlsError,
    HandshakeTimeout,
}

/// Settings a worker starts with.
pub struct WorkerParams {
    pub index: usize,
    pub listeners: Vec<(SocketAddr, ListenerPair)>,
    /// TCP-only TURN over TLS listeners.
    pub tls_listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// TLS server state; `None` when no certificate is configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
    /// The plain TCP listeners also accept TLS (`turn.sniff_tls`).
    pub sniff_tls: bool,
    pub buffer_bytes: usize,
    pub tcp_idle: Duration,
    pub per_ip: PerIpLimit,
    pub stop: Arc<AtomicBool>,
    /// Where the worker publishes its counters (about twice a second).
    pub stats_out: Arc<Mutex<WorkerStats>>,
}

/// A worker's event loop state. Built and run on its own thread.
pub struct Worker<S: Shard> {
    index: usize,
    poll: Poll,
    shard: S,
    relays: Relays,
    udp: Vec<UdpListener>,
    tcp: Vec<(SocketAddr, TcpListener, ListenMode)>,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    conns: Vec<Option<Conn>>,
    free_conns: Vec<usize>,
    conn_by_tuple: HashMap<FiveTuple, usize>,
    dirty_conns: Vec<usize>,
    rx: RecvBatch,
    to_peer: PeerBatch,
    out: Box<[u8; OUT_LEN]>,
    txid_prefix: [u8; 4],
    txid_counter: u64,
    tcp_idle: Duration,
    per_ip: PerIpLimit,
    stop: Arc<AtomicBool>,
    stats: NetStats,
    stats_out: Arc<Mutex<WorkerStats>>,
    /// Sockets left readable after their turn (fairness cap), served on the next turn.
    pending: Vec<Token>,
    /// accept() failed (e.g. out of file descriptors): retry at the next housekeeping
    /// instead of spinning.
    accept_retry: bool,
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

impl<S: Shard> Worker<S> {
    /// Registers the listeners with `poll` (which already holds the shutdown waker).
    pub fn new(p: WorkerParams, poll: Poll, shard: S) -> io::Result<Worker<S>> {
        let registry = poll.registry().try_clone()?;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (i, (addr, pair)) in p.listeners.into_iter().enumerate() {
            let mut u = UdpSocket::from_std(pair.udp);
            registry.register(&mut u, token(K_UDP, i), Interest::READABLE)?;
            udp.push(UdpListener {
                addr,
                sock: u,
                out: SendBatch::new(BATCH),
            });
            let mut t = TcpListener::from_std(pair.tcp);
            registry.register(&mut t, token(K_TCP_LISTENER, i), Interest::READABLE)?;
            let mode = if p.sniff_tls && p.tls.is_some() {
                ListenMode::Sniff
            } else {
                ListenMode::Plain
            };
            tcp.push((addr, t, mode));
        }
        for (addr, l) in p.tls_listeners {
            let mut t = TcpListener::from_std(l);
            registry.register(&mut t, token(K_TCP_LISTENER, tcp.len()), Interest::READABLE)?;
            tcp.push((addr, t, ListenMode::Tls));
        }
        let seed = rand::random::<u32>();
        Ok(Worker {
            index: p.index,
            relays: Relays {
                registry,
                socks: Vec::new(),
                free: Vec::new(),
                buffer_bytes: p.buffer_bytes,
            },
            poll,
            shard,
            udp,
            tcp,
            tls: p.tls,
            handshake_timeout: p.handshake_timeout,
            conns: Vec::new(),
            free_conns: Vec::new(),
            conn_by_tuple: HashMap::new(),
            dirty_conns: Vec::new(),
            rx: RecvBatch::new(BATCH, DATA_INDICATION_HEADROOM + MAX_DATAGRAM + TAIL_ROOM),
            to_peer: PeerBatch {
                batch: SendBatch::new(BATCH),
                fd: -1,
                transport: Transport::Udp,
            },
            out: Box::new([0u8; OUT_LEN]),
            txid_prefix: seed.to_be_bytes(),
            txid_counter: 0,
            tcp_idle: p.tcp_idle,
            per_ip: p.per_ip,
            stop: p.stop,
            stats: NetStats::default(),
            stats_out: p.stats_out,
            pending: Vec::new(),
            accept_retry: false,
        })
    }

    /// Runs until the stop flag is set and the waker fires.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        let mut pending = Vec::new();
        tracing::debug!(worker = self.index, "TURN worker started");
        while !self.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let mut deadline = next_housekeeping;
            if let Some(d) = self.shard.poll_timeout() {
                deadline = deadline.min(d);
            }
            let timeout = if self.pending.is_empty() {
                deadline.saturating_duration_since(t)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.index, error = %e, "poll failed; worker stops");
                    break;
                }
                continue;
            }
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = now();
            std::mem::swap(&mut pending, &mut self.pending);
            for ev in events.iter() {
                self.dispatch(ev.token(), ev.is_readable(), ev.is_writable(), now);
            }
            for tok in pending.drain(..) {
                self.dispatch(tok, true, false, now);
            }
            if self.shard.poll_timeout().is_some_and(|d| d <= now.mono) {
                self.shard.handle_timeout(now, &mut self.relays);
            }
            if now.mono >= next_housekeeping {
                self.close_idle(now.mono);
                if std::mem::take(&mut self.accept_retry) {
                    for li in 0..self.tcp.len() {
                        self.dispatch(token(K_TCP_LISTENER, li), true, false, now);
                    }
                }
                self.publish_stats();
                next_housekeeping = now.mono + HOUSEKEEPING;
            }
        }
        self.publish_stats();
        tracing::debug!(worker = self.index, "TURN worker stopped");
    }

    fn publish_stats(&self) {
        let mut s = self.stats_out.lock().unwrap_or_else(|p| p.into_inner());
        s.net = self.stats;
        if let Some(t) = self.shard.turn_stats() {
            s.turn.clone_from(t);
        }
    }

    fn dispatch(&mut self, tok: Token, readable: bool, writable: bool, now: Now) {
        let idx = tok.0 & INDEX_MASK;
        let more = match tok.0 >> KIND_SHIFT {
            K_UDP => self.udp_readable(idx, now),
            K_TCP_LISTENER => self.accept(idx, now),
            K_CONN => {
                if writable {
                    self.conn_writable(idx);
                }
                readable && self.conn_readable(idx, now)
            }
            K_RELAY => self.relay_readable(idx),
            _ => false,
        };
        if more && !self.pending.contains(&tok) {
            self.pending.push(tok);
        }
    }

    /// Client datagrams on UDP listener `li`: STUN to the shard, ChannelData straight out
    /// of the receive buffer through the allocation's relay socket. `true` if more may wait.
    fn udp_readable(&mut self, li: usize, now: Now) -> bool {
        let Some(l) = self.udp.get(li) else {
            return false;
        };
        let fd = l.sock.as_raw_fd();
        let server = l.addr;
        for _ in 0..MAX_BATCHES_PER_TURN {
            let n = match self.rx.recv(fd, 0, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP listener receive error");
                    return false;
                }
            };
            for i in 0..n {
                let r = self.rx.received(i);
                if r.truncated {
                    self.stats.drop_truncated += 1;
                    continue;
                }
                let from = FiveTuple {
                    transport: Transport::Udp,
                    client: r.from,
                    server,
                };
                let msg = self.rx.payload(i);
                match classify(msg) {
                    Kind::ChannelData { channel, len } => {
                        match self.shard.channel_to_peer(&from, channel) {
                            Some((relay, peer)) => {
                                if let Some(rfd) = self.relays.fd(relay) {
                                    let payload =
                                        &msg[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
                                    // SAFETY: `rx` is not received into again before the
                                    // flush at the end of this batch.
                                    unsafe {
                                        self.to_peer.push(
                                            rfd,
                                            Transport::Udp,
                                            payload,
                                            peer,
                                            &mut self.stats,
                                        )
                                    };
                                }
                            }
                            None => self.stats.drop_no_channel += 1,
                        }
                    }
                    Kind::Stun => {
                        match self.shard.handle_stun(
                            now,
                            from,
                            msg,
                            &mut self.out,
                            &mut self.relays,
                        ) {
                            Action::None => {}
                            Action::Reply(len) => {
                                if let Err(e) = self.udp[li].sock.send_to(&self.out[..len], r.from)
                                {
                                    self.stats.drop_send_error += 1;
                                    tracing::debug!(error = %e, "UDP response not sent");
                                }
                            }
                            Action::Forward {
                                relay,
                                peer,
                                payload,
                            } => {
                                if let (Some(rfd), Some(data)) =
                                    (self.relays.fd(relay), msg.get(payload))
                                {
                                    // SAFETY: as above.
                                    unsafe {
                                        self.to_peer.push(
                                            rfd,
                                            Transport::Udp,
                                            data,
                                            peer,
                                            &mut self.stats,
                                        )
                                    };
                                }
                            }
                        }
                    }
                    Kind::Invalid => self.stats.drop_invalid += 1,
                }
            }
            self.to_peer.flush(&mut self.stats);
            if n < BATCH {
                return false;
            }
        }
        true
    }

    fn next_txid(&mut self) -> [u8; 12] {
        self.txid_counter = self.txid_counter.wrapping_add(1);
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.txid_prefix);
        t[4..].copy_from_slice(&self.txid_counter.to_be_bytes());
        t
    }

    /// Peer datagrams on relay socket `ri`: framed in place (ChannelData header or Data
    /// indication before the payload) and batch-sent to the client. `true` if more may wait.
    fn relay_readable(&mut self, ri: usize) -> bool {
        let relay = RelayId(ri as u32);
        let Some(fd) = self.relays.fd(relay) else {
            return false;
        };
        for _ in 0..MAX_BATCHES_PER_TURN {
            let n = match self.rx.recv(fd, DATA_INDICATION_HEADROOM, TAIL_ROOM) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // ICMP errors surface here; the socket stays usable.
                    tracing::debug!(error = %e, "relay receive error");
                    return false;
                }
            };
            let at = self.rx.data_at();
            for i in 0..n {
                let r = self.rx.received(i);
                if r.truncated {
                    self.stats.drop_truncated += 1;
                    continue;
                }
                let Some(route) = self.shard.peer_to_client(relay, r.from) else {
                    self.stats.drop_no_permission += 1;
                    continue;
                };
                let stream = route.client.transport != Transport::Udp;
                let txid = if route.channel.is_none() {
                    self.next_txid()
                } else {
                    [0; 12]
                };
                let slot = self.rx.slot_mut(i);
                let frame: Range<usize> = match route.channel {
                    Some(ch) => {
                        write_channel_data_header(
                            &mut slot[at - CHANNEL_DATA_HEADER..at],
                            ch,
                            // A UDP payload always fits 16 bits (the slot holds at most 65536).
                            r.len as u16,
                        );
                        let mut end = at + r.len;
                        if stream {
                            // Over TCP a ChannelData frame is padded to 4 bytes (§12.5).
                            let pad = (4 - r.len % 4) % 4;
                            slot[end..end + pad].fill(0);
                            end += pad;
                        }
                        at - CHANNEL_DATA_HEADER..end
                    }
                    None => write_data_indication(slot, at, r.len, r.from, txid),
                };
                if !stream {
                    let Some(l) = self.udp.iter_mut().find(|l| l.addr == route.client.server)
                    else {
                        self.stats.drop_send_error += 1;
                        continue;
                    };
                    if l.out.is_full() {
                        let f = l.out.flush(l.sock.as_raw_fd());
                        self.stats.peer_to_client_udp_packets += f.sent as u64;
                        self.stats.peer_to_client_udp_bytes += f.sent_bytes as u64;
                        self.stats.drop_send_error += f.failed as u64;
                    }
                    // SAFETY: the slot is not written again before the flush below.
                    unsafe { l.out.push(&slot[frame], route.client.client) };
                } else {
                    let Some(c) = self
                        .conn_by_tuple
                        .get(&route.client)
                        .and_then(|&ci| self.conns[ci].as_mut().map(|c| (ci, c)))
                    else {
                        self.stats.drop_send_error += 1;
                        continue;
                    };
                    let (ci, conn) = c;
                    let len = frame.len() as u64;
                    if conn.out.push_data(&slot[frame]) {
                        self.stats.peer_to_client_tcp_packets += 1;
                        self.stats.peer_to_client_tcp_bytes += len;
                        if !conn.dirty {
                            conn.dirty = true;
                            self.dirty_conns.push(ci);
                        }
                    } else {
                        self.stats.drop_tcp_queue_full += 1;
                    }
                }
            }
            for l in &mut self.udp {
                if !l.out.is_empty() {
                    let f = l.out.flush(l.sock.as_raw_fd());
                    self.stats.peer_to_client_udp_packets += f.sent as u64;
                    self.stats.peer_to_client_udp_bytes += f.sent_bytes as u64;
                    self.stats.drop_send_error += f.failed as u64;
                }
            }
            self.flush_dirty_conns();
            if n < BATCH {
                return false;
            }
        }
        true
    }

    fn flush_dirty_conns(&mut self) {
        while let Some(ci) = self.dirty_conns.pop() {
            let failed = match self.conns.get_mut(ci).and_then(Option::as_mut) {
                Some(c) => {
                    c.dirty = false;
                    c.link.flush(&mut c.sock, &mut c.out).is_err()
                }
                None => false,
            };
            if failed {
                self.close_conn(ci, CloseReason::Error);
            }
        }
    }

    /// New TCP clients on listener `li`, within the per-IP limit. `true` if more may wait.
    fn accept(&mut self, li: usize, now: Now) -> bool {
        for _ in 0..256 {
            let Some((server, l, mode)) = self.tcp.get(li) else {
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
            let Some(permit) = self.per_ip.try_acquire(client.ip()) else {
                self.stats.tcp_rejected_per_ip += 1;
                tracing::debug!(%client, "TCP connection refused: turn.tcp_max_per_ip reached");
                continue;
            };
            let _ = sock.set_nodelay(true);
            let (link, transport) = match (mode, &self.tls) {
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
            let ci = match self.free_conns.pop() {
                Some(i) => i,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if let Err(e) = self.poll.registry().register(
                &mut sock,
                token(K_CONN, ci),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::debug!(error = %e, "TCP register failed");
                self.free_conns.push(ci);
                continue;
            }
            let tuple = FiveTuple {
                transport,
                client,
                server,
            };
            self.stats.tcp_accepted += 1;
            self.conn_by_tuple.insert(tuple, ci);
            self.conns[ci] = Some(Conn {
                sock,
                link,
                opened: now.mono,
                tuple,
                inbuf: InBuf::default(),
                out: OutBuf::new(TCP_DATA_QUEUE, TCP_HARD_QUEUE),
                last_message: now.mono,
                dirty: false,
                _permit: permit,
            });
        }
        true
    }

    fn conn_writable(&mut self, ci: usize) {
        let failed = match self.conns.get_mut(ci).and_then(Option::as_mut) {
            Some(c) => c.link.flush(&mut c.sock, &mut c.out).is_err(),
            None => false,
        };
        if failed {
            self.close_conn(ci, CloseReason::Error);
        }
    }

    /// Frames from TCP client `ci`. `true` if more may wait.
    fn conn_readable(&mut self, ci: usize, now: Now) -> bool {
        let mut close = None;
        let mut more = true;
        for _ in 0..MAX_BATCHES_PER_TURN {
            let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                return false;
            };
            let was_sniffing = matches!(conn.link, Link::Sniff);
            let was_handshaking = conn.link.handshaking();
            let filled = conn
                .link
                .fill(&mut conn.sock, &mut conn.inbuf, self.tls.as_ref());
            if was_sniffing && conn.link.is_tls() {
                // The sniffed first byte opened TLS: the 5-tuple's transport says so.
                self.conn_by_tuple.remove(&conn.tuple);
                conn.tuple.transport = Transport::Tls;
                self.conn_by_tuple.insert(conn.tuple, ci);
            }
            if was_handshaking && conn.link.is_tls() && !conn.link.handshaking() {
                self.stats.tls_handshakes += 1;
            }
            match filled {
                Ok(0) => {
                    close = Some(CloseReason::Eof);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_tls_error(&e) => {
                    tracing::debug!(client = %conn.tuple.client, error = %e, "TLS error");
                    close = Some(CloseReason::TlsError);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    close = Some(CloseReason::Garbage);
                    break;
                }
                Err(_) => {
                    close = Some(CloseReason::Error);
                    break;
                }
            }
            loop {
                let data = conn.inbuf.data();
                let n = match tcp_frame_len(data) {
                    Ok(None) => break,
                    Ok(Some(n)) if n > MAX_FRAME || n == 0 => {
                        close = Some(CloseReason::Garbage);
                        break;
                    }
                    Ok(Some(n)) if n > data.len() => break,
                    Ok(Some(n)) => n,
                    Err(_) => {
                        close = Some(CloseReason::Garbage);
                        break;
                    }
                };
                let frame = &data[..n];
                conn.last_message = now.mono;
                match classify(frame) {
                    Kind::ChannelData { channel, len } => {
                        match self.shard.channel_to_peer(&conn.tuple, channel) {
                            Some((relay, peer)) => {
                                if let Some(rfd) = self.relays.fd(relay) {
                                    let payload =
                                        &frame[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
                                    // SAFETY: `inbuf` is neither refilled nor compacted
                                    // before the flush after this frame loop.
                                    unsafe {
                                        self.to_peer.push(
                                            rfd,
                                            Transport::Tcp,
                                            payload,
                                            peer,
                                            &mut self.stats,
                                        )
                                    };
                                }
                            }
                            None => self.stats.drop_no_channel += 1,
                        }
                    }
                    Kind::Stun => {
                        match self.shard.handle_stun(
                            now,
                            conn.tuple,
                            frame,
                            &mut self.out,
                            &mut self.relays,
                        ) {
                            Action::None => {}
                            Action::Reply(len) => {
                                if !conn.out.push_control(&self.out[..len]) {
                                    close = Some(CloseReason::Backlog);
                                }
                            }
                            Action::Forward {
                                relay,
                                peer,
                                payload,
                            } => {
                                if let (Some(rfd), Some(d)) =
                                    (self.relays.fd(relay), frame.get(payload))
                                {
                                    // SAFETY: as above.
                                    unsafe {
                                        self.to_peer.push(
                                            rfd,
                                            Transport::Tcp,
                                            d,
                                            peer,
                                            &mut self.stats,
                                        )
                                    };
                                }
                            }
                        }
                    }
                    Kind::Invalid => {
                        self.stats.drop_invalid += 1;
                        close = Some(CloseReason::Garbage);
                    }
                }
                if close.is_some() {
                    break;
                }
                conn.inbuf.consume(n);
            }
            self.to_peer.flush(&mut self.stats);
            if close.is_some() {
                break;
            }
            if conn.link.flush(&mut conn.sock, &mut conn.out).is_err() {
                close = Some(CloseReason::Error);
                break;
            }
        }
        self.to_peer.flush(&mut self.stats);
        if close.is_none() {
            // TLS handshake records produced by the last read wait for no frame.
            if let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) {
                if conn.link.flush(&mut conn.sock, &mut conn.out).is_err() {
                    close = Some(CloseReason::Error);
                }
            }
        }
        if let Some(reason) = close {
            self.close_conn(ci, reason);
            return false;
        }
        more
    }

    fn close_conn(&mut self, ci: usize, reason: CloseReason) {
        let Some(mut c) = self.conns.get_mut(ci).and_then(Option::take) else {
            return;
        };
        match reason {
            CloseReason::Garbage => self.stats.tcp_closed_garbage += 1,
            CloseReason::Idle => self.stats.tcp_closed_idle += 1,
            CloseReason::Backlog => self.stats.tcp_closed_backlog += 1,
            CloseReason::TlsError => self.stats.tls_closed_error += 1,
            CloseReason::HandshakeTimeout => self.stats.tls_closed_handshake_timeout += 1,
            CloseReason::Eof | CloseReason::Error => {}
        }
        tracing::debug!(client = %c.tuple.client, ?reason, "TCP connection closed");
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.conn_by_tuple.remove(&c.tuple);
        self.free_conns.push(ci);
        self.shard.client_closed(&c.tuple, &mut self.relays);
        // The socket and the per-IP permit go with `c`.
    }

    fn close_idle(&mut self, now: Instant) {
        for ci in 0..self.conns.len() {
            let Some(c) = self.conns[ci].as_ref() else {
                continue;
            };
            // A handshake (or a sniffed first byte) gets handshake_timeout, however
            // slowly its bytes trickle in.
            if c.link.handshaking()
                && now.saturating_duration_since(c.opened) >= self.handshake_timeout
            {
                self.close_conn(ci, CloseReason::HandshakeTimeout);
            } else if now.saturating_duration_since(c.last_message) >= self.tcp_idle {
                self.close_conn(ci, CloseReason::Idle);
            }
        }
    }
}
