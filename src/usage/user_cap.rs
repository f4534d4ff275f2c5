//! `turn.user_max_bytes_per_sec`: one bandwidth cap shared by all of a user's allocations on
//! this node, whichever IO worker thread owns their relay sockets (docs/usage.md).
//!
//! Owns: the per-user [`UserCap`] (one lock-free GCRA cell per direction: a single atomic
//! "theoretical arrival time" each, so two workers relaying for one user meet on a
//! compare-and-swap, never a lock) and the registry handing the same `Arc` to every
//! allocation of a user at Allocate time.
//!
//! Must not: allocate, lock or make a system call per packet (the packet path does one
//! atomic load and one compare-and-swap per direction, and only for relays whose user has a
//! cap; the registry's map is touched at Allocate only), or keep users that hold no
//! allocation (the map holds `Weak`s, swept as it grows).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// How much a user may send at once above the rate: one second's worth, like
/// `turn.max_bytes_per_sec`'s buckets.
const BURST_NS: u64 = 1_000_000_000;

/// One direction's cell: the time (ns since `UserCap::base`) at which the bytes let through
/// so far would have been sent at exactly the rate. A packet passes if that time, with
/// the packet added, is no more than the burst ahead of now.
#[derive(Debug, Default)]
struct Cell {
    tat: AtomicU64,
}

impl Cell {
    fn try_take(&self, len: u64, rate: u64, now: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let cost = len.saturating_mul(1_000_000_000) / rate;
        let mut cur = self.tat.load(Ordering::Relaxed);
        loop {
            let next = cur.max(now).saturating_add(cost);
            if next > now.saturating_add(BURST_NS) {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// The cap of one user on this node: bytes per second each way (client→peer and
/// peer→client), shared by the user's relays on every worker.
#[derive(Debug)]
pub struct UserCap {
    base: Instant,
    /// Bytes per second; 0: no cap (after a reload turned it off).
    rate: AtomicU64,
    to_peer: Cell,
    to_client: Cell,
}

impl UserCap {
    fn new(rate: u64) -> UserCap {
        UserCap {
            base: Instant::now(),
            rate: AtomicU64::new(rate),
            to_peer: Cell::default(),
            to_client: Cell::default(),
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether `len` bytes from the client may go to a peer at `now` (spent if so).
    pub fn allow_to_peer(&self, len: usize, now: Instant) -> bool {
        let rate = self.rate.load(Ordering::Relaxed);
        self.to_peer.try_take(len as u64, rate, self.ns(now))
    }

    /// Whether `len` bytes from a peer may go to the client at `now` (spent if so).
    pub fn allow_to_client(&self, len: usize, now: Instant) -> bool {
        let rate = self.rate.load(Ordering::Relaxed);
        self.to_client.try_take(len as u64, rate, self.ns(now))
    }
}

/// The caps of the users holding allocations on this node.
#[derive(Debug, Default)]
pub struct UserCaps {
    rate: AtomicU64,
    users: Mutex<HashMap<String, Weak<UserCap>>>,
}

impl UserCaps {
    /// A reloaded `turn.user_max_bytes_per_sec`: live caps take the new rate at once (0
    /// lifts them); allocations made while it was 0 stay uncapped until they end.
    pub fn set_rate(&self, rate: u64) {
        if self.rate.swap(rate, Ordering::Relaxed) == rate {
            return;
        }
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for c in users.values().filter_map(Weak::upgrade) {
            c.rate.store(rate, Ordering::Relaxed);
        }
    }

    /// The cap `user`'s new allocation shares with the user's others; `None` without a cap.
    /// Called at Allocate (control path).
    pub fn get(&self, user: &str) -> Option<Arc<UserCap>> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = users.get(user).and_then(Weak::upgrade) {
            return Some(c);
        }
        // Sweep users whose allocations all ended when the map doubles: amortised O(1).
        if users.len() >= 64 && users.len().is_power_of_two() {
            users.retain(|_, w| w.strong_count() > 0);
        }
        let c = Arc::new(UserCap::new(rate));
        users.insert(user.to_string(), Arc::downgrade(&c));
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_users_allocations_share_one_second_of_burst_then_the_rate() {
        let caps = UserCaps::default();
        assert!(caps.get("alice").is_none(), "no cap while the rate is 0");
        caps.set_rate(10_000);
        let a1 = caps.get("alice").unwrap();
        let a2 = caps.get("alice").unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        let t0 = a1.base;
        // One second's worth passes at once, split over two allocations; then nothing.
        let mut passed = 0;
        for i in 0..40 {
            let a = if i % 2 == 0 { &a1 } else { &a2 };
            if a.allow_to_peer(500, t0) {
                passed += 500;
            }
        }
        assert_eq!(passed, 10_000);
        assert!(!a1.allow_to_peer(1, t0));
        // The other direction and another user are not affected.
        assert!(a1.allow_to_client(10_000, t0));
        let b = caps.get("bob").unwrap();
        assert!(b.allow_to_peer(10_000, t0));
        // Half a second later, half a second's worth.
        let t = t0 + Duration::from_millis(500);
        assert!(a2.allow_to_peer(5_000, t));
        assert!(!a2.allow_to_peer(100, t));
        // A reload lifting the cap applies to live caps at once.
        caps.set_rate(0);
        assert!(a1.allow_to_peer(1_000_000, t));
        assert!(caps.get("carol").is_none());
    }

    #[test]
    fn ended_users_are_swept() {
        let caps = UserCaps::default();
        caps.set_rate(1000);
        for i in 0..200 {
            drop(caps.get(&format!("u{i}")));
        }
        let live = caps.get("kept").unwrap();
        assert!(caps.users.lock().unwrap().len() < 200);
        assert!(Arc::strong_count(&live) == 1);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_burst() {
        let caps = UserCaps::default();
        caps.set_rate(1_000_000);
        let c = caps.get("alice").unwrap();
        let now = c.base;
        let passed = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if c.allow_to_peer(100, now) {
                            passed.fetch_add(100, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.load(Ordering::Relaxed), 1_000_000);
    }
}
