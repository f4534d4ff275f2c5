//! One worker thread: a mio event loop owning its listener sockets (shared with the other
//! workers through SO_REUSEPORT), its TCP client connections, its shard of the TURN state
//! (a `turn::Server`, called directly) and the relay sockets of that shard's allocations.
//! Nothing here is shared with other workers on the data path (DESIGN.md principle 2).
//!
//! This file holds the loop, the dispatch of events by [`Tok`] (`token.rs`), the UDP paths
//! both ways, and [`Inbound`]: the one place client input (UDP datagrams, TCP/TLS frames)
//! meets the core. `relays` owns the relay sockets and `peers` the RFC 6062 peer
//! connections (inside `Relays`). `conns` (client TCP/TLS connections), `splice` (RFC 6062
//! accepts, connects, binding and splicing) and `handover` (a data connection moving to
//! its CONNECTION-ID's worker, once per connection, off the data path) still extend
//! `Worker`, so they and this file import each other; making them structs that own their
//! state is issue 13's remaining step here. Tests: `tests/`, driving the real core.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token};

mod conns;
mod handover;
mod peers;
mod relays;
mod splice;
#[cfg(test)]
mod tests;
mod token;

use conns::{Conn, ListenMode};
pub use handover::Inbox;
use relays::PeerBatch;
pub use relays::Relays;
use token::Tok;

use super::gso::GsoBatch;
use super::mmsg::{RecvBatch, SendBatch};
use super::socket::ListenerPair;
use super::stats::{NetStats, WorkerStats};
use super::tcp::PerIpLimit;
use crate::stun::{
    classify, write_channel_data_header, write_data_indication, ChannelNumber, Kind,
    CHANNEL_DATA_HEADER, DATA_INDICATION_HEADROOM,
};
use crate::turn::{ConnId, FiveTuple, Now, Output, RelayId, Server, Transport};

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
/// Size of the buffer the core writes its answers into (`Server::handle_stun`).
const OUT_LEN: usize = 2048;
/// How often idle TCP connections are looked for and stats published.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// A configuration handed to a worker, picked up when its waker fires.
pub type ConfigSlot = Arc<Mutex<Option<Arc<crate::turn::ServerConfig>>>>;

/// The token that wakes a worker for shutdown, a new configuration or handed-over
/// connections.
pub fn waker_token() -> Token {
    Tok::Waker.token()
}

struct UdpListener {
    addr: SocketAddr,
    /// Bound to 0.0.0.0 or [::]: the real local address comes from packet info.
    wildcard: bool,
    sock: UdpSocket,
    /// Peer→client datagrams leaving through this socket.
    out: GsoBatch,
}

impl UdpListener {
    /// Whether a client's 5-tuple with server address `server` belongs to this listener.
    fn serves(&self, server: SocketAddr) -> bool {
        self.addr == server
            || (self.wildcard
                && self.addr.port() == server.port()
                && self.addr.is_ipv4() == server.is_ipv4())
    }

    /// The source address to put on datagrams to a client that reached `server`.
    fn source_for(&self, server: SocketAddr) -> Option<IpAddr> {
        self.wildcard.then_some(server.ip())
    }
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
    /// `turn.max_bytes_per_sec` at start; reloads arrive with the shard's config.
    pub max_bytes_per_sec: u64,
    pub tcp_idle: Duration,
    pub per_ip: PerIpLimit,
    pub stop: Arc<AtomicBool>,
    /// Where the worker publishes its counters (about twice a second).
    pub stats_out: Arc<Mutex<WorkerStats>>,
    /// A reloaded configuration waiting for this worker (checked when woken).
    pub config_in: ConfigSlot,
    /// Every worker's inbox, by index (RFC 6062 data connections handed over).
    pub inboxes: Arc<[Inbox]>,
    /// This worker's handles on the kernel fast path's maps (`turn.kernel_fast_path`).
    pub offload: Option<crate::fastpath::Offload>,
}

/// A worker's event loop state. Built and run on its own thread.
pub struct Worker {
    index: usize,
    poll: Poll,
    core: Server,
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
    /// One control response at a time, with packet info when the listener is a wildcard.
    reply: SendBatch,
    out: Box<[u8; OUT_LEN]>,
    txid_prefix: [u8; 4],
    txid_counter: u64,
    tcp_idle: Duration,
    per_ip: PerIpLimit,
    stop: Arc<AtomicBool>,
    stats: NetStats,
    stats_out: Arc<Mutex<WorkerStats>>,
    config_in: ConfigSlot,
    /// Sockets left readable after their turn (fairness cap), served on the next turn.
    pending: Vec<Tok>,
    /// accept() failed (e.g. out of file descriptors): retry at the next housekeeping
    /// instead of spinning.
    accept_retry: bool,
    /// TCP relay listeners whose accept() failed likewise (retried at housekeeping).
    relay_accept_retry: Vec<usize>,
    inboxes: Arc<[Inbox]>,
    /// Peer→client reads of spliced RFC 6062 connections land here first.
    splice_buf: Box<[u8]>,
    /// Spliced data connections that stopped at their `turn.max_bytes_per_sec` budget:
    /// housekeeping pumps them again (their sockets' readiness edges were already taken).
    throttled: Vec<usize>,
    /// Reused lists (control path): connections to close for backlog, connects timed out.
    backlog: Vec<usize>,
    expired_ids: Vec<crate::turn::ConnId>,
    /// What the core asked for that touches client connections, done by `after_core`
    /// once the loop that called the core lets go of them.
    later: Vec<Later>,
}

/// A core output that touches client connections (see [`take_output`]).
enum Later {
    /// `Output::Send`: a message for control connection `to`.
    Send { to: FiveTuple, msg: Vec<u8> },
    /// The client data connection in slot `ci` was spliced to peer connection `id`, which
    /// the core closed (`Output::ClosePeerConn`): it closes too.
    CloseData { ci: usize, id: ConnId },
}

/// Does at once what the core asked for that needs only the relay sockets (closing a
/// relay socket or a peer connection, as the core used to do synchronously), queues in
/// `later` what touches client connections, and hands back an answer to the message
/// just handled (`Reply`, `Forward`, `BindData`) for the caller to send.
fn take_output(relays: &mut Relays, later: &mut Vec<Later>, o: Output) -> Option<Output> {
    match o {
        Output::CloseRelay(id) => relays.close(id),
        Output::ClosePeerConn(id) => {
            if let Some(ci) = relays.close_peer(id) {
                later.push(Later::CloseData { ci, id });
            }
        }
        Output::Send { to, msg } => later.push(Later::Send { to, msg }),
        answer => return Some(answer),
    }
    None
}

/// What handling a client's message needs besides the client's own connection, borrowed
/// from the worker for one read: the core, the relay sockets, the batch to peers, the
/// core's answer buffer and the queue of outputs for later. The one place client input
/// meets the core, for UDP and TCP/TLS clients alike.
struct Inbound<'a> {
    core: &'a mut Server,
    relays: &'a mut Relays,
    to_peer: &'a mut PeerBatch,
    out: &'a mut [u8; OUT_LEN],
    later: &'a mut Vec<Later>,
    stats: &'a mut NetStats,
}

/// Borrows the worker's fields for an [`Inbound`] (a macro, not a method, so the caller
/// can hold a client connection or the receive buffer at the same time).
macro_rules! inbound {
    ($w:expr) => {
        Inbound {
            core: &mut $w.core,
            relays: &mut $w.relays,
            to_peer: &mut $w.to_peer,
            out: &mut $w.out,
            later: &mut $w.later,
            stats: &mut $w.stats,
        }
    };
}
use inbound;

/// The core's answer to a client's STUN message, in `out[..len]`, for the caller to send on
/// that client's connection.
enum Answer {
    /// `Output::Reply`.
    Reply(usize),
    /// `Output::BindData`: the connection becomes peer connection `ConnId`'s data
    /// connection once the answer is queued (RFC 6062 §5.4).
    Bind(ConnId, usize),
}

impl Inbound<'_> {
    /// ChannelData `channel` from `from` (RFC 8656 §12.4): `payload` goes to the channel's
    /// peer from its relay socket, or is dropped and counted.
    ///
    /// # Safety
    /// `payload` must stay valid until the next `to_peer` flush.
    unsafe fn channel_data(
        &mut self,
        from: &FiveTuple,
        channel: ChannelNumber,
        payload: &[u8],
        now: Instant,
    ) {
        match self.core.channel_to_peer(from, channel) {
            // SAFETY: the caller's.
            Some((relay, peer)) => unsafe {
                self.send_to_peer(relay, peer, from.transport, payload, now)
            },
            None => self.stats.drop_no_channel += 1,
        }
    }

    /// Queues `payload` for `peer` from relay `relay`, within the relay's caps.
    ///
    /// # Safety
    /// As [`Self::channel_data`].
    unsafe fn send_to_peer(
        &mut self,
        relay: RelayId,
        peer: SocketAddr,
        transport: Transport,
        payload: &[u8],
        now: Instant,
    ) {
        if let Some(rfd) = self
            .relays
            .peer_send_fd(relay, payload.len(), now, self.stats)
        {
            // SAFETY: the caller's.
            unsafe { self.to_peer.push(rfd, transport, payload, peer, self.stats) };
        }
    }

    /// STUN message `msg` from `from` through the core, and what it asked for: a Send
    /// indication's payload queued for its peer (RFC 8656 §10.2), relay sockets and peer
    /// connections closed ([`take_output`]), the rest queued in `later`. Returns the answer
    /// for `from`'s connection.
    ///
    /// # Safety
    /// `msg` must stay valid until the next `to_peer` flush.
    unsafe fn stun(&mut self, now: Now, from: FiveTuple, msg: &[u8]) -> Option<Answer> {
        let t0 = is_request(msg).then(Instant::now);
        self.core
            .handle_stun(now, from, msg, &mut self.out[..], self.relays);
        if let Some(t0) = t0 {
            self.core.record_request_time(t0.elapsed());
        }
        let mut answer = None;
        while let Some(o) = self.core.poll_output() {
            match take_output(self.relays, self.later, o) {
                Some(Output::Reply { len }) => answer = Some(Answer::Reply(len)),
                Some(Output::BindData { conn, len }) => answer = Some(Answer::Bind(conn, len)),
                Some(Output::Forward {
                    relay,
                    peer,
                    payload,
                }) => {
                    if let Some(data) = msg.get(payload) {
                        // SAFETY: the caller's.
                        unsafe { self.send_to_peer(relay, peer, from.transport, data, now.mono) };
                    }
                }
                Some(_) | None => {}
            }
        }
        answer
    }
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

impl Worker {
    /// Registers the listeners with `poll` (which already holds the shutdown waker).
    pub fn new(p: WorkerParams, poll: Poll, mut core: Server) -> io::Result<Worker> {
        // RFC 6062 CONNECTION-IDs carry the worker index in 8 bits (config caps workers).
        let index =
            u8::try_from(p.index).map_err(|_| io::Error::other("more than 256 TURN workers"))?;
        core.set_shard_index(index);
        let registry = poll.registry().try_clone()?;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (i, (addr, pair)) in p.listeners.into_iter().enumerate() {
            let mut u = UdpSocket::from_std(pair.udp);
            registry.register(&mut u, Tok::Udp(i).token(), Interest::READABLE)?;
            udp.push(UdpListener {
                addr,
                wildcard: addr.ip().is_unspecified(),
                sock: u,
                out: GsoBatch::new(BATCH),
            });
            let mut t = TcpListener::from_std(pair.tcp);
            registry.register(&mut t, Tok::TcpListener(i).token(), Interest::READABLE)?;
            let mode = if p.sniff_tls && p.tls.is_some() {
                ListenMode::Sniff
            } else {
                ListenMode::Plain
            };
            tcp.push((addr, t, mode));
        }
        for (addr, l) in p.tls_listeners {
            let mut t = TcpListener::from_std(l);
            registry.register(
                &mut t,
                Tok::TcpListener(tcp.len()).token(),
                Interest::READABLE,
            )?;
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
                peers: Default::default(),
                max_bytes_per_sec: p.max_bytes_per_sec,
                fast: p.offload,
                fast_wanted: Vec::new(),
                fast_folded: Default::default(),
            },
            poll,
            core,
            udp,
            tcp,
            tls: p.tls,
            handshake_timeout: p.handshake_timeout,
            conns: Vec::new(),
            free_conns: Vec::new(),
            conn_by_tuple: HashMap::new(),
            dirty_conns: Vec::new(),
            rx: RecvBatch::new(BATCH, DATA_INDICATION_HEADROOM + MAX_DATAGRAM + TAIL_ROOM),
            reply: SendBatch::new(1),
            to_peer: PeerBatch {
                batch: GsoBatch::new(BATCH),
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
            config_in: p.config_in,
            pending: Vec::new(),
            accept_retry: false,
            relay_accept_retry: Vec::new(),
            inboxes: p.inboxes,
            splice_buf: vec![0u8; splice::SPLICE_READ].into_boxed_slice(),
            throttled: Vec::new(),
            backlog: Vec::new(),
            expired_ids: Vec::new(),
            later: Vec::new(),
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
            if let Some(d) = self.core.poll_timeout() {
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
                if let Some(tok) = Tok::of(ev.token()) {
                    self.dispatch(tok, ev.is_readable(), ev.is_writable(), now);
                }
            }
            for tok in pending.drain(..) {
                self.dispatch(tok, true, false, now);
            }
            if self.core.poll_timeout().is_some_and(|d| d <= now.mono) {
                self.core.handle_timeout(now, &mut self.relays);
                self.after_core();
            }
            if now.mono >= next_housekeeping {
                self.close_idle(now.mono);
                self.expire_connects(now);
                if std::mem::take(&mut self.accept_retry) {
                    for li in 0..self.tcp.len() {
                        self.dispatch(Tok::TcpListener(li), true, false, now);
                    }
                }
                for ri in std::mem::take(&mut self.relay_accept_retry) {
                    self.dispatch(Tok::Relay(ri), true, false, now);
                }
                for ci in std::mem::take(&mut self.throttled) {
                    if self
                        .conns
                        .get(ci)
                        .and_then(Option::as_ref)
                        .is_some_and(|c| c.splice.is_some())
                    {
                        self.dispatch(Tok::Conn(ci), true, true, now);
                    }
                }
                // Kernel fast path: a sync in case a change slipped past `after_core`,
                // then its counters into the relays' usage and this worker's stats.
                self.relays.sync_fast_path(&self.core);
                self.relays.poll_fast_path(&mut self.stats);
                self.publish_stats();
                next_housekeeping = now.mono + HOUSEKEEPING;
            }
        }
        self.publish_stats();
        tracing::debug!(worker = self.index, "TURN worker stopped");
    }

    /// Hands a reloaded configuration to the shard (one lock per reload, not per packet).
    fn take_config(&mut self) {
        let next = self
            .config_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(cfg) = next {
            self.relays.set_max_bytes_per_sec(cfg.max_bytes_per_sec);
            self.core.set_config(cfg);
            tracing::debug!(
                worker = self.index,
                "TURN worker took the new configuration"
            );
        }
    }

    fn publish_stats(&self) {
        let mut net = self.stats;
        net.tcp_relay_peer_sockets = self.relays.peers.open() as u64;
        net.tcp_relay_connect_failures += self.relays.peers.connect_failures;
        let mut s = self.stats_out.lock().unwrap_or_else(|p| p.into_inner());
        s.net = net;
        s.turn.clone_from(self.core.stats());
    }

    fn dispatch(&mut self, tok: Tok, readable: bool, writable: bool, now: Now) {
        let more = match tok {
            Tok::Udp(idx) => self.udp_readable(idx, now),
            Tok::TcpListener(idx) => self.accept(idx, now),
            Tok::Conn(idx) => {
                let spliced = self
                    .conns
                    .get(idx)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.splice.is_some());
                if spliced {
                    self.pump(idx, now)
                } else {
                    if writable {
                        self.conn_writable(idx);
                    }
                    readable && self.conn_readable(idx, now)
                }
            }
            Tok::Relay(idx) if self.relays.is_tcp(RelayId::from_index(idx)) => {
                self.relay_accept(idx, now)
            }
            Tok::Relay(idx) => self.relay_readable(idx, now.mono),
            Tok::Peer(idx) => self.peer_event(idx, now),
            Tok::Waker => {
                self.take_config();
                self.take_inbox(now);
                false
            }
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
        let (bound, wildcard) = (l.addr, l.wildcard);
        for _ in 0..MAX_BATCHES_PER_TURN {
            let n = match self.rx.recv(fd, 0, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP listener receive error");
                    return false;
                }
            };
            let mut stun_seen = false;
            let mut cx = inbound!(self);
            for i in 0..n {
                let r = self.rx.received(i);
                if r.truncated {
                    cx.stats.drop_truncated += 1;
                    continue;
                }
                // On a wildcard listener the server side of the 5-tuple is the address the
                // client actually reached.
                let server = match (wildcard, r.dst) {
                    (true, Some(ip)) => SocketAddr::new(ip, bound.port()),
                    _ => bound,
                };
                let from = FiveTuple {
                    transport: Transport::Udp,
                    client: r.from,
                    server,
                };
                let msg = self.rx.payload(i);
                match classify(msg) {
                    Kind::ChannelData { channel, len } => {
                        let payload = &msg[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
                        // SAFETY: `rx` is not received into again before the flush at the
                        // end of this batch.
                        unsafe { cx.channel_data(&from, channel, payload, now.mono) };
                    }
                    Kind::Stun => {
                        stun_seen = true;
                        // SAFETY: as above.
                        if let Some(Answer::Reply(len) | Answer::Bind(_, len)) =
                            unsafe { cx.stun(now, from, msg) }
                        {
                            // ConnectionBind over UDP gets 400 from the core; never
                            // BindData.
                            let src = wildcard.then_some(server.ip());
                            // SAFETY: `out` is not touched before this flush.
                            unsafe { self.reply.push(&cx.out[..len], r.from, src) };
                            if self.reply.flush(fd).failed > 0 {
                                cx.stats.drop_send_error += 1;
                            }
                        }
                    }
                    Kind::Invalid => cx.stats.drop_invalid += 1,
                }
            }
            cx.to_peer.flush(cx.stats);
            if stun_seen {
                self.after_core();
            }
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
    fn relay_readable(&mut self, ri: usize, now: Instant) -> bool {
        let relay = RelayId::from_index(ri);
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
            // This allocation's share, added to its relay entry once per batch.
            let (mut to_client_bytes, mut to_client_packets) = (0u64, 0u64);
            for i in 0..n {
                let r = self.rx.received(i);
                if r.truncated {
                    self.stats.drop_truncated += 1;
                    continue;
                }
                let Some(route) = self.core.peer_to_client(relay, r.from) else {
                    self.stats.drop_no_permission += 1;
                    continue;
                };
                if !self
                    .relays
                    .allow_to_client(relay, r.len, now, &mut self.stats)
                {
                    continue;
                }
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
                    None => match write_data_indication(slot, at, r.len, r.from, txid) {
                        Some(f) => f,
                        // Over 65504 bytes from an IPv6 peer: no STUN message can carry it.
                        None => {
                            self.stats.drop_truncated += 1;
                            continue;
                        }
                    },
                };
                to_client_bytes += r.len as u64;
                to_client_packets += 1;
                if !stream {
                    let server = route.client.server;
                    let Some(l) = self.udp.iter_mut().find(|l| l.serves(server)) else {
                        self.stats.drop_send_error += 1;
                        continue;
                    };
                    if l.out.is_full() {
                        let f = l.out.flush(l.sock.as_raw_fd());
                        self.stats.peer_to_client_udp_packets += f.sent as u64;
                        self.stats.peer_to_client_udp_bytes += f.sent_bytes as u64;
                        self.stats.drop_send_error += f.failed as u64;
                    }
                    let src = l.source_for(server);
                    // SAFETY: the slot is not written again before the flush below.
                    unsafe { l.out.push(&slot[frame], route.client.client, src) };
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
                        // A client that only receives is not idle (its allocation's
                        // lifetime governs it).
                        conn.last_message = now;
                        if route.client.transport == Transport::Tls {
                            self.stats.peer_to_client_tls_packets += 1;
                            self.stats.peer_to_client_tls_bytes += len;
                        } else {
                            self.stats.peer_to_client_tcp_packets += 1;
                            self.stats.peer_to_client_tcp_bytes += len;
                        }
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
            self.relays
                .count_to_client(relay, to_client_bytes, to_client_packets);
            // A TCP client that failed while flushing takes its allocation, and so this
            // relay socket, with it: never read a closed (or reused) descriptor.
            if n < BATCH || self.relays.fd(relay) != Some(fd) {
                return false;
            }
        }
        true
    }
}

/// A STUN request (as opposed to an indication or a response), RFC 8489 §5.
pub(super) fn is_request(msg: &[u8]) -> bool {
    msg.len() >= 2 && msg[0] & 0x01 == 0 && msg[1] & 0x10 == 0
}
