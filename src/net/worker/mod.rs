//! One worker thread: a mio event loop owning its listener sockets (shared with the other
//! workers through SO_REUSEPORT), its TCP client connections, its shard of the TURN state
//! (a `turn::Server`, called directly) and the relay sockets of that shard's allocations.
//! Nothing here is shared with other workers on the data path (DESIGN.md principle 2).
//!
//! This file holds the loop and the dispatch only: events by [`Tok`] (`token.rs`) to the
//! struct owning the socket, and what one owner's call means for another applied here —
//! the core's outputs after each call ([`Worker::after_core`]), a closed client connection's
//! allocation or peer connection, a bound data connection's splice, a handover. Each piece
//! of state has one owner with methods on itself: `udp` (UDP listeners), `conns` (TCP/TLS
//! listeners and client connections), `relays` (relay sockets, with `peers`, the RFC 6062
//! peer connections), `splice` (splicing a data connection to its peer), `handover` (the
//! inbox other workers hand data connections to), `inbound` (the borrow of the core and
//! relays through which UDP and TCP client input meets the core). None of them imports
//! this file or another owner above it (`handover` → `conns` → `splice` → `relays` →
//! `peers`; `udp`, `conns` → `inbound` → `relays`; all → `token`). Peer→client datagrams
//! are routed here: relay socket → core's route → framed by `relays` → the client's owner
//! (`udp` or `conns`).
//! Tests: `tests/`, driving the real core.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

mod conns;
mod handover;
mod inbound;
mod peers;
mod relays;
mod splice;
#[cfg(test)]
mod tests;
mod token;
mod udp;

use conns::{CloseReason, ConnParams, Conns, ListenMode, Read};
pub use handover::Inbox;
use inbound::{now, take_output, Inbound, Later, OUT_LEN};
use peers::{PeerEvent, CONNECT_TIMEOUT};
pub use relays::Relays;
use relays::{frame_for_client, Accepted, PeerBatch};
use splice::{Pumped, Splicer};
use token::{Tok, MAX_BATCHES_PER_TURN};
use udp::Udp;

use super::gso::GsoBatch;
use super::mmsg::RecvBatch;
use super::socket::ListenerPair;
use super::stats::{NetStats, WorkerStats};
use super::tcp::PerIpLimit;
use crate::stun::DATA_INDICATION_HEADROOM;
use crate::turn::{ConnId, Now, RelayId, Server, Transport};

/// Datagrams per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// Largest UDP payload we receive (a full-size datagram: nothing is ever truncated).
const MAX_DATAGRAM: usize = 65536;
/// Free bytes kept after a received peer payload: ChannelData padding over TCP (RFC 8656
/// §12.5) or the attribute padding and FINGERPRINT after a Data indication's DATA.
const TAIL_ROOM: usize = 16;
/// How often idle TCP connections are looked for and stats published.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// A configuration handed to a worker, picked up when its waker fires.
pub type ConfigSlot = Arc<Mutex<Option<Arc<crate::turn::ServerConfig>>>>;

/// The token that wakes a worker for shutdown, a new configuration or handed-over
/// connections.
pub fn waker_token() -> Token {
    Tok::Waker.token()
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
    /// UDP GRO on the relay sockets this worker opens (off while the kernel fast path runs
    /// where GRO would come first: `fastpath::Effective::allows_udp_gro`).
    pub udp_gro: bool,
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
    udp: Udp,
    conns: Conns,
    splice: Splicer,
    /// Every worker's inbox, by index (RFC 6062 data connections handed over).
    inboxes: Arc<[Inbox]>,
    /// The receive buffer of UDP listeners and relay sockets alike (one read at a time).
    rx: RecvBatch,
    to_peer: PeerBatch,
    out: Box<[u8; OUT_LEN]>,
    txid_prefix: [u8; 4],
    txid_counter: u64,
    stop: Arc<AtomicBool>,
    stats: NetStats,
    stats_out: Arc<Mutex<WorkerStats>>,
    config_in: ConfigSlot,
    /// Sockets left readable after their turn (fairness cap), served on the next turn.
    pending: Vec<Tok>,
    /// TCP relay listeners whose accept() failed (retried at housekeeping).
    relay_accept_retry: Vec<usize>,
    /// Reused lists (control path): connections to close, connects timed out.
    to_close: Vec<usize>,
    expired_conns: Vec<(usize, CloseReason)>,
    expired_ids: Vec<ConnId>,
    /// What the core asked for that touches client connections, done by `after_core`
    /// once the loop that called the core lets go of them.
    later: Vec<Later>,
}

/// Borrows the worker's fields for an [`Inbound`] (a macro, not a method, so the caller
/// can hold `udp`, `conns` or the receive buffer at the same time).
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

impl Worker {
    /// Registers the listeners with `poll` (which already holds the shutdown waker).
    pub fn new(p: WorkerParams, poll: Poll, mut core: Server) -> io::Result<Worker> {
        // RFC 6062 CONNECTION-IDs carry the worker index in 8 bits (config caps workers).
        let index =
            u8::try_from(p.index).map_err(|_| io::Error::other("more than 256 TURN workers"))?;
        core.set_shard_index(index);
        let registry = poll.registry();
        let mode = if p.sniff_tls && p.tls.is_some() {
            ListenMode::Sniff
        } else {
            ListenMode::Plain
        };
        let mut udp = Udp::new(BATCH);
        let mut conns = Conns::new(
            registry.try_clone()?,
            ConnParams {
                tls: p.tls,
                handshake_timeout: p.handshake_timeout,
                idle: p.tcp_idle,
                per_ip: p.per_ip,
            },
        );
        for (addr, pair) in p.listeners {
            udp.add(registry, addr, pair.udp)?;
            conns.add_listener(addr, pair.tcp, mode)?;
        }
        for (addr, l) in p.tls_listeners {
            conns.add_listener(addr, l, ListenMode::Tls)?;
        }
        let relays = Relays::new(
            registry.try_clone()?,
            p.buffer_bytes,
            p.udp_gro,
            p.max_bytes_per_sec,
            p.offload,
        );
        let seed = rand::random::<u32>();
        Ok(Worker {
            index: p.index,
            poll,
            core,
            relays,
            udp,
            conns,
            splice: Splicer::new(),
            inboxes: p.inboxes,
            rx: RecvBatch::new(BATCH, DATA_INDICATION_HEADROOM + MAX_DATAGRAM + TAIL_ROOM),
            to_peer: PeerBatch {
                batch: GsoBatch::new(BATCH),
                fd: -1,
                transport: Transport::Udp,
            },
            out: Box::new([0u8; OUT_LEN]),
            txid_prefix: seed.to_be_bytes(),
            txid_counter: 0,
            stop: p.stop,
            stats: NetStats::default(),
            stats_out: p.stats_out,
            config_in: p.config_in,
            pending: Vec::new(),
            relay_accept_retry: Vec::new(),
            to_close: Vec::new(),
            expired_conns: Vec::new(),
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
                self.close_expired(now.mono);
                self.expire_connects(now);
                if self.conns.take_accept_retry() {
                    for li in 0..self.conns.listener_count() {
                        self.dispatch(Tok::TcpListener(li), true, false, now);
                    }
                }
                for ri in std::mem::take(&mut self.relay_accept_retry) {
                    self.dispatch(Tok::Relay(ri), true, false, now);
                }
                for ci in self.splice.take_throttled() {
                    if self.conns.is_spliced(ci) {
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
        let (open, failures) = self.relays.peer_counts();
        net.tcp_relay_peer_sockets = open;
        net.tcp_relay_connect_failures += failures;
        let mut s = self.stats_out.lock().unwrap_or_else(|p| p.into_inner());
        s.net = net;
        s.turn.clone_from(self.core.stats());
    }

    fn dispatch(&mut self, tok: Tok, readable: bool, writable: bool, now: Now) {
        let more = match tok {
            Tok::Udp(idx) => self.udp_readable(idx, now),
            Tok::TcpListener(idx) => self.conns.accept(idx, now, &mut self.stats),
            Tok::Conn(idx) if self.conns.is_spliced(idx) => self.pump(idx, now),
            Tok::Conn(idx) => {
                if writable && !self.conns.writable(idx) {
                    self.close_conn(idx, CloseReason::Error);
                }
                readable && self.conn_readable(idx, now)
            }
            Tok::Relay(idx) if self.relays.is_tcp(RelayId::from_index(idx)) => {
                self.relay_accept(idx, now)
            }
            Tok::Relay(idx) => self.relay_readable(idx, now.mono),
            Tok::Peer(idx) => match self.relays.peer_event(idx) {
                PeerEvent::Nothing => false,
                PeerEvent::ConnectDone(id, ok) => {
                    self.connect_done(id, ok, now);
                    false
                }
                PeerEvent::Pump(ci) => self.pump(ci, now),
            },
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

    /// Client datagrams on UDP listener `li`, a batch at a time (`udp.rs`); what the core
    /// asked for is applied after each batch. `true` if more may wait.
    fn udp_readable(&mut self, li: usize, now: Now) -> bool {
        for _ in 0..MAX_BATCHES_PER_TURN {
            let Some(b) = self
                .udp
                .read_batch(li, &mut self.rx, &mut inbound!(self), now)
            else {
                return false;
            };
            if b.stun_seen {
                self.after_core();
            }
            if !b.full {
                return false;
            }
        }
        true
    }

    /// Frames from TCP client `ci` (`conns.rs`), and what they ask of the worker. `true`
    /// if more may wait.
    fn conn_readable(&mut self, ci: usize, now: Now) -> bool {
        if self.conns.is_spliced(ci) {
            return self.pump(ci, now);
        }
        let workers = self.inboxes.len();
        let read = self
            .conns
            .read(ci, &mut inbound!(self), self.index, workers, now);
        if let Read::Close(reason) = read {
            // Also delivers what the shard queued meanwhile.
            self.close_conn(ci, reason);
            return false;
        }
        // Connect responses and attempts the requests queued, peers the core closed.
        self.after_core();
        match read {
            Read::HandOver(target) => {
                self.hand_over(ci, target);
                false
            }
            Read::Bind(id) => self.bind_data(ci, id, now),
            Read::Open(more) => more,
            Read::Close(_) => false,
        }
    }

    /// Closes client connection `ci` and ends what it was to the core: a data connection
    /// takes its peer connection along (unless the core closed that one first) and is no
    /// allocation's control connection; a control connection's allocations go.
    fn close_conn(&mut self, ci: usize, reason: CloseReason) {
        let Some(c) = self.conns.close(ci, reason, &mut self.stats) else {
            return;
        };
        match c.splice() {
            Some(sp) => {
                if self.relays.close_peer_from_client(sp.id) {
                    self.core.tcp_conn_closed(sp.id);
                    self.after_core();
                }
            }
            None => {
                self.core.client_closed(c.tuple(), now(), &mut self.relays);
                self.after_core();
            }
        }
    }

    /// Flushes the client connections with queued output, closing those that failed.
    fn flush_conns(&mut self) {
        let mut failed = std::mem::take(&mut self.to_close);
        self.conns.flush_dirty(&mut failed);
        for ci in failed.drain(..) {
            self.close_conn(ci, CloseReason::Error);
        }
        if self.to_close.is_empty() {
            self.to_close = failed;
        }
    }

    /// Housekeeping: handshakes timed out, idle connections.
    fn close_expired(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired_conns);
        let core = &self.core;
        self.conns
            .expired(now, |t| core.has_allocation(t), &mut expired);
        for (ci, reason) in expired.drain(..) {
            self.close_conn(ci, reason);
        }
        self.expired_conns = expired;
    }

    /// After a call into the shard: what it asked for goes out — relay sockets and peer
    /// connections closed at once ([`take_output`]), then messages made outside a request
    /// (Connect responses, ConnectionAttempt indications, RFC 6062 §5.2/§5.3) onto their
    /// control connections, then the client data connections whose peer connection it
    /// closed.
    fn after_core(&mut self) {
        while let Some(o) = self.core.poll_output() {
            if let Some(answer) = take_output(&mut self.relays, &mut self.later, o) {
                // Answers follow `handle_stun` only, whose caller takes them.
                tracing::debug!(?answer, "core answer outside a request dropped");
            }
        }
        let mut later = std::mem::take(&mut self.later);
        let mut backlog = Vec::new();
        for l in &later {
            if let Later::Send { to, msg } = l {
                if let Some(ci) = self.conns.send_control(to, msg) {
                    backlog.push(ci);
                }
            }
        }
        self.flush_conns();
        for ci in backlog {
            self.close_conn(ci, CloseReason::Backlog);
        }
        for l in later.drain(..) {
            let Later::CloseData { ci, id } = l else {
                continue;
            };
            let bound = self
                .conns
                .get(ci)
                .and_then(|c| c.splice())
                .is_some_and(|s| s.id == id);
            if bound {
                self.close_conn(ci, CloseReason::Eof);
            }
        }
        // Closing above calls the core and this again, which does what that asked for.
        if self.later.is_empty() {
            self.later = later;
        }
        // Channels or permissions may have changed: the fast path follows.
        self.relays.sync_fast_path(&self.core);
    }

    /// Peers connecting to TCP relay listener `ri` (RFC 6062 §5.3). `true` if more may wait.
    fn relay_accept(&mut self, ri: usize, now: Now) -> bool {
        let accepted = self
            .relays
            .accept_peers(RelayId::from_index(ri), &mut self.core, now);
        self.after_core();
        match accepted {
            Accepted::Done => false,
            Accepted::More => true,
            Accepted::Retry => {
                // EMFILE and friends: try again at housekeeping rather than spin.
                if !self.relay_accept_retry.contains(&ri) {
                    self.relay_accept_retry.push(ri);
                }
                false
            }
        }
    }

    /// The connect of peer connection `id` ended (RFC 6062 §5.2).
    fn connect_done(&mut self, id: ConnId, ok: bool, now: Now) {
        if !ok {
            self.stats.tcp_relay_connect_failures += 1;
        }
        self.relays.connect_done(&mut self.core, id, ok, now);
        self.after_core();
    }

    /// Fails connects older than [`CONNECT_TIMEOUT`] (housekeeping).
    fn expire_connects(&mut self, now: Now) {
        let Some(deadline) = now.mono.checked_sub(CONNECT_TIMEOUT) else {
            return;
        };
        let mut ids = std::mem::take(&mut self.expired_ids);
        self.relays.connects_older_than(deadline, &mut ids);
        for id in ids.drain(..) {
            self.connect_done(id, false, now);
        }
        self.expired_ids = ids;
    }

    /// `Output::BindData`: client connection `ci` becomes the data connection of peer
    /// connection `id` (RFC 6062 §5.4). Bytes after the ConnectionBind still in its InBuf
    /// are the first client data for the peer. `true` if more may wait.
    fn bind_data(&mut self, ci: usize, id: ConnId, now: Now) -> bool {
        if self.conns.get(ci).is_none() {
            return false;
        }
        let Some(peer) = self.relays.bind_peer(id, ci) else {
            self.close_conn(ci, CloseReason::Error);
            return false;
        };
        self.conns.bind(ci, id, peer);
        self.pump(ci, now)
    }

    /// Spliced client connection `ci` and its peer (`splice.rs`). `true` if more may wait.
    fn pump(&mut self, ci: usize, now: Now) -> bool {
        let tls = self.conns.tls().cloned();
        let Some((sp, client)) = self.conns.spliced(ci) else {
            return false;
        };
        let pumped = self.splice.pump(
            ci,
            sp,
            client,
            &mut self.relays,
            tls.as_ref(),
            &mut self.stats,
            now.mono,
        );
        match pumped {
            Pumped::Open(more) => more,
            Pumped::Done => {
                self.close_conn(ci, CloseReason::Eof);
                false
            }
            Pumped::Failed => {
                self.close_conn(ci, CloseReason::Error);
                false
            }
        }
    }

    /// Hands client connection `ci` to worker `target` (`handover.rs`).
    fn hand_over(&mut self, ci: usize, target: usize) {
        let Some(inbox) = self.inboxes.get(target) else {
            return;
        };
        let Some(c) = self.conns.take(ci) else {
            return;
        };
        self.stats.tcp_handovers += 1;
        tracing::debug!(client = %c.tuple().client, from = self.index, to = target, "RFC 6062 data connection handed over");
        inbox.hand_over(c);
    }

    /// Takes the connections other workers handed over and processes their buffered
    /// frames at once (the socket may have nothing new to report).
    fn take_inbox(&mut self, now: Now) {
        let Some(inbox) = self.inboxes.get(self.index) else {
            return;
        };
        for c in inbox.take() {
            match self.conns.adopt(c) {
                Ok(ci) => {
                    if self.conn_readable(ci, now) {
                        self.pending.push(Tok::Conn(ci));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TCP register failed for a handed-over connection");
                }
            }
        }
    }

    fn next_txid(&mut self) -> [u8; 12] {
        self.txid_counter = self.txid_counter.wrapping_add(1);
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.txid_prefix);
        t[4..].copy_from_slice(&self.txid_counter.to_be_bytes());
        t
    }

    /// Peer datagrams on relay socket `ri`, each routed by the core to its client, framed
    /// in place by `relays` (ChannelData header or Data indication before the payload) and
    /// batched to the client's owner: `udp` or `conns`. `true` if more may wait.
    fn relay_readable(&mut self, ri: usize, now: Instant) -> bool {
        let relay = RelayId::from_index(ri);
        let Some(fd) = self.relays.fd(relay) else {
            return false;
        };
        for _ in 0..MAX_BATCHES_PER_TURN {
            let n = match self
                .rx
                .recv(fd, DATA_INDICATION_HEADROOM, TAIL_ROOM, &mut self.stats)
            {
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
                let Some(frame) =
                    frame_for_client(slot, at, r.len, route.channel, stream, r.from, txid)
                else {
                    self.stats.drop_truncated += 1;
                    continue;
                };
                to_client_bytes += r.len as u64;
                to_client_packets += 1;
                if stream {
                    self.conns
                        .push_data(&route.client, &slot[frame], now, &mut self.stats);
                } else {
                    // SAFETY: the slot is not written again before the flush below.
                    let queued = unsafe {
                        self.udp
                            .push_to_client(&route.client, &slot[frame], &mut self.stats)
                    };
                    if !queued {
                        self.stats.drop_send_error += 1;
                    }
                }
            }
            self.udp.flush_to_clients(&mut self.stats);
            self.flush_conns();
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
