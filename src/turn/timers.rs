//! The timer heap of one shard: what expires when (allocations, permissions, channels,
//! EVEN-PORT reservations, RFC 6062 peer connections, interim usage reports). Entries are
//! checked against the live state when they fire (`Server::handle_timeout`), so a refresh
//! just pushes a later entry and stale ones are skipped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::time::Instant;

use super::{ChannelNumber, ConnId};

/// What a timer entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKind {
    Allocation {
        slot: usize,
        id: u64,
    },
    Permission {
        slot: usize,
        id: u64,
        ip: IpAddr,
    },
    Channel {
        slot: usize,
        id: u64,
        number: ChannelNumber,
    },
    Reservations,
    /// The 30 s wait of an RFC 6062 peer connection (connecting, or awaiting its bind).
    TcpConn {
        conn: ConnId,
    },
    /// An allocation's interim usage report (`usage_tap`).
    Usage {
        slot: usize,
        id: u64,
    },
}

/// Timer entries, earliest first.
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKind)>>,
}

impl Timers {
    pub(super) fn push(&mut self, at: Instant, kind: TimerKind) {
        self.heap.push(Reverse((at, kind)));
    }

    /// The earliest entry's time.
    pub(super) fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Takes the earliest entry if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKind)> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Entries held (tests bound the heap).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}
