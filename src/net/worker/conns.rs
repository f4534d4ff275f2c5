//! TURN over TCP (RFC 8656 §3.1) for one worker: accepting within the per-IP limit,
//! framing client input, relaying, write queues, idle timeout and close.

use std::io;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Interest;

use super::splice::Splice;
use super::token::Tok;
use super::{
    inbound, Answer, Inbound, Worker, MAX_BATCHES_PER_TURN, TCP_DATA_QUEUE, TCP_HARD_QUEUE,
};
use crate::net::link::{is_tls_error, Link};
use crate::net::tcp::{InBuf, IpPermit, OutBuf, MAX_FRAME};
use crate::stun::{classify, connection_bind_id, tcp_frame_len, Kind, CHANNEL_DATA_HEADER};
use crate::turn::{conn_shard, ConnId, FiveTuple, Now, Transport};

/// What a TCP listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenMode {
    Plain,
    Tls,
    /// Plain TURN/TCP or TLS, told apart by the first byte (`turn.sniff_tls`).
    Sniff,
}

pub(super) struct Conn {
    pub(super) sock: TcpStream,
    pub(super) link: Link,
    pub(super) opened: Instant,
    pub(super) tuple: FiveTuple,
    pub(super) inbuf: InBuf,
    pub(super) out: OutBuf,
    /// Last message from the client, or (control connections) peer data sent to it, or
    /// (data connections) bytes spliced either way. The idle timeout runs from here for
    /// connections that are neither a control connection nor a bound data connection.
    pub(super) last_message: Instant,
    pub(super) dirty: bool,
    /// Set once this is an RFC 6062 client data connection carrying raw bytes (§5.4).
    pub(super) splice: Option<Splice>,
    /// Already moved to another worker once: a legitimate data connection needs one move,
    /// so a client cannot bounce its connection between workers with forged IDs.
    pub(super) handed_over: bool,
    /// This connection's slot in turn.tcp_max_per_ip. Released once it is bound as an
    /// RFC 6062 data connection: the allocation's turn.tcp_relay_max_connections (an
    /// authenticated quota) governs those, so one client can use its whole allowance.
    pub(super) permit: Option<IpPermit>,
}

/// Why a client connection's frame loop stopped before reading everything.
enum Stop {
    Close(CloseReason),
    /// ConnectionBind succeeded: the rest of the InBuf is raw client data (RFC 6062 §5.4).
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

impl Worker {
    /// A free slot of the connection table with `sock` registered under its token (the
    /// slot is free again on error). Accepted and handed-over connections both come here.
    pub(super) fn register_conn(&mut self, sock: &mut TcpStream) -> io::Result<usize> {
        let ci = match self.free_conns.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            sock,
            Tok::Conn(ci).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free_conns.push(ci);
            return Err(e);
        }
        Ok(ci)
    }

    pub(super) fn flush_dirty_conns(&mut self) {
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
    pub(super) fn accept(&mut self, li: usize, now: Now) -> bool {
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
            // The address the client reached (the listener may be a wildcard).
            let server = sock.local_addr().unwrap_or(server);
            let ci = match self.register_conn(&mut sock) {
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
                splice: None,
                handed_over: false,
                permit: Some(permit),
            });
        }
        true
    }

    pub(super) fn conn_writable(&mut self, ci: usize) {
        let failed = match self.conns.get_mut(ci).and_then(Option::as_mut) {
            Some(c) => c.link.flush(&mut c.sock, &mut c.out).is_err(),
            None => false,
        };
        if failed {
            self.close_conn(ci, CloseReason::Error);
        }
    }

    /// Frames from TCP client `ci`: first those already buffered (a handed-over connection
    /// arrives with its ConnectionBind unread), then what the socket has. A spliced data
    /// connection is pumped instead. `true` if more may wait.
    pub(super) fn conn_readable(&mut self, ci: usize, now: Now) -> bool {
        match self.conns.get(ci).and_then(Option::as_ref) {
            None => return false,
            Some(c) if c.splice.is_some() => return self.pump(ci, now),
            Some(_) => {}
        }
        let mut stop = None;
        let mut more = true;
        for turn in 0..=MAX_BATCHES_PER_TURN {
            let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                return false;
            };
            let mut cx = inbound!(self);
            loop {
                let data = conn.inbuf.data();
                let n = match tcp_frame_len(data) {
                    Ok(None) => break,
                    Ok(Some(n)) if n > MAX_FRAME || n == 0 => {
                        stop = Some(Stop::Close(CloseReason::Garbage));
                        break;
                    }
                    Ok(Some(n)) if n > data.len() => break,
                    Ok(Some(n)) => n,
                    Err(_) => {
                        stop = Some(Stop::Close(CloseReason::Garbage));
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
                        // RFC 6062 §5.4: a ConnectionBind belongs to the shard that issued
                        // its CONNECTION-ID; a control connection's own requests stay here.
                        let foreign = connection_bind_id(frame)
                            .map(conn_shard)
                            .filter(|&t| t != self.index && t < self.inboxes.len());
                        if let Some(target) = foreign.filter(|_| !conn.handed_over) {
                            if !cx.core.has_allocation(&conn.tuple) {
                                stop = Some(Stop::HandOver(target));
                                break;
                            }
                        }
                        // SAFETY: as above.
                        match unsafe { cx.stun(now, conn.tuple, frame) } {
                            None => {}
                            Some(Answer::Reply(len)) => {
                                let queued = conn.out.push_control(&cx.out[..len]);
                                if !queued {
                                    stop = Some(Stop::Close(CloseReason::Backlog));
                                }
                            }
                            Some(Answer::Bind(id, len)) => {
                                stop = Some(if conn.out.push_control(&cx.out[..len]) {
                                    Stop::Bind(id)
                                } else {
                                    Stop::Close(CloseReason::Backlog)
                                });
                            }
                        }
                    }
                    Kind::Invalid => {
                        cx.stats.drop_invalid += 1;
                        stop = Some(Stop::Close(CloseReason::Garbage));
                    }
                }
                match stop {
                    // The ConnectionBind itself is consumed; what follows is raw data.
                    Some(Stop::Bind(_)) => {
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
                stop = Some(Stop::Close(CloseReason::Error));
                break;
            }
            if turn == MAX_BATCHES_PER_TURN {
                break;
            }
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
            stop = Some(Stop::Close(reason));
            break;
        }
        self.to_peer.flush(&mut self.stats);
        if stop.is_none() {
            // TLS handshake records produced by the last read wait for no frame.
            if let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) {
                if conn.link.flush(&mut conn.sock, &mut conn.out).is_err() {
                    stop = Some(Stop::Close(CloseReason::Error));
                }
            }
        }
        if let Some(Stop::Close(reason)) = stop {
            // Also delivers what the shard queued meanwhile.
            self.close_conn(ci, reason);
            return false;
        }
        // Connect responses and attempts the requests queued, peers the core closed.
        self.after_core();
        match stop {
            Some(Stop::HandOver(target)) => {
                self.hand_over(ci, target);
                false
            }
            Some(Stop::Bind(id)) => self.bind_data(ci, id, now),
            _ => more,
        }
    }

    pub(super) fn close_conn(&mut self, ci: usize, reason: CloseReason) {
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
        match c.splice {
            // A data connection takes its peer connection along (unless the core closed
            // that one first) and is no allocation's control connection.
            Some(sp) => {
                if let Some(p) = self.relays.peers.take(&self.relays.registry, sp.id) {
                    drop(p);
                    self.core.tcp_conn_closed(sp.id);
                    self.after_core();
                }
            }
            None => {
                self.core
                    .client_closed(&c.tuple, super::now(), &mut self.relays);
                self.after_core();
            }
        }
        // The socket and the per-IP permit go with `c`.
    }

    pub(super) fn close_idle(&mut self, now: Instant) {
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
            } else if now.saturating_duration_since(c.last_message) >= self.tcp_idle
                // An allocation's control connection lives as long as the allocation (its
                // lifetime and Refresh govern it): an RFC 6062 client may send nothing on
                // it for minutes while its data connections carry the traffic. A bound data
                // connection is an application's TCP stream, quiet as long as it likes: it
                // ends with its peer or its allocation (RFC 6062 §5.5).
                && !self.core.has_allocation(&c.tuple)
                && c.splice.is_none()
            {
                self.close_conn(ci, CloseReason::Idle);
            } else if let Some(c) = self.conns[ci].as_mut() {
                // Queues grown by a burst go back to the allocator once drained.
                c.inbuf.trim();
                c.out.trim();
            }
        }
    }
}
