//! RFC 6062 TCP relays on the worker side: accepting peers on relay listeners (§5.3),
//! finishing connects (§5.2), binding a client data connection to its peer (§5.4) and
//! splicing raw bytes both ways with bounded queues and backpressure, half-close and
//! close. Also `after_core`, run after every call into the core: what it asked for
//! outside a request (messages onto control connections, relay sockets and peer connections
//! closed, and the client data connections whose peer connection it closed).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use super::conns::CloseReason;
use super::peers::PeerState;
use super::{take_output, Later, Worker, MAX_BATCHES_PER_TURN, TCP_DATA_QUEUE};
use crate::turn::{ConnId, Now, RelayId};

/// Client→peer bytes a spliced connection buffers (its InBuf); the peer→client side is
/// the client's OutBuf data limit ([`TCP_DATA_QUEUE`]). Past either, the reading side waits.
pub(super) const SPLICE_QUEUE: usize = TCP_DATA_QUEUE;
/// Largest single read from a peer (the worker's scratch buffer).
pub(super) const SPLICE_READ: usize = 64 * 1024;
/// Peer connections accepted from one relay listener per turn.
const ACCEPT_BATCH: usize = 64;
/// An outgoing peer connect that has not finished by then fails (447, RFC 6062 §5.2): a
/// safety net behind the core's own 30 s timer.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(35);

/// The state of a client data connection spliced to peer connection `id`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Splice {
    pub(super) id: ConnId,
    /// The peer's slot in `Relays::peers`.
    peer: usize,
    /// The client sent FIN (or TLS close_notify).
    client_eof: bool,
    /// The peer sent FIN.
    peer_eof: bool,
    /// Nothing more goes to the peer: its write side is shut down.
    peer_shut: bool,
    /// TLS close_notify queued for the client.
    client_closing: bool,
    /// Nothing more goes to the client: its write side is shut down.
    client_shut: bool,
}

impl Worker {
    /// After a call into the shard: what it asked for goes out — relay sockets and peer
    /// connections closed at once ([`take_output`]), then messages made outside a request
    /// (Connect responses, ConnectionAttempt indications, RFC 6062 §5.2/§5.3) onto their
    /// control connections, then the client data connections whose peer connection it
    /// closed.
    pub(super) fn after_core(&mut self) {
        while let Some(o) = self.core.poll_output() {
            if let Some(answer) = take_output(&mut self.relays, &mut self.later, o) {
                // Answers follow `handle_stun` only, whose caller takes them.
                tracing::debug!(?answer, "core answer outside a request dropped");
            }
        }
        let mut later = std::mem::take(&mut self.later);
        let mut backlog = std::mem::take(&mut self.backlog);
        for l in &mut later {
            let Later::Send { to, msg } = l else {
                continue;
            };
            let Some(&ci) = self.conn_by_tuple.get(to) else {
                continue;
            };
            let Some(c) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                continue;
            };
            if c.splice.is_some() {
                // Never STUN into a raw byte stream.
                continue;
            }
            if !c.out.push_control(msg) {
                backlog.push(ci);
            } else if !c.dirty {
                c.dirty = true;
                self.dirty_conns.push(ci);
            }
        }
        self.flush_dirty_conns();
        for ci in backlog.drain(..) {
            self.close_conn(ci, CloseReason::Backlog);
        }
        self.backlog = backlog;
        for l in later.drain(..) {
            let Later::CloseData { ci, id } = l else {
                continue;
            };
            let bound = self
                .conns
                .get(ci)
                .and_then(Option::as_ref)
                .and_then(|c| c.splice)
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
    pub(super) fn relay_accept(&mut self, ri: usize, now: Now) -> bool {
        let relay = RelayId::from_index(ri);
        let mut more = true;
        for _ in 0..ACCEPT_BATCH {
            let Some((l, _)) = self.relays.tcp_listener(relay) else {
                more = false;
                break;
            };
            let (sock, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) => {
                    // EMFILE and friends: try again at housekeeping rather than spin.
                    tracing::debug!(error = %e, "TCP relay accept failed");
                    if !self.relay_accept_retry.contains(&ri) {
                        self.relay_accept_retry.push(ri);
                    }
                    more = false;
                    break;
                }
            };
            let _ = sock.set_nodelay(true);
            // `None`: no permission or over the limit; dropping the socket closes it.
            if let Some(id) = self.core.tcp_peer_accepted(now, relay, peer) {
                let peers = &mut self.relays.peers;
                if let Err(e) =
                    peers.add_mio(&self.relays.registry, sock, id, relay, PeerState::Waiting)
                {
                    tracing::debug!(error = %e, "TCP relay peer registration failed");
                    self.core.tcp_conn_closed(id);
                }
            }
        }
        self.after_core();
        more
    }

    /// An event on peer socket `pi`. `true` if more may wait.
    pub(super) fn peer_event(&mut self, pi: usize, now: Now) -> bool {
        let Some(p) = self.relays.peers.get_mut(pi) else {
            return false;
        };
        match p.state {
            PeerState::Connecting(_) => {
                // Writable (or an error/hang-up) ends a non-blocking connect.
                let ok = match p.sock.take_error() {
                    Ok(Some(_)) | Err(_) => Some(false),
                    Ok(None) => match p.sock.peer_addr() {
                        Ok(_) => Some(true),
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                        Err(_) => Some(false),
                    },
                };
                if let Some(ok) = ok {
                    let id = p.id;
                    self.connect_done(id, ok, now);
                }
                false
            }
            PeerState::Waiting => false,
            PeerState::Bound(ci) => self.pump(ci, now),
        }
    }

    /// The connect of peer connection `id` ended (RFC 6062 §5.2).
    pub(super) fn connect_done(&mut self, id: ConnId, ok: bool, now: Now) {
        if !ok {
            self.stats.tcp_relay_connect_failures += 1;
        }
        let keep = self.core.tcp_connect_done(now, id, ok);
        let registry = &self.relays.registry;
        let peers = &mut self.relays.peers;
        match peers.slot_of(id).and_then(|s| peers.get_mut(s)) {
            Some(p) if keep && ok => p.state = PeerState::Waiting,
            Some(_) => drop(peers.take(registry, id)),
            None => {}
        }
        self.after_core();
    }

    /// Fails connects older than [`CONNECT_TIMEOUT`] (housekeeping).
    pub(super) fn expire_connects(&mut self, now: Now) {
        let Some(deadline) = now.mono.checked_sub(CONNECT_TIMEOUT) else {
            return;
        };
        let mut ids = std::mem::take(&mut self.expired_ids);
        self.relays.peers.connects_older_than(deadline, &mut ids);
        for id in ids.drain(..) {
            self.connect_done(id, false, now);
        }
        self.expired_ids = ids;
    }

    /// `Output::BindData`: client connection `ci` becomes the data connection of peer
    /// connection `id` (RFC 6062 §5.4). Bytes after the ConnectionBind still in its InBuf
    /// are the first client data for the peer. `true` if more may wait.
    pub(super) fn bind_data(&mut self, ci: usize, id: ConnId, now: Now) -> bool {
        let slot = self.relays.peers.slot_of(id);
        let peer = slot.and_then(|s| self.relays.peers.get_mut(s));
        let (Some(slot), Some(peer)) = (slot, peer) else {
            self.close_conn(ci, CloseReason::Error);
            return false;
        };
        if peer.state != PeerState::Waiting {
            self.close_conn(ci, CloseReason::Error);
            return false;
        }
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return false;
        };
        peer.state = PeerState::Bound(ci);
        conn.permit = None;
        conn.inbuf.set_max(SPLICE_QUEUE);
        conn.dirty = false;
        conn.splice = Some(Splice {
            id,
            peer: slot,
            client_eof: false,
            peer_eof: false,
            peer_shut: false,
            client_closing: false,
            client_shut: false,
        });
        self.pump(ci, now)
    }

    /// Moves bytes both ways between spliced client connection `ci` and its peer, as far as
    /// sockets and queues allow: a side is read only while the other side's queue has room
    /// (edge-triggered: the other side's writable event calls this again). The client's
    /// EOF is passed on as a write shutdown to the peer once its queue is flushed, and the
    /// peer may still answer; the peer's EOF (once the client has every byte before it,
    /// then FIN or TLS close_notify) or an error closes the pair. `true` if more may wait
    /// (fairness cap).
    pub(super) fn pump(&mut self, ci: usize, now: Now) -> bool {
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return false;
        };
        let Some(sp) = conn.splice.as_mut() else {
            return false;
        };
        let peer = match self.relays.peers.get_mut(sp.peer) {
            Some(p) if p.id == sp.id && p.state == PeerState::Bound(ci) => Some(p),
            _ => None,
        };
        let Some(peer) = peer else {
            self.close_conn(ci, CloseReason::Error);
            return false;
        };
        let relay = peer.relay;
        // turn.max_bytes_per_sec: a capped splice reads only what its budget allows and
        // waits (housekeeping pumps it again) rather than dropping stream bytes.
        let (mut budget_to_peer, mut budget_to_client) =
            super::relays::bandwidth_budget(&mut self.relays.socks, relay, now.mono);
        let mut throttled = false;
        let tls = self.tls.as_ref();
        let buf = &mut self.splice_buf[..];
        let (mut failed, mut more) = (false, false);
        let (mut to_client, mut to_client_n, mut to_peer, mut to_peer_n) = (0u64, 0u64, 0u64, 0u64);

        // Peer → client, into the client's OutBuf while it has room.
        for turn in 0..=MAX_BATCHES_PER_TURN {
            if conn
                .link
                .flush_as(&mut conn.sock, &mut conn.out, false)
                .is_err()
            {
                failed = true;
                break;
            }
            let room = conn.out.data_room().min(buf.len());
            if sp.peer_eof || room == 0 {
                break;
            }
            let room = room.min(usize::try_from(budget_to_client).unwrap_or(usize::MAX));
            if room == 0 {
                throttled = true;
                break;
            }
            if turn == MAX_BATCHES_PER_TURN {
                more = true;
                break;
            }
            match peer.sock.read(&mut buf[..room]) {
                Ok(0) => sp.peer_eof = true,
                Ok(n) => {
                    // Cannot fail: n <= room.
                    conn.out.push_data(&buf[..n]);
                    to_client += n as u64;
                    to_client_n += 1;
                    budget_to_client = budget_to_client.saturating_sub(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }

        // Client → peer, out of the client's InBuf; read more only once it is written.
        if !failed {
            for turn in 0..=MAX_BATCHES_PER_TURN {
                let mut blocked = false;
                while !conn.inbuf.data().is_empty() {
                    let data = conn.inbuf.data();
                    let allowed = data
                        .len()
                        .min(usize::try_from(budget_to_peer).unwrap_or(usize::MAX));
                    if allowed == 0 {
                        throttled = true;
                        blocked = true;
                        break;
                    }
                    match peer.sock.write(&data[..allowed]) {
                        Ok(0) => {
                            failed = true;
                            break;
                        }
                        Ok(n) => {
                            conn.inbuf.consume(n);
                            to_peer += n as u64;
                            to_peer_n += 1;
                            budget_to_peer = budget_to_peer.saturating_sub(n as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            blocked = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed || blocked || sp.client_eof || !conn.inbuf.has_room() {
                    break;
                }
                if turn == MAX_BATCHES_PER_TURN {
                    more = true;
                    break;
                }
                match conn.link.fill(&mut conn.sock, &mut conn.inbuf, tls) {
                    Ok(0) => sp.client_eof = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }

        // Half-closes: EOF from one side becomes a write shutdown towards the other once
        // everything before it has been written.
        if !failed {
            if sp.client_eof && conn.inbuf.data().is_empty() && !sp.peer_shut {
                let _ = peer.sock.shutdown(Shutdown::Write);
                sp.peer_shut = true;
            }
            if sp.peer_eof && conn.out.queued() == 0 && !sp.client_closing {
                conn.link.send_close();
                sp.client_closing = true;
            }
            // Also writes TLS records the reads produced.
            match conn.link.flush_as(&mut conn.sock, &mut conn.out, false) {
                Ok(true) if sp.client_closing && !sp.client_shut => {
                    let _ = conn.sock.shutdown(Shutdown::Write);
                    sp.client_shut = true;
                }
                Ok(_) => {}
                Err(_) => failed = true,
            }
        }
        // The pair ends once the client has everything the peer sent: after the client's
        // FIN the peer may still answer (half-close), but a peer's FIN ends the pair as
        // RFC 6062 servers do (coturn too), which frees the peer address for a new Connect.
        let done = sp.client_shut;
        if to_client_n + to_peer_n > 0 {
            conn.last_message = now.mono;
        }
        self.stats.tcp_relay_peer_to_client_bytes += to_client;
        self.stats.tcp_relay_peer_to_client_chunks += to_client_n;
        self.stats.tcp_relay_client_to_peer_bytes += to_peer;
        self.stats.tcp_relay_client_to_peer_chunks += to_peer_n;
        self.relays.count_to_client(relay, to_client, to_client_n);
        self.relays.count_to_peer(relay, to_peer, to_peer_n);
        super::relays::bandwidth_spend(&mut self.relays.socks, relay, to_peer, to_client);
        if throttled && !failed && !done {
            self.stats.tcp_relay_throttled += 1;
            if !self.throttled.contains(&ci) {
                self.throttled.push(ci);
            }
        }
        if failed || done {
            let reason = if failed {
                CloseReason::Error
            } else {
                CloseReason::Eof
            };
            self.close_conn(ci, reason);
            return false;
        }
        more
    }
}
