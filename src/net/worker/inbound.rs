//! The one place client input meets the core, for UDP and TCP/TLS clients alike:
//! [`Inbound`] borrows, for one read, what handling a client's message needs besides the
//! client's own connection (the core, the relay sockets, the batch to peers, the core's
//! answer buffer, the queue of outputs for later and the counters).
//!
//! Owns nothing: `udp.rs` and `conns.rs` call it with their own client, and `mod.rs`
//! builds it from the worker's fields and applies the [`Later`] outputs it queued (they
//! touch client connections, which the caller holds while it runs). Must not: allocate per
//! packet, or send to clients itself (the caller knows the client's socket).

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::relays::{PeerBatch, Relays};
use crate::net::stats::NetStats;
use crate::stun::ChannelNumber;
use crate::turn::{ConnId, FiveTuple, Now, Output, RelayId, Server, Transport};

/// Size of the buffer the core writes its answers into (`Server::handle_stun`).
pub(super) const OUT_LEN: usize = 2048;

/// A core output that touches client connections (see [`take_output`]), applied by the
/// worker once the loop that called the core lets go of them.
pub(super) enum Later {
    /// `Output::Send`: a message for control connection `to`.
    Send { to: FiveTuple, msg: Vec<u8> },
    /// The client data connection in slot `ci` was spliced to peer connection `id`, which
    /// the core closed (`Output::ClosePeerConn`): it closes too.
    CloseData { ci: usize, id: ConnId },
}

/// Does at once what the core asked for that needs only the relay sockets (closing a
/// relay socket or a peer connection), queues in `later` what touches client connections,
/// and hands back an answer to the message just handled (`Reply`, `Forward`, `BindData`)
/// for the caller to send.
pub(super) fn take_output(
    relays: &mut Relays,
    later: &mut Vec<Later>,
    o: Output,
) -> Option<Output> {
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
/// from the worker for one read (the worker's `inbound!` builds it).
pub(super) struct Inbound<'a> {
    pub(super) core: &'a mut Server,
    pub(super) relays: &'a mut Relays,
    pub(super) to_peer: &'a mut PeerBatch,
    pub(super) out: &'a mut [u8; OUT_LEN],
    pub(super) later: &'a mut Vec<Later>,
    pub(super) stats: &'a mut NetStats,
}

/// The core's answer to a client's STUN message, in `out[..len]`, for the caller to send on
/// that client's connection.
pub(super) enum Answer {
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
    #[inline]
    pub(super) unsafe fn channel_data(
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
    #[inline]
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
    pub(super) unsafe fn stun(&mut self, now: Now, from: FiveTuple, msg: &[u8]) -> Option<Answer> {
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

/// The time the core is called with.
pub(super) fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// A STUN request (as opposed to an indication or a response), RFC 8489 §5.
fn is_request(msg: &[u8]) -> bool {
    msg.len() >= 2 && msg[0] & 0x01 == 0 && msg[1] & 0x10 == 0
}
