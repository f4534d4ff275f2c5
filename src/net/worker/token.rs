//! What a worker's mio tokens name: the kind of socket and its slot in the table of the
//! struct that owns it, and how much one event may do ([`MAX_BATCHES_PER_TURN`]). A leaf
//! module: every owner registers its sockets with a [`Tok`], and only `mod.rs` turns
//! events back into one.

use mio::Token;

/// Batches read from one socket (or reads of one connection) before the loop looks at
/// other sockets (fairness); the socket's token is then served again on the next turn.
pub(super) const MAX_BATCHES_PER_TURN: usize = 16;

/// Kind bits above this shift, the owner's slot below.
const KIND_SHIFT: u32 = 28;

/// Largest slot a table may hand out (the rest of the token holds the kind).
pub(super) const MAX_SLOT: usize = (1 << KIND_SHIFT) - 1;

/// A socket of a worker, by kind and slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tok {
    /// Shutdown, a new configuration, or handed-over connections.
    Waker,
    /// UDP listener `n` (`udp.rs`).
    Udp(usize),
    /// TCP/TLS listener `n` (`conns.rs`).
    TcpListener(usize),
    /// Client TCP/TLS connection in slot `n` (`conns.rs`).
    Conn(usize),
    /// Relay socket or RFC 6062 TCP relay listener `n` (`relays.rs`).
    Relay(usize),
    /// RFC 6062 peer connection in slot `n` (`peers.rs`).
    Peer(usize),
}

impl Tok {
    pub(super) fn token(self) -> Token {
        let (kind, slot) = match self {
            Tok::Waker => (0, 0),
            Tok::Udp(n) => (1, n),
            Tok::TcpListener(n) => (2, n),
            Tok::Conn(n) => (3, n),
            Tok::Relay(n) => (4, n),
            Tok::Peer(n) => (5, n),
        };
        Token((kind << KIND_SHIFT) | slot)
    }

    /// The socket `t` names; `None` for a token no owner made.
    pub(super) fn of(t: Token) -> Option<Tok> {
        let slot = t.0 & MAX_SLOT;
        Some(match t.0 >> KIND_SHIFT {
            0 => Tok::Waker,
            1 => Tok::Udp(slot),
            2 => Tok::TcpListener(slot),
            3 => Tok::Conn(slot),
            4 => Tok::Relay(slot),
            5 => Tok::Peer(slot),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for t in [
            Tok::Waker,
            Tok::Udp(3),
            Tok::TcpListener(0),
            Tok::Conn(MAX_SLOT),
            Tok::Relay(17),
            Tok::Peer(1 << 20),
        ] {
            assert_eq!(Tok::of(t.token()), Some(t));
        }
        assert_eq!(Tok::of(Token(9 << KIND_SHIFT)), None);
    }
}
