//! The timer heap of one shard: what expires when (allocations, permissions, channels,
//! EVEN-PORT reservations, RFC 6062 peer connections, interim usage reports). Entries are
//! checked against the live state when they fire (`Server::handle_timeout`), so a refresh
//! just pushes a later entry and stale ones are skipped.
//!
//! Stale entries are bounded too: a deleted allocation leaves its allocation, permission
//! and channel entries behind until their deadlines (up to ten minutes for a channel), so
//! allocation churn alone would grow the heap with churn rate × ten minutes, and a Vec
//! never gives memory back. When the heap has doubled since the last sweep the server
//! drops the stale entries (`compact`) and the heap returns what it no longer needs.

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

/// Heaps smaller than this are never swept: not worth a pass.
const COMPACT_FLOOR: usize = 1024;

/// Timer entries, earliest first.
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKind)>>,
    /// The size after the last sweep: the next one comes at twice this (amortised O(1)
    /// per entry).
    swept_len: usize,
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

    /// Whether the heap has doubled since the last sweep (and is worth one).
    pub(super) fn wants_sweep(&self) -> bool {
        self.heap.len() > COMPACT_FLOOR.max(2 * self.swept_len)
    }

    /// Keeps only the entries `live` accepts and gives back capacity the heap no longer
    /// needs. `live` must keep every entry that could still act when it fires: a dropped
    /// live entry is a permission or allocation that never expires.
    pub(super) fn compact(&mut self, mut live: impl FnMut(Instant, &TimerKind) -> bool) {
        self.heap.retain(|Reverse((at, kind))| live(*at, kind));
        let len = self.heap.len();
        if self.heap.capacity() > 4 * len.max(COMPACT_FLOOR) {
            self.heap.shrink_to(2 * len.max(COMPACT_FLOOR));
        }
        self.swept_len = len;
    }

    /// Entries held (tests bound the heap).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Entries the heap has room for (tests check memory is given back).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.heap.capacity()
    }
}
