//! Usage accounting's metrics (docs/usage.md): never a user in a label.

use std::sync::Arc;

use super::collect::{Face, Families};
use crate::metrics_def::metric_table;
use crate::usage::Ledger;

metric_table! { pub DEFS;
    USAGE_RECORDS: Counter "tern_usage_records_total" []
        "Usage records the TURN core reported (allocation starts, interim reads, ends).";
    USAGE_WRITTEN: Counter "tern_usage_records_written_total" []
        "Rollup rows (user, period) written to the usage store.";
    USAGE_PENDING: Gauge "tern_usage_pending_rows" []
        "Rollup rows waiting for the usage store (the write queue; grows while the store fails).";
    USAGE_STORE_ERRORS: Counter "tern_usage_store_errors_total" []
        "Failed usage store operations (the rows stay in memory and are retried).";
    USAGE_REDIS_WRITTEN: Counter "tern_usage_redis_rows_written_total" []
        "Cluster mode: rollup rows added to the cluster's Redis hashes.";
    USAGE_REDIS_PENDING: Gauge "tern_usage_redis_pending_rows" []
        "Cluster mode: rollup rows waiting for Redis (grows while Redis is away).";
    USAGE_REDIS_ERRORS: Counter "tern_usage_redis_errors_total" []
        "Cluster mode: failed usage writes or reads to Redis (the rows are kept and retried).";
    USAGE_STREAM_RECORDS: Counter "tern_usage_stream_records_total" []
        "Cluster mode: finished-allocation records sent to the usage stream.";
    USAGE_STREAM_DROPPED: Counter "tern_usage_stream_dropped_total" []
        "Cluster mode: finished-allocation records dropped from the full stream queue while Redis was away.";
    USAGE_BUDGET_REFUSALS: Counter "tern_usage_budget_refusals_total" ["reason"]
        "Allocate and Refresh requests refused with 486 because the user's byte budget is used up.";
}

/// The usage ledger's collector (when `[usage]` is on).
pub(super) fn collector(ledger: Arc<Ledger>) -> Face<Arc<Ledger>> {
    Face::new(DEFS.iter(), ledger, read)
}

fn read(ledger: &Arc<Ledger>, f: &mut Families) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &ledger.stats;
    f.sample(&USAGE_RECORDS, &[], s.records.load(Relaxed));
    f.sample(&USAGE_WRITTEN, &[], s.rows_written.load(Relaxed));
    f.sample(&USAGE_PENDING, &[], s.pending_rows.load(Relaxed));
    f.sample(&USAGE_STORE_ERRORS, &[], s.store_errors.load(Relaxed));
    f.sample(
        &USAGE_REDIS_WRITTEN,
        &[],
        s.redis_rows_written.load(Relaxed),
    );
    f.sample(
        &USAGE_REDIS_PENDING,
        &[],
        s.redis_pending_rows.load(Relaxed),
    );
    f.sample(&USAGE_REDIS_ERRORS, &[], s.redis_errors.load(Relaxed));
    f.sample(&USAGE_STREAM_RECORDS, &[], s.stream_records.load(Relaxed));
    f.sample(&USAGE_STREAM_DROPPED, &[], s.stream_dropped.load(Relaxed));
    for (i, b) in crate::usage::Budget::ALL.iter().enumerate() {
        f.sample(
            &USAGE_BUDGET_REFUSALS,
            &[b.label()],
            s.budget_refusals[i].load(Relaxed),
        );
    }
}
