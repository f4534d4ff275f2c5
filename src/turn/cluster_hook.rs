//! The TURN core's one seam to cluster mode (`crate::cluster`, `[cluster]`): a snapshot the
//! cluster driver keeps fresh, read on the Allocate path only.
//!
//! Why a snapshot: the core is synchronous and sans-IO, and Redis must never be on the
//! packet or request path (a slow or lost Redis would stall every allocation on a worker).
//! So the check is local: this node's own count (in [`super::Shared`]) plus the count the
//! user holds on other nodes as last read from Redis (at most one driver tick old, about a
//! second). Local changes are marked dirty here; the driver writes them to Redis as leases,
//! off the hot path. Each Allocate and successful Refresh (RFC 8656 §7.1, §7.3) renews the
//! user's lease here to the allocation's new expiry ([`ClusterHook::renew`]): the driver
//! publishes it with the count, and other nodes count the user only until then, so an
//! allocation whose Refresh stops stops holding quota cluster-wide when its lifetime ends. While Redis is unreachable the driver clears the remote counts, so
//! the local quota applies alone. It owns no IO and must not block: one short lock each.
//! Without `[cluster]` no hook is installed and nothing here runs.

use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};

use super::alternates::Alternates;
use super::Transport;

/// Shared between the TURN shards (through [`super::Shared::set_cluster`]) and the driver.
#[derive(Debug, Default)]
pub struct ClusterHook {
    /// Allocations each user holds on other live nodes (absent: none).
    remote: Mutex<FxHashMap<String, u32>>,
    /// Users whose count on this node changed since the driver last took them. Bounded by
    /// the users allocating or releasing within one driver tick.
    dirty: Mutex<FxHashSet<String>>,
    /// Per user with allocations here: when the latest-expiring one ends unless refreshed
    /// (the user's lease). Entries go when the user's count here reaches 0.
    leases: Mutex<FxHashMap<String, Instant>>,
    /// ALTERNATE-SERVER targets from the registry (healthy nodes, least loaded first), used
    /// only when `turn.alternate_*` are empty.
    alternates: RwLock<Alternates>,
}

impl ClusterHook {
    pub fn new() -> ClusterHook {
        ClusterHook::default()
    }

    /// Allocations `user` holds on other nodes, per the last snapshot.
    pub fn remote_count(&self, user: &str) -> u32 {
        let m = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        m.get(user).copied().unwrap_or(0)
    }

    /// Replaces the remote counts (empty while Redis is unreachable: local quota only).
    pub fn set_remote(&self, counts: FxHashMap<String, u32>) {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    /// Users whose local count changed since the last call.
    pub fn take_dirty(&self) -> Vec<String> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.drain().collect()
    }

    /// An Allocate or a successful Refresh: `user`'s lease runs at least until `expires`
    /// (the allocation's new expiry), and the driver writes it at its next tick.
    pub(crate) fn renew(&self, user: &str, expires: Instant) {
        {
            let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            match l.get_mut(user) {
                Some(t) => *t = (*t).max(expires),
                None => {
                    l.insert(user.to_string(), expires);
                }
            }
        }
        self.mark(user);
    }

    /// When `user`'s lease here ends (None: no allocation renewed it).
    pub fn lease(&self, user: &str) -> Option<Instant> {
        let l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        l.get(user).copied()
    }

    /// `user` holds nothing here any more.
    pub fn forget_lease(&self, user: &str) {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        l.remove(user);
    }

    /// Keeps the leases of `users` only (after a whole rewrite: the others hold nothing).
    pub fn retain_leases(&self, users: &FxHashSet<&str>) {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|u, _| users.contains(u.as_str()));
    }

    pub fn set_alternates(&self, a: Alternates) {
        *self.alternates.write().unwrap_or_else(|e| e.into_inner()) = a;
    }

    pub(crate) fn mark(&self, user: &str) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !d.contains(user) {
            d.insert(user.to_string());
        }
    }

    /// The registry's best alternate for a client on `transport` of family `v6`.
    pub(crate) fn alternate(
        &self,
        transport: Transport,
        v6: bool,
    ) -> Option<(SocketAddr, Option<String>)> {
        let a = self.alternates.read().unwrap_or_else(|e| e.into_inner());
        a.pick(transport, v6, 0)
            .map(|x| (x.addr, x.domain.map(str::to_string)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_refresh_extends_the_lease_and_marks_the_user() {
        let h = ClusterHook::new();
        let t0 = Instant::now();
        h.renew("alice", t0 + Duration::from_secs(600));
        assert_eq!(h.take_dirty(), ["alice"]);
        // A refresh to a later expiry extends it; a shorter one keeps the later (another
        // allocation of the same user may still run until then).
        h.renew("alice", t0 + Duration::from_secs(900));
        h.renew("alice", t0 + Duration::from_secs(60));
        assert_eq!(h.lease("alice"), Some(t0 + Duration::from_secs(900)));
        assert_eq!(h.take_dirty(), ["alice"]);
        h.renew("bob", t0);
        h.retain_leases(&["bob"].into_iter().collect());
        assert_eq!(h.lease("alice"), None);
        h.forget_lease("bob");
        assert_eq!(h.lease("bob"), None);
    }
}
