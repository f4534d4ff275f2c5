//! Usage accounting per user (issue 14): who relayed how much, rolled up per user and per
//! UTC hour and day, stored durably (SQLite on one node), queried by `GET /api/usage` and
//! `tern usage`, and the per-user byte budgets the TURN core checks on Allocate/Refresh.
//!
//! Owns: the user id of a credential ([`user_id`]), the [`UsageRecord`] the TURN core
//! emits (at allocation start, every `usage.interim_secs`, at allocation end), the
//! in-memory rollup and budget spend ([`Ledger`]), the writer thread and its store behind
//! the [`UsageSink`] trait ([`SqliteStore`]), in cluster mode the Redis side of the writer
//! and of the read side (`redis_side`: per-user hashes, rankings, the stream, cluster-wide
//! budgets), retention, and the read side shared by the HTTP API and the CLI ([`query`]).
//!
//! Must not: do any work per relayed packet (the counts come from the per-relay counters
//! the IO workers already keep, read by the core at the times above), block a TURN worker
//! on the disk (workers only add to an in-memory map under a short lock, control path
//! only), or put a user id in a metric label.

pub mod cli;
mod ledger;
pub mod query;
mod redis_side;
mod store;
pub mod time;
mod user_cap;

pub use ledger::{Budget, Ledger, UsageService, UsageStats, WriterParams};
pub use store::{Counts, Granularity, RowKey, SqliteStore, StoreError, UsageSink};
pub use user_cap::{UserCap, UserCaps};

use crate::turn::RelayUsage;

/// What happened to an allocation when the core emitted a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Allocate succeeded: counts one allocation and one more live one (peak).
    Start,
    /// A long allocation's counters read at the interim interval.
    Interim,
    /// The allocation ended (expired, refreshed to 0, or its TCP connection closed).
    End,
}

/// One allocation's traffic since its previous record, as the TURN core reports it. Plain
/// data: made on the control path (at most once per allocation per interim interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The credential's quota user (`Verified::quota_user`): a REST username's user id, a
    /// static user's name; [`user_id`] maps it to the accounting id.
    pub user: String,
    pub event: Event,
    /// An RFC 6062 TCP allocation: its bytes count as TCP relay bytes.
    pub tcp: bool,
    /// Payload carried since the previous record of this allocation.
    pub delta: RelayUsage,
    /// Allocation time since the previous record, in milliseconds.
    pub alloc_ms: u64,
    /// Payload carried since the allocation began (what the cluster stream's record of a
    /// finished allocation holds).
    pub total: RelayUsage,
    /// Milliseconds since the allocation began.
    pub age_ms: u64,
}

/// Prefix of the user ids `/api/ice` mints for anonymous browsers.
pub const ANON_PREFIX: &str = "anon-";
/// The one bucket anonymous ids are folded into with `usage.fold_anonymous`.
pub const ANON_BUCKET: &str = "anonymous";

/// The accounting id of a credential's quota user: the user id of a REST username (the
/// part after `expiry` and the separator, already split by `turn::auth`, so renewed
/// credentials of one user add up), a static user's name, and the `anon-…` ids of
/// anonymous browsers, folded into [`ANON_BUCKET`] when `fold_anonymous` is set.
pub fn user_id(quota_user: &str, fold_anonymous: bool) -> &str {
    if fold_anonymous && quota_user.starts_with(ANON_PREFIX) {
        ANON_BUCKET
    } else {
        quota_user
    }
}

/// Starts accounting as `[usage]` says: `None` when it is off. A store that cannot be
/// opened is an error, except at the default path with no budget configured (a developer
/// running without root): then the daemon serves without accounting and says so.
pub fn start(cfg: &crate::config::Config) -> Result<Option<UsageService>, StoreError> {
    let u = &cfg.usage;
    if !u.enabled {
        return Ok(None);
    }
    let store = match SqliteStore::open(&u.path) {
        Ok(s) => s,
        Err(e) => {
            let budgets = cfg.turn.user_bytes_per_day != 0
                || cfg.turn.user_bytes_per_month != 0
                || cfg.turn.user_max_bytes_per_sec != 0;
            if u.path.as_os_str() == crate::config::DEFAULT_USAGE_PATH && !budgets {
                tracing::warn!(
                    error = %e,
                    "usage accounting is OFF for this run: the default usage.path cannot be \
                     opened (run as root or under the systemd unit, set usage.path to a \
                     writable file, or usage.enabled = false to silence this)"
                );
                return Ok(None);
            }
            return Err(e);
        }
    };
    let ledger = std::sync::Arc::new(Ledger::new(u.fold_anonymous));
    ledger.set_budgets(cfg.turn.user_bytes_per_day, cfg.turn.user_bytes_per_month);
    // In cluster mode a node is named as in the registry unless usage.node_id says else.
    let node = if u.node_id.is_empty() && cfg.cluster.enabled() {
        cfg.cluster.node_id()
    } else {
        node_id(&u.node_id)
    };
    let redis = if cfg.cluster.enabled() {
        let p = redis_side::RedisParams::from_config(cfg, &node).map_err(StoreError::Redis)?;
        ledger.enable_stream(u.stream_queue as usize);
        tracing::info!(redis = %p.url, "usage accounting: rollups and finished allocations also go to the cluster's Redis");
        Some(redis_side::RedisSide::new(p))
    } else {
        None
    };
    let params = WriterParams {
        node,
        flush: std::time::Duration::from_millis(u64::from(u.flush_ms)),
        retention_days: u.retention_days,
    };
    tracing::info!(path = %u.path.display(), node = %params.node, "usage accounting on");
    UsageService::start(ledger, Box::new(store), params, redis)
        .map(Some)
        .map_err(|source| StoreError::Io {
            path: u.path.display().to_string(),
            source,
        })
}

/// `usage.node_id`, or this machine's host name when empty.
pub fn node_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    "localhost".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_ids_fold_only_when_asked() {
        assert_eq!(user_id("alice", true), "alice");
        assert_eq!(user_id("anon-0123abcd", false), "anon-0123abcd");
        assert_eq!(user_id("anon-0123abcd", true), "anonymous");
    }
}
