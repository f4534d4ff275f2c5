//! The in-memory side of usage accounting: the [`Ledger`] TURN workers hand records to
//! (a short lock on the control path, never per packet), the per-user spend the budgets
//! are checked against, and the writer thread ([`UsageService`]) that moves rollups to the
//! store in batches.
//!
//! The write queue is the map of pending rollup rows itself: a record adds to its user's
//! hour and day rows, so however many records arrive while the disk is slow or failing,
//! memory grows with users × periods, not with records, and nothing is dropped; the rows
//! go out with the next successful write (`tern_usage_pending_rows` shows the backlog,
//! `tern_usage_store_errors_total` the failures).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::redis_side::RedisSide;
use super::store::{Counts, Granularity, RowKey, UsageSink};
use super::time::{day_start, month_start, DAY};
use super::{user_id, Event, UsageRecord};

/// Which budget a user is over (the reason in the 486 answer and the refusal metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Day,
    Month,
}

impl Budget {
    pub const ALL: [Budget; 2] = [Budget::Day, Budget::Month];

    pub fn label(self) -> &'static str {
        match self {
            Budget::Day => "day",
            Budget::Month => "month",
        }
    }

    /// The STUN reason phrase of the 486 answer (RFC 8489 §14.8).
    pub fn reason_phrase(self) -> &'static str {
        match self {
            Budget::Day => "Allocation Quota Reached: user byte budget for today used up",
            Budget::Month => "Allocation Quota Reached: user byte budget for this month used up",
        }
    }
}

/// Counters for `/metrics` (bounded: no user in any label).
#[derive(Debug, Default)]
pub struct UsageStats {
    pub records: AtomicU64,
    pub rows_written: AtomicU64,
    pub store_errors: AtomicU64,
    pub pending_rows: AtomicU64,
    /// Refusals by [`Budget::ALL`] index.
    pub budget_refusals: [AtomicU64; 2],
    /// Cluster mode: rollup rows added to the Redis hashes, rows waiting for Redis, failed
    /// Redis writes, finished-allocation records appended to the stream, and records
    /// dropped because the stream queue was full during a Redis outage.
    pub redis_rows_written: AtomicU64,
    pub redis_pending_rows: AtomicU64,
    pub redis_errors: AtomicU64,
    pub stream_records: AtomicU64,
    pub stream_dropped: AtomicU64,
}

/// A finished allocation, as appended to the cluster's usage stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub user: String,
    pub tcp: bool,
    /// Unix milliseconds of the allocation's start and end.
    pub start_ms: u64,
    pub end_ms: u64,
    pub total: crate::turn::RelayUsage,
}

/// Bytes a user relayed in the current UTC day and month.
#[derive(Debug, Clone, Copy, Default)]
struct Spend {
    day: i64,
    day_bytes: u64,
    month: i64,
    month_bytes: u64,
}

impl Spend {
    fn roll(&mut self, now: i64) {
        let (d, m) = (day_start(now), month_start(now));
        if self.day != d {
            self.day = d;
            self.day_bytes = 0;
        }
        if self.month != m {
            self.month = m;
            self.month_bytes = 0;
        }
    }
}

#[derive(Debug, Default)]
struct State {
    rows: HashMap<RowKey, Counts>,
    /// Live allocations per user (for the peak).
    live: HashMap<String, u64>,
    spend: HashMap<String, Spend>,
    /// Cluster mode: users at or over a budget on the cluster's totals (day, month bytes),
    /// from the last Redis read; replaced whole each time.
    cluster_spend: HashMap<String, (u64, u64)>,
    /// Finished allocations waiting for the cluster stream (bounded by `stream_cap`;
    /// 0: no stream, nothing kept).
    finished: VecDeque<Finished>,
    stream_cap: usize,
    stop: bool,
}

/// Shared by the TURN shards (through `turn::Shared`) and the writer thread.
#[derive(Debug)]
pub struct Ledger {
    state: Mutex<State>,
    wake: Condvar,
    fold_anonymous: bool,
    /// The budgets last checked against (the writer reads the cluster's spend over them).
    budgets: [AtomicU64; 2],
    /// `turn.user_max_bytes_per_sec`: the caps the user's relays share.
    pub caps: super::UserCaps,
    pub stats: UsageStats,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Ledger {
    pub fn new(fold_anonymous: bool) -> Ledger {
        Ledger {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            fold_anonymous,
            budgets: Default::default(),
            caps: super::UserCaps::default(),
            stats: UsageStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The accounting id of a credential's quota user (`super::user_id` with this
    /// ledger's `usage.fold_anonymous`).
    pub fn user_of<'a>(&self, quota_user: &'a str) -> &'a str {
        user_id(quota_user, self.fold_anonymous)
    }

    /// Keeps up to `cap` finished allocations for the cluster stream (cluster mode).
    pub fn enable_stream(&self, cap: usize) {
        self.lock().stream_cap = cap;
    }

    /// Sets the budgets the writer compares the cluster's spend with (also updated by
    /// every check, so a reload reaches it with the next Allocate or Refresh).
    pub fn set_budgets(&self, per_day: u64, per_month: u64) {
        self.budgets[0].store(per_day, Ordering::Relaxed);
        self.budgets[1].store(per_month, Ordering::Relaxed);
    }

    pub(super) fn budgets(&self) -> (u64, u64) {
        (
            self.budgets[0].load(Ordering::Relaxed),
            self.budgets[1].load(Ordering::Relaxed),
        )
    }

    /// Replaces the cluster-wide spend of the users at or over a budget (cluster mode).
    pub(super) fn set_cluster_spend(&self, over: HashMap<String, (u64, u64)>) {
        self.lock().cluster_spend = over;
    }

    /// Takes up to `max` finished allocations for the stream, oldest first.
    pub(super) fn take_finished(&self, max: usize) -> Vec<Finished> {
        let mut st = self.lock();
        let n = st.finished.len().min(max);
        st.finished.drain(..n).collect()
    }

    /// Adds a record from the TURN core, stamped with the wall clock now.
    pub fn record(&self, rec: UsageRecord) {
        self.record_at(rec, unix_now());
    }

    /// Adds a record at Unix time `now`: to its user's hour and day rows and spend.
    pub fn record_at(&self, rec: UsageRecord, now: i64) {
        let user = user_id(&rec.user, self.fold_anonymous).to_string();
        let d = rec.delta;
        let mut c = Counts {
            allocation_ms: rec.alloc_ms,
            ..Counts::default()
        };
        if rec.tcp {
            c.tcp_to_peer_bytes = d.to_peer_bytes;
            c.tcp_to_client_bytes = d.to_client_bytes;
        } else {
            c.to_peer_bytes = d.to_peer_bytes;
            c.to_peer_packets = d.to_peer_packets;
            c.to_client_bytes = d.to_client_bytes;
            c.to_client_packets = d.to_client_packets;
        }
        let mut st = self.lock();
        if rec.event == Event::End && st.stream_cap > 0 {
            if st.finished.len() >= st.stream_cap {
                // Redis has been away for long: the oldest record goes, and says so.
                st.finished.pop_front();
                self.stats.stream_dropped.fetch_add(1, Ordering::Relaxed);
            }
            let end_ms = u64::try_from(now).unwrap_or(0) * 1000;
            st.finished.push_back(Finished {
                user: user.clone(),
                tcp: rec.tcp,
                start_ms: end_ms.saturating_sub(rec.age_ms),
                end_ms,
                total: rec.total,
            });
        }
        let live = st.live.entry(user.clone()).or_default();
        match rec.event {
            Event::Start => {
                *live += 1;
                c.allocations = 1;
            }
            Event::End => *live = live.saturating_sub(1),
            Event::Interim => {}
        }
        c.peak_allocations = *live;
        if *live == 0 {
            st.live.remove(&user);
        }
        let bytes = c.total_bytes();
        let spend = st.spend.entry(user.clone()).or_default();
        spend.roll(now);
        spend.day_bytes += bytes;
        spend.month_bytes += bytes;
        for g in [Granularity::Hour, Granularity::Day] {
            let key = RowKey {
                user: user.clone(),
                granularity: g,
                start: g.start(now),
            };
            st.rows.entry(key).or_default().merge(&c);
        }
        self.stats
            .pending_rows
            .store(st.rows.len() as u64, Ordering::Relaxed);
        drop(st);
        self.stats.records.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `quota_user` is over a budget (0: none) now. Checked on Allocate and
    /// Refresh; a refusal is counted by reason.
    pub fn over_budget(&self, quota_user: &str, per_day: u64, per_month: u64) -> Option<Budget> {
        self.over_budget_at(quota_user, per_day, per_month, unix_now())
    }

    pub fn over_budget_at(
        &self,
        quota_user: &str,
        per_day: u64,
        per_month: u64,
        now: i64,
    ) -> Option<Budget> {
        self.set_budgets(per_day, per_month);
        if per_day == 0 && per_month == 0 {
            return None;
        }
        let user = user_id(quota_user, self.fold_anonymous);
        let mut st = self.lock();
        let (mut day, mut month) = st.cluster_spend.get(user).copied().unwrap_or_default();
        if let Some(s) = st.spend.get_mut(user) {
            s.roll(now);
            // This node's spend may be ahead of the cluster's last read (not yet written).
            day = day.max(s.day_bytes);
            month = month.max(s.month_bytes);
        }
        drop(st);
        let over = if per_day != 0 && day >= per_day {
            Some(Budget::Day)
        } else if per_month != 0 && month >= per_month {
            Some(Budget::Month)
        } else {
            None
        };
        if let Some(b) = over {
            let i = Budget::ALL.iter().position(|&x| x == b).unwrap_or(0);
            self.stats.budget_refusals[i].fetch_add(1, Ordering::Relaxed);
        }
        over
    }

    /// Seeds the spend of the current day and month from the store (at start).
    fn seed(&self, rows: Vec<(String, u64, u64)>, now: i64) {
        let mut st = self.lock();
        for (user, day_bytes, month_bytes) in rows {
            st.spend.insert(
                user,
                Spend {
                    day: day_start(now),
                    day_bytes,
                    month: month_start(now),
                    month_bytes,
                },
            );
        }
    }

    /// The pending rows of `user` (tests and diagnostics), hour rows first.
    pub fn pending(&self, user: &str) -> Vec<(RowKey, Counts)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .rows
            .iter()
            .filter(|(k, _)| k.user == user)
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Takes the pending rows (the writer puts them back if the write fails).
    fn take(&self) -> (Vec<(RowKey, Counts)>, bool) {
        let mut st = self.lock();
        let rows: Vec<_> = st.rows.drain().collect();
        (rows, st.stop)
    }

    /// Drops spend entries of users idle since before this month (bounded memory).
    fn forget_idle(&self, now: i64) {
        let m = month_start(now);
        let mut st = self.lock();
        st.spend.retain(|_, s| s.month == m);
    }
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterParams {
    pub node: String,
    pub flush: Duration,
    pub retention_days: u32,
}

/// The writer thread and its [`Ledger`]. Dropping it (or `shutdown`) writes what is
/// pending and stops the thread.
pub struct UsageService {
    ledger: Arc<Ledger>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UsageService {
    /// Seeds the budgets from `sink` and starts the writer thread; with `redis` (cluster
    /// mode) the writer also adds every rollup to the cluster's hashes and stream.
    pub fn start(
        ledger: Arc<Ledger>,
        mut sink: Box<dyn UsageSink>,
        p: WriterParams,
        redis: Option<RedisSide>,
    ) -> std::io::Result<UsageService> {
        let now = unix_now();
        match sink.spend(day_start(now), month_start(now)) {
            Ok(rows) => ledger.seed(rows, now),
            Err(e) => {
                ledger.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "usage store: cannot read this month's usage; budgets count from now");
            }
        }
        let l = Arc::clone(&ledger);
        let thread = std::thread::Builder::new()
            .name("tern-usage".into())
            .spawn(move || writer(&l, sink.as_mut(), redis, &p))?;
        Ok(UsageService {
            ledger,
            thread: Some(thread),
        })
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Writes what is pending and joins the writer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.ledger.lock().stop = true;
        self.ledger.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UsageService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

fn merge_rows(into: &mut HashMap<RowKey, Counts>, rows: &[(RowKey, Counts)]) {
    for (k, c) in rows {
        into.entry(k.clone()).or_default().merge(c);
    }
}

fn writer(l: &Ledger, sink: &mut dyn UsageSink, mut redis: Option<RedisSide>, p: &WriterParams) {
    let mut last_prune: Option<std::time::Instant> = None;
    let mut failing = false;
    // Rows the store has not taken yet (a failed write is retried with the next batch).
    let mut unwritten: HashMap<RowKey, Counts> = HashMap::new();
    loop {
        {
            let st = l.lock();
            if !st.stop {
                let _ = l.wake.wait_timeout(st, p.flush);
            }
        }
        let (rows, stop) = l.take();
        if let Some(r) = redis.as_mut() {
            // Redis gets its own copy: its outages and the store's are independent.
            r.add(&rows);
        }
        merge_rows(&mut unwritten, &rows);
        if !unwritten.is_empty() {
            let batch: Vec<_> = unwritten.iter().map(|(k, c)| (k.clone(), *c)).collect();
            match sink.write(&p.node, &batch) {
                Ok(()) => {
                    unwritten.clear();
                    l.stats
                        .rows_written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if failing {
                        tracing::info!("usage store writable again; pending rollups written");
                        failing = false;
                    }
                }
                Err(e) => {
                    l.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::error!(error = %e, "usage store write failed; rollups kept in memory and retried");
                        failing = true;
                    }
                }
            }
        }
        let queued = l.lock().rows.len();
        l.stats
            .pending_rows
            .store((queued + unwritten.len()) as u64, Ordering::Relaxed);
        if let Some(r) = redis.as_mut() {
            r.flush(l, stop);
        }
        if stop {
            if failing {
                tracing::error!(
                    rows = unwritten.len(),
                    "stopping with usage rollups the store did not take"
                );
            }
            return;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(std::time::Instant::now());
            let now = unix_now();
            l.forget_idle(now);
            if p.retention_days > 0 {
                let before = day_start(now) - i64::from(p.retention_days) * DAY;
                match sink.prune(before) {
                    Ok(n) if n > 0 => {
                        tracing::info!(rows = n, "usage retention: old rollups deleted")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        l.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "usage retention failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::RelayUsage;

    fn rec(user: &str, event: Event, bytes: u64) -> UsageRecord {
        UsageRecord {
            user: user.into(),
            event,
            tcp: false,
            delta: RelayUsage {
                to_peer_bytes: bytes,
                to_peer_packets: 1,
                to_client_bytes: bytes,
                to_client_packets: 1,
            },
            alloc_ms: 1000,
            total: RelayUsage::default(),
            age_ms: 1000,
        }
    }

    /// A sink that fails until told otherwise, then keeps what it got.
    struct Flaky {
        fail: Arc<std::sync::atomic::AtomicBool>,
        got: Arc<Mutex<Vec<(RowKey, Counts)>>>,
    }

    impl UsageSink for Flaky {
        fn write(
            &mut self,
            _: &str,
            rows: &[(RowKey, Counts)],
        ) -> Result<(), super::super::StoreError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(super::super::StoreError::Io {
                    path: "flaky".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.got.lock().unwrap().extend_from_slice(rows);
            Ok(())
        }
        fn prune(&mut self, _: i64) -> Result<u64, super::super::StoreError> {
            Ok(0)
        }
        fn spend(
            &mut self,
            _: i64,
            _: i64,
        ) -> Result<Vec<(String, u64, u64)>, super::super::StoreError> {
            Ok(vec![])
        }
    }

    #[test]
    fn rollup_peak_and_budget() {
        let l = Ledger::new(false);
        let t = 1_765_000_000;
        l.record_at(rec("alice", Event::Start, 0), t);
        l.record_at(rec("alice", Event::Start, 0), t);
        l.record_at(rec("alice", Event::Interim, 100), t + 60);
        l.record_at(rec("alice", Event::End, 50), t + 70);
        l.record_at(rec("alice", Event::End, 50), t + 80);
        let (rows, _) = l.take();
        let day = rows
            .iter()
            .find(|(k, _)| k.granularity == Granularity::Day)
            .unwrap()
            .1;
        assert_eq!(day.allocations, 2);
        assert_eq!(day.peak_allocations, 2);
        assert_eq!(day.to_peer_bytes, 200);
        assert_eq!(day.to_client_packets, 5);
        assert_eq!(day.allocation_ms, 5000);
        assert_eq!(l.over_budget_at("alice", 400, 0, t + 90), Some(Budget::Day));
        assert_eq!(l.over_budget_at("alice", 401, 0, t + 90), None);
        assert_eq!(
            l.over_budget_at("alice", 0, 400, t + 90),
            Some(Budget::Month)
        );
        // The next day the daily spend starts again; the month's stays.
        assert_eq!(l.over_budget_at("alice", 400, 0, t + DAY), None);
        assert_eq!(
            l.over_budget_at("alice", 0, 400, t + DAY),
            Some(Budget::Month)
        );
        assert_eq!(l.stats.budget_refusals[0].load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.budget_refusals[1].load(Ordering::Relaxed), 2);
        assert_eq!(l.over_budget_at("bob", 1, 1, t), None);
    }

    #[test]
    fn failing_store_keeps_rows_aggregated_then_writes_them() {
        let ledger = Arc::new(Ledger::new(false));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let got = Arc::new(Mutex::new(Vec::new()));
        let svc = UsageService::start(
            Arc::clone(&ledger),
            Box::new(Flaky {
                fail: Arc::clone(&fail),
                got: Arc::clone(&got),
            }),
            WriterParams {
                node: "n".into(),
                flush: Duration::from_millis(10),
                retention_days: 0,
            },
            None,
        )
        .unwrap();
        for _ in 0..1000 {
            ledger.record(rec("alice", Event::Interim, 1));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(ledger.stats.store_errors.load(Ordering::Relaxed) > 0);
        // 1000 records, still one hour row and one day row (two if an hour turned).
        assert!(ledger.stats.pending_rows.load(Ordering::Relaxed) <= 4);
        fail.store(false, Ordering::Relaxed);
        svc.shutdown();
        let got = got.lock().unwrap();
        let day_bytes: u64 = got
            .iter()
            .filter(|(k, _)| k.granularity == Granularity::Day)
            .map(|(_, c)| c.to_peer_bytes)
            .sum();
        assert_eq!(day_bytes, 1000);
        assert_eq!(ledger.stats.pending_rows.load(Ordering::Relaxed), 0);
    }
}
