//! RFC 6062 splicing (§5.4, §5.5) in one worker: raw bytes both ways between a client data
//! connection and the peer connection it bound, with bounded queues and backpressure,
//! `turn.max_bytes_per_sec` pacing, half-close and close.
//!
//! Owns: the per-connection [`Splice`] state (kept in the client's `Conn`), the worker's
//! scratch buffer for peer reads and the list of splices paused by their budget. Must not:
//! close either side itself or call the core: [`Pumped`] says what the worker does next.
//! Depends on `relays.rs` (the peer connection and its relay's budgets) only; the client
//! side comes in as a [`Client`] borrowed from `conns.rs`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::peers::PeerState;
use super::relays::Relays;
use super::token::MAX_BATCHES_PER_TURN;
use crate::net::link::Link;
use crate::net::stats::NetStats;
use crate::net::tcp::{InBuf, OutBuf};
use crate::turn::ConnId;

/// Largest single read from a peer (the scratch buffer).
const SPLICE_READ: usize = 64 * 1024;

/// The state of a client data connection spliced to peer connection `id`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Splice {
    pub(super) id: ConnId,
    /// The peer's slot in `Relays`' peer connections.
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

impl Splice {
    pub(super) fn new(id: ConnId, peer: usize) -> Splice {
        Splice {
            id,
            peer,
            client_eof: false,
            peer_eof: false,
            peer_shut: false,
            client_closing: false,
            client_shut: false,
        }
    }
}

/// The client side of a splice, borrowed from its connection (`Conns::spliced`).
pub(super) struct Client<'a> {
    pub(super) sock: &'a mut TcpStream,
    pub(super) link: &'a mut Link,
    pub(super) inbuf: &'a mut InBuf,
    pub(super) out: &'a mut OutBuf,
    pub(super) last_message: &'a mut Instant,
}

/// What a pump leaves the worker to do.
pub(super) enum Pumped {
    /// Still open; `true` if more may wait (fairness cap).
    Open(bool),
    /// Both sides are done (the peer's EOF reached the client): close the pair.
    Done,
    /// A side failed, or the peer connection is gone: close the pair.
    Failed,
}

/// The splicing side of a worker.
pub(super) struct Splicer {
    /// Peer→client reads land here first.
    buf: Box<[u8]>,
    /// Spliced data connections that stopped at their `turn.max_bytes_per_sec` budget:
    /// housekeeping pumps them again (their sockets' readiness edges were already taken).
    throttled: Vec<usize>,
}

impl Splicer {
    pub(super) fn new() -> Splicer {
        Splicer {
            buf: vec![0u8; SPLICE_READ].into_boxed_slice(),
            throttled: Vec::new(),
        }
    }

    /// The connections paused by their budget since the last call.
    pub(super) fn take_throttled(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.throttled)
    }

    /// Moves bytes both ways between spliced client connection `ci` (`sp`, `c`) and its
    /// peer, as far as sockets and queues allow: a side is read only while the other
    /// side's queue has room (edge-triggered: the other side's writable event calls this
    /// again). The client's EOF is passed on as a write shutdown to the peer once its queue
    /// is flushed, and the peer may still answer; the peer's EOF (once the client has every
    /// byte before it, then FIN or TLS close_notify) or an error ends the pair.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pump(
        &mut self,
        ci: usize,
        sp: &mut Splice,
        c: Client<'_>,
        relays: &mut Relays,
        tls: Option<&Arc<rustls::ServerConfig>>,
        stats: &mut NetStats,
        now: Instant,
    ) -> Pumped {
        let relay = match relays.peer(sp.peer) {
            Some(p) if p.id == sp.id && p.state == PeerState::Bound(ci) => p.relay,
            _ => return Pumped::Failed,
        };
        // turn.max_bytes_per_sec: a capped splice reads only what its budget allows and
        // waits (housekeeping pumps it again) rather than dropping stream bytes.
        let (mut budget_to_peer, mut budget_to_client) = relays.bandwidth_budget(relay, now);
        let Some(peer) = relays.peer_mut(sp.peer) else {
            return Pumped::Failed;
        };
        let mut throttled = false;
        let buf = &mut self.buf[..];
        let (mut failed, mut more) = (false, false);
        let (mut to_client, mut to_client_n, mut to_peer, mut to_peer_n) = (0u64, 0u64, 0u64, 0u64);

        // Peer → client, into the client's OutBuf while it has room.
        for turn in 0..=MAX_BATCHES_PER_TURN {
            if c.link.flush_as(c.sock, c.out, false).is_err() {
                failed = true;
                break;
            }
            let room = c.out.data_room().min(buf.len());
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
                    c.out.push_data(&buf[..n]);
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
                while !c.inbuf.data().is_empty() {
                    let data = c.inbuf.data();
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
                            c.inbuf.consume(n);
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
                if failed || blocked || sp.client_eof || !c.inbuf.has_room() {
                    break;
                }
                if turn == MAX_BATCHES_PER_TURN {
                    more = true;
                    break;
                }
                match c.link.fill(c.sock, c.inbuf, tls) {
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
            if sp.client_eof && c.inbuf.data().is_empty() && !sp.peer_shut {
                let _ = peer.sock.shutdown(Shutdown::Write);
                sp.peer_shut = true;
            }
            if sp.peer_eof && c.out.queued() == 0 && !sp.client_closing {
                c.link.send_close();
                sp.client_closing = true;
            }
            // Also writes TLS records the reads produced.
            match c.link.flush_as(c.sock, c.out, false) {
                Ok(true) if sp.client_closing && !sp.client_shut => {
                    let _ = c.sock.shutdown(Shutdown::Write);
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
            *c.last_message = now;
        }
        stats.tcp_relay_peer_to_client_bytes += to_client;
        stats.tcp_relay_peer_to_client_chunks += to_client_n;
        stats.tcp_relay_client_to_peer_bytes += to_peer;
        stats.tcp_relay_client_to_peer_chunks += to_peer_n;
        relays.spliced(relay, (to_peer, to_peer_n), (to_client, to_client_n));
        if failed {
            return Pumped::Failed;
        }
        if done {
            return Pumped::Done;
        }
        if throttled {
            stats.tcp_relay_throttled += 1;
            if !self.throttled.contains(&ci) {
                self.throttled.push(ci);
            }
        }
        Pumped::Open(more)
    }
}
