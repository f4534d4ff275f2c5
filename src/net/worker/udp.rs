//! TURN over UDP for one worker: its UDP listener sockets (shared with the other workers
//! through SO_REUSEPORT), client datagrams read a batch at a time (STUN through the core,
//! ChannelData straight out of the receive buffer to the relay socket, RFC 8656 §12.4),
//! control answers sent back one at a time, and peer→client datagrams batched per listener.
//!
//! Owns: the listeners and their send batches. Must not: allocate per packet, or call the
//! core other than through [`Inbound`] (what the core asks for outside an answer is the
//! worker's to apply, after each batch).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use super::inbound::{Answer, Inbound};
use super::token::Tok;
use crate::net::gso::GsoBatch;
use crate::net::mmsg::{RecvBatch, SendBatch};
use crate::net::stats::NetStats;
use crate::stun::{classify, Kind, CHANNEL_DATA_HEADER};
use crate::turn::{FiveTuple, Now, Transport};

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

    fn flush(&mut self, stats: &mut NetStats) {
        let f = self.out.flush(self.sock.as_raw_fd());
        stats.peer_to_client_udp_packets += f.sent as u64;
        stats.peer_to_client_udp_bytes += f.sent_bytes as u64;
        stats.drop_send_error += f.failed as u64;
    }
}

/// One batch read from a UDP listener.
pub(super) struct Batch {
    /// The batch was full: more may wait.
    pub(super) full: bool,
    /// A STUN message went through the core: what it asked for is to be applied.
    pub(super) stun_seen: bool,
}

/// A worker's UDP listeners.
pub(super) struct Udp {
    listeners: Vec<UdpListener>,
    /// One control answer at a time, with packet info when the listener is a wildcard.
    reply: SendBatch,
    /// Datagrams per send batch.
    batch: usize,
}

impl Udp {
    pub(super) fn new(batch: usize) -> Udp {
        Udp {
            listeners: Vec::new(),
            reply: SendBatch::new(1),
            batch,
        }
    }

    /// Registers `sock`, bound to `addr`, as the next listener.
    pub(super) fn add(
        &mut self,
        registry: &Registry,
        addr: SocketAddr,
        sock: std::net::UdpSocket,
    ) -> io::Result<()> {
        let mut sock = UdpSocket::from_std(sock);
        let tok = Tok::Udp(self.listeners.len()).token();
        registry.register(&mut sock, tok, Interest::READABLE)?;
        self.listeners.push(UdpListener {
            addr,
            wildcard: addr.ip().is_unspecified(),
            sock,
            out: GsoBatch::new(self.batch),
        });
        Ok(())
    }

    /// One batch of client datagrams on listener `li` into `rx`: STUN to the core,
    /// ChannelData straight out of `rx` through the allocation's relay socket, answers
    /// back to their client. `None` when there was nothing to read.
    pub(super) fn read_batch(
        &mut self,
        li: usize,
        rx: &mut RecvBatch,
        cx: &mut Inbound<'_>,
        now: Now,
    ) -> Option<Batch> {
        let l = self.listeners.get(li)?;
        let fd = l.sock.as_raw_fd();
        let (bound, wildcard) = (l.addr, l.wildcard);
        let n = match rx.recv(fd, 0, 0, cx.stats) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                tracing::debug!(error = %e, "UDP listener receive error");
                return None;
            }
        };
        let mut stun_seen = false;
        for i in 0..n {
            let r = rx.received(i);
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
            let msg = rx.payload(i);
            match classify(msg) {
                Kind::ChannelData { channel, len } => {
                    let payload = &msg[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
                    // SAFETY: `rx` is not received into again before the flush at the end
                    // of this batch.
                    unsafe { cx.channel_data(&from, channel, payload, now.mono) };
                }
                Kind::Stun => {
                    stun_seen = true;
                    // SAFETY: as above.
                    if let Some(Answer::Reply(len) | Answer::Bind(_, len)) =
                        unsafe { cx.stun(now, from, msg) }
                    {
                        // ConnectionBind over UDP gets 400 from the core; never BindData.
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
        Some(Batch {
            full: n >= self.batch,
            stun_seen,
        })
    }

    /// Queues `frame` for UDP client `to` on the listener it reached (flushing that
    /// listener's batch first when full); `false` if no listener serves it.
    ///
    /// # Safety
    /// `frame` must stay valid until the next [`Self::flush_to_clients`].
    #[inline]
    pub(super) unsafe fn push_to_client(
        &mut self,
        to: &FiveTuple,
        frame: &[u8],
        stats: &mut NetStats,
    ) -> bool {
        let server = to.server;
        let Some(l) = self.listeners.iter_mut().find(|l| l.serves(server)) else {
            return false;
        };
        if l.out.is_full() {
            l.flush(stats);
        }
        let src = l.source_for(server);
        // SAFETY: the caller's.
        unsafe { l.out.push(frame, to.client, src) };
        true
    }

    /// Sends what [`Self::push_to_client`] queued.
    #[inline]
    pub(super) fn flush_to_clients(&mut self, stats: &mut NetStats) {
        for l in &mut self.listeners {
            if !l.out.is_empty() {
                l.flush(stats);
            }
        }
    }
}
