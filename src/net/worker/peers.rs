//! The peer side of RFC 6062 TCP relays in one worker: outgoing connects (§5.2), accepted
//! peer connections (§5.3) waiting for their ConnectionBind, and bound ones spliced to a
//! client data connection (§5.4). Sockets live here because the shard opens and closes
//! them through [`crate::turn::RelayIo`]; `Relays` holds this table (with the relay
//! listeners the peers connect to), the splicing itself is `splice.rs`.
//!
//! Owns: the peer connections by slot (the mio token) and by CONNECTION-ID, kept in step by
//! `add_mio` and `take`. Must not: call the core (`Relays` does, around this table).

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::token::{Tok, MAX_SLOT};
use crate::turn::{ConnId, RelayId};

/// An outgoing peer connect that has not finished by then fails (447, RFC 6062 §5.2): a
/// safety net behind the core's own 30 s timer.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(35);

/// What an event on a peer socket asks of the worker.
pub(super) enum PeerEvent {
    Nothing,
    /// The connect of `ConnId` ended, successfully or not (RFC 6062 §5.2).
    ConnectDone(ConnId, bool),
    /// Bound to client connection slot `ci`: pump the splice.
    Pump(usize),
}

/// Where a peer connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerState {
    /// Our connect is in progress since then.
    Connecting(Instant),
    /// Connected; not read until a client data connection binds it (RFC 6062 §5.2, §5.3).
    Waiting,
    /// Spliced to client connection slot `ci` of the worker.
    Bound(usize),
}

impl PeerState {
    pub(super) fn connecting() -> PeerState {
        PeerState::Connecting(Instant::now())
    }
}

pub(super) struct PeerConn {
    pub(super) sock: TcpStream,
    pub(super) id: ConnId,
    pub(super) relay: RelayId,
    pub(super) state: PeerState,
}

/// The peer connections of one worker, by slot (the mio token) and by CONNECTION-ID.
#[derive(Default)]
pub(super) struct Peers {
    slots: Vec<Option<PeerConn>>,
    free: Vec<usize>,
    by_id: HashMap<ConnId, usize>,
    /// Connects that could not even start (counted here: the core answers 447).
    pub(super) connect_failures: u64,
}

impl Peers {
    /// Peer sockets open now.
    pub(super) fn open(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn slot_of(&self, id: ConnId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    pub(super) fn get(&self, slot: usize) -> Option<&PeerConn> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> Option<&mut PeerConn> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// An event on peer socket `slot`.
    pub(super) fn event(&mut self, slot: usize) -> PeerEvent {
        let Some(p) = self.get_mut(slot) else {
            return PeerEvent::Nothing;
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
                match ok {
                    Some(ok) => PeerEvent::ConnectDone(p.id, ok),
                    None => PeerEvent::Nothing,
                }
            }
            PeerState::Waiting => PeerEvent::Nothing,
            PeerState::Bound(ci) => PeerEvent::Pump(ci),
        }
    }

    /// Registers `sock` as peer connection `id` of TCP relay `relay`.
    pub(super) fn add(
        &mut self,
        registry: &Registry,
        sock: std::net::TcpStream,
        id: ConnId,
        relay: RelayId,
        state: PeerState,
    ) -> io::Result<()> {
        self.add_mio(registry, TcpStream::from_std(sock), id, relay, state)
    }

    pub(super) fn add_mio(
        &mut self,
        registry: &Registry,
        mut sock: TcpStream,
        id: ConnId,
        relay: RelayId,
        state: PeerState,
    ) -> io::Result<()> {
        if self.by_id.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "CONNECTION-ID in use",
            ));
        }
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() > MAX_SLOT {
                    return Err(io::Error::other("too many peer connections in one worker"));
                }
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        // Both directions from the start: WRITABLE reports the connect's outcome; a
        // waiting connection's readiness is ignored until it is bound (edge-triggered,
        // so binding reads at once instead of waiting for an edge).
        if let Err(e) = registry.register(
            &mut sock,
            Tok::Peer(slot).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            return Err(e);
        }
        self.by_id.insert(id, slot);
        self.slots[slot] = Some(PeerConn {
            sock,
            id,
            relay,
            state,
        });
        Ok(())
    }

    /// Removes peer connection `id` (the driver closes it: the socket goes with the result).
    pub(super) fn take(&mut self, registry: &Registry, id: ConnId) -> Option<PeerConn> {
        let slot = self.by_id.remove(&id)?;
        let mut p = self.slots.get_mut(slot).and_then(Option::take)?;
        let _ = registry.deregister(&mut p.sock);
        self.free.push(slot);
        Some(p)
    }

    /// The core closed `id` (`Output::ClosePeerConn`): the socket goes now. Returns the
    /// client data connection slot it was spliced to, which the worker closes too.
    pub(super) fn close_by_core(&mut self, registry: &Registry, id: ConnId) -> Option<usize> {
        match self.take(registry, id)?.state {
            PeerState::Bound(ci) => Some(ci),
            _ => None,
        }
    }

    /// Connects started before `deadline` and still unfinished.
    pub(super) fn connects_older_than(&self, deadline: Instant, out: &mut Vec<ConnId>) {
        for p in self.slots.iter().flatten() {
            if matches!(p.state, PeerState::Connecting(t) if t < deadline) {
                out.push(p.id);
            }
        }
    }
}
