//! Allocation quotas shared by all shards (RFC 8656 §7.2 item 10: 486 Allocation Quota
//! Reached; 508 when the server is full): allocations per user and in total. This file is
//! their only writer; the lock is taken on Allocate and on an allocation's end only, never
//! per packet. Cluster mode adds the user's allocations on other nodes
//! ([`ClusterHook::remote_count`]) and is told of every change ([`ClusterHook::mark`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::cluster_hook::ClusterHook;

/// Why an allocation could not be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// 486 Allocation Quota Reached.
    User,
    /// 508 Insufficient Capacity.
    Total,
}

/// Allocation counts by user and in total.
#[derive(Debug, Default)]
pub(super) struct Quotas {
    per_user: Mutex<FxHashMap<String, u32>>,
    total: AtomicU32,
}

impl Quotas {
    /// Allocations held across all shards.
    pub(super) fn total(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// Allocations per user (all users, or those asked for, 0 for a user without any).
    pub(super) fn user_counts(&self, users: Option<&[String]>) -> Vec<(String, u32)> {
        let m = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        match users {
            None => m.iter().map(|(u, n)| (u.clone(), *n)).collect(),
            Some(us) => us
                .iter()
                .map(|u| (u.clone(), m.get(u).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Counts one more allocation for `user` if both quotas allow it.
    pub(super) fn acquire(
        &self,
        user: &str,
        user_quota: u32,
        total_quota: u32,
        cluster: Option<&ClusterHook>,
    ) -> Result<(), QuotaError> {
        let mut m = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.get(user).copied().unwrap_or(0);
        let remote = cluster.map_or(0, |c| c.remote_count(user));
        if n.saturating_add(remote) >= user_quota {
            return Err(QuotaError::User);
        }
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < total_quota).then_some(t + 1)
            })
            .is_err()
        {
            return Err(QuotaError::Total);
        }
        m.insert(user.to_string(), n + 1);
        if let Some(c) = cluster {
            c.mark(user);
        }
        Ok(())
    }

    /// An allocation of `user` ended (or its Allocate failed after counting it).
    pub(super) fn release(&self, user: &str, cluster: Option<&ClusterHook>) {
        let mut m = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                m.remove(user);
            }
        }
        if let Some(c) = cluster {
            c.mark(user);
        }
        let _ = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1));
    }
}
