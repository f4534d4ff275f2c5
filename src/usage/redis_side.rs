//! Usage accounting in cluster mode (`[cluster]`, docs/usage.md "Cluster mode"): the
//! writer's Redis side and the cluster-wide read side.
//!
//! Owns: adding this node's rollups to the per-user, per-period Redis hashes and the
//! per-period byte rankings, appending each finished allocation to the usage stream, the
//! cluster spend the budgets read, and the queries `/api/usage` and `tern usage` answer
//! from Redis.
//!
//! Must not: lose a rollup silently (rows wait, aggregated, while Redis is away, and are
//! written when it is back; a finished-allocation record dropped from the full queue is
//! counted), count a batch twice (each batch carries an id Redis remembers for a day, so
//! a retry after a lost answer is a no-op), or run on a TURN worker (the usage writer
//! thread only; blocking IO with timeouts is fine there).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::ConnectionInfo;
use serde::Serialize;

use super::ledger::{Finished, Ledger};
use super::query::{row, UsageQuery, UsageRow};
use super::store::{Counts, Granularity, RowKey, StoreError};
use super::time::{day_start, month_start, DAY, HOUR};
use crate::turn::RelayUsage;

/// Connect, and each command, waits at most this long.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most rollup rows and stream records in one batch (one script call).
const BATCH_ROWS: usize = 2000;
const BATCH_RECORDS: usize = 1000;
/// Batches per flush at most, so catching up after an outage does not hold the store.
const BATCHES_PER_FLUSH: usize = 20;
/// How long Redis remembers a batch id (a retry comes within seconds).
const BATCH_ID_TTL: u64 = DAY as u64;
/// Most periods one query reads (400 days of hours).
const MAX_PERIODS: i64 = 400 * 24;

/// The names of every key, under `cluster.key_prefix`.
#[derive(Debug, Clone)]
pub struct UsageKeys {
    prefix: String,
}

impl UsageKeys {
    pub fn new(prefix: &str) -> UsageKeys {
        UsageKeys {
            prefix: prefix.to_string(),
        }
    }

    /// The hash of one user in one period: the summed columns, and `peak_allocations:NODE`.
    pub fn row(&self, g: Granularity, start: i64, user: &str) -> String {
        format!("{}usage:{}:{start}:{user}", self.prefix, g.name())
    }

    /// The ranking (sorted set, score = total bytes) of the users of one period;
    /// `period` is `hour`, `day` or `month`.
    pub fn top(&self, period: &str, start: i64) -> String {
        format!("{}usage:top:{period}:{start}", self.prefix)
    }

    /// The stream of finished allocations.
    pub fn stream(&self) -> String {
        format!("{}usage:stream", self.prefix)
    }

    fn batch(&self, id: &str) -> String {
        format!("{}usage:batch:{id}", self.prefix)
    }
}

/// Adds one batch atomically, unless its id was seen (then it was added before: 0).
const SCRIPT: &str = r"
local b = cjson.decode(ARGV[1])
if not redis.call('SET', b.id, '1', 'NX', 'EX', b.id_ttl) then return 0 end
for _, r in ipairs(b.rows) do
  for i = 1, #r.f, 2 do redis.call('HINCRBY', r.h, r.f[i], r.f[i + 1]) end
  local cur = tonumber(redis.call('HGET', r.h, b.peak) or '0')
  if r.peak > cur then redis.call('HSET', r.h, b.peak, r.peak) end
  redis.call('ZINCRBY', r.z, r.bytes, r.u)
  if b.ttl > 0 then
    redis.call('EXPIRE', r.h, b.ttl)
    redis.call('EXPIRE', r.z, b.ttl)
  end
  if r.m ~= '' then
    redis.call('ZINCRBY', r.m, r.bytes, r.u)
    if b.month_ttl > 0 then redis.call('EXPIRE', r.m, b.month_ttl) end
  end
end
for _, f in ipairs(b.recs) do
  redis.call('XADD', b.stream, 'MAXLEN', '~', b.maxlen, '*', unpack(f))
end
return 1
";

/// The summed columns, by their names in the hashes (the peak is kept per node).
fn summed(c: &Counts) -> [(&'static str, u64); 8] {
    [
        ("to_peer_bytes", c.to_peer_bytes),
        ("to_peer_packets", c.to_peer_packets),
        ("to_client_bytes", c.to_client_bytes),
        ("to_client_packets", c.to_client_packets),
        ("tcp_to_peer_bytes", c.tcp_to_peer_bytes),
        ("tcp_to_client_bytes", c.tcp_to_client_bytes),
        ("allocation_ms", c.allocation_ms),
        ("allocations", c.allocations),
    ]
}

const PEAK: &str = "peak_allocations:";

#[derive(Serialize)]
struct BatchRow {
    h: String,
    z: String,
    /// The month ranking (day rows only; budgets read it), or empty.
    m: String,
    u: String,
    f: Vec<String>,
    peak: u64,
    bytes: String,
}

#[derive(Serialize)]
struct Batch {
    id: String,
    id_ttl: u64,
    ttl: u64,
    month_ttl: u64,
    peak: String,
    stream: String,
    maxlen: u64,
    rows: Vec<BatchRow>,
    recs: Vec<Vec<String>>,
}

/// The fields of one stream entry (docs/usage.md "The usage stream").
pub fn stream_fields(node: &str, f: &Finished) -> Vec<String> {
    let t = &f.total;
    // TCP relay bytes are kept apart, as in the rollups; TCP has no packet counts.
    let (udp, tcp) = if f.tcp {
        (RelayUsage::default(), *t)
    } else {
        (*t, RelayUsage::default())
    };
    vec![
        "user".into(),
        f.user.clone(),
        "node".into(),
        node.to_string(),
        "transport".into(),
        if f.tcp { "tcp" } else { "udp" }.into(),
        "start_ms".into(),
        f.start_ms.to_string(),
        "end_ms".into(),
        f.end_ms.to_string(),
        "to_peer_bytes".into(),
        udp.to_peer_bytes.to_string(),
        "to_peer_packets".into(),
        udp.to_peer_packets.to_string(),
        "to_client_bytes".into(),
        udp.to_client_bytes.to_string(),
        "to_client_packets".into(),
        udp.to_client_packets.to_string(),
        "tcp_to_peer_bytes".into(),
        tcp.to_peer_bytes.to_string(),
        "tcp_to_client_bytes".into(),
        tcp.to_client_bytes.to_string(),
    ]
}

/// Settings of the Redis side, from `[cluster]` and `[usage]`.
#[derive(Debug, Clone)]
pub struct RedisParams {
    pub info: ConnectionInfo,
    /// `redis_url` without credentials, for the log.
    pub url: String,
    pub keys: UsageKeys,
    pub node: String,
    /// Key TTL in seconds (0: keys are kept).
    pub ttl: u64,
    pub stream_maxlen: u64,
}

impl RedisParams {
    pub fn from_config(cfg: &crate::config::Config, node: &str) -> Result<RedisParams, String> {
        let c = &cfg.cluster;
        let info = crate::cluster::conn::connection_info(c, None)?;
        let days = u64::from(cfg.usage.retention_days);
        Ok(RedisParams {
            info,
            url: crate::cluster::conn::redacted_url(&c.redis_url),
            keys: UsageKeys::new(&c.key_prefix),
            node: node.to_string(),
            // A period is kept for the retention counted from its last write.
            ttl: days * DAY as u64,
            stream_maxlen: cfg.usage.stream_maxlen,
        })
    }
}

/// One synchronous connection with timeouts (the writer thread, a CLI, a blocking task).
pub fn connect(info: &ConnectionInfo) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(info.clone())?.get_connection_with_timeout(IO_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// The writer thread's Redis side: rows and records waiting for Redis, the batch in flight
/// (retried as is until Redis confirms it), the connection and its backoff.
pub struct RedisSide {
    p: RedisParams,
    conn: Option<redis::Connection>,
    pending: HashMap<RowKey, Counts>,
    inflight: Option<(String, usize)>,
    /// Distinguishes this run's batch ids from a previous run's.
    run: u64,
    seq: u64,
    next_try: Instant,
    backoff: Duration,
    failing: bool,
}

impl RedisSide {
    pub fn new(p: RedisParams) -> RedisSide {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        RedisSide {
            p,
            conn: None,
            pending: HashMap::new(),
            inflight: None,
            run,
            seq: 0,
            next_try: Instant::now(),
            backoff: BACKOFF_MIN,
            failing: false,
        }
    }

    /// Rows taken from the ledger: they wait here, aggregated, until Redis has them.
    pub fn add(&mut self, rows: &[(RowKey, Counts)]) {
        for (k, c) in rows {
            self.pending.entry(k.clone()).or_default().merge(c);
        }
    }

    /// Writes what waits (while Redis answers, up to a few batches) and, with budgets set,
    /// reads the users over them cluster-wide. With `last` (the daemon stops) what could
    /// not be written is logged as lost to Redis (the local store has it).
    pub fn flush(&mut self, l: &Ledger, last: bool) {
        if Instant::now() < self.next_try && !last {
            return;
        }
        match self.try_flush(l) {
            Ok(()) => {
                if self.failing {
                    tracing::info!(redis = %self.p.url, "usage: Redis reachable again; the rollups kept meanwhile are written");
                }
                self.failing = false;
                self.backoff = BACKOFF_MIN;
            }
            Err(e) => {
                self.conn = None;
                l.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing {
                    tracing::warn!(redis = %self.p.url, error = %e, "usage: Redis write failed; rollups are kept (aggregated) and finished allocations queued until it is back; the local store has everything");
                }
                self.failing = true;
                self.next_try = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
        l.stats
            .redis_pending_rows
            .store(self.pending.len() as u64, Ordering::Relaxed);
        if last && (!self.pending.is_empty() || self.inflight.is_some()) {
            tracing::error!(
                rows = self.pending.len(),
                "usage: stopping with rollups Redis did not take; they are in the local store only"
            );
        }
    }

    fn try_flush(&mut self, l: &Ledger) -> redis::RedisResult<()> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.p.info)?);
        }
        for _ in 0..BATCHES_PER_FLUSH {
            if self.inflight.is_none() && !self.next_batch(l) {
                break;
            }
            let Some((json, n)) = self.inflight.as_ref() else {
                break;
            };
            let n = *n;
            let conn = self.conn.as_mut().ok_or_else(io_gone)?;
            let _: i64 = redis::cmd("EVAL")
                .arg(SCRIPT)
                .arg(0)
                .arg(json)
                .query(conn)?;
            // Added now, or by an earlier try whose answer was lost: either way, done.
            self.inflight = None;
            l.stats
                .redis_rows_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let (per_day, per_month) = l.budgets();
        if per_day != 0 || per_month != 0 {
            let conn = self.conn.as_mut().ok_or_else(io_gone)?;
            l.set_cluster_spend(read_over(conn, &self.p.keys, per_day, per_month)?);
        }
        Ok(())
    }

    /// Builds the next batch from what waits; false when nothing does.
    fn next_batch(&mut self, l: &Ledger) -> bool {
        let keys: Vec<RowKey> = self.pending.keys().take(BATCH_ROWS).cloned().collect();
        let recs = l.take_finished(BATCH_RECORDS);
        if keys.is_empty() && recs.is_empty() {
            return false;
        }
        l.stats
            .stream_records
            .fetch_add(recs.len() as u64, Ordering::Relaxed);
        let k = &self.p.keys;
        let rows = keys
            .into_iter()
            .filter_map(|key| {
                let c = self.pending.remove(&key)?;
                let month = if key.granularity == Granularity::Day {
                    k.top("month", month_start(key.start))
                } else {
                    String::new()
                };
                Some(BatchRow {
                    h: k.row(key.granularity, key.start, &key.user),
                    z: k.top(key.granularity.name(), key.start),
                    m: month,
                    f: summed(&c)
                        .iter()
                        .flat_map(|(n, v)| [n.to_string(), v.to_string()])
                        .collect(),
                    peak: c.peak_allocations,
                    bytes: c.total_bytes().to_string(),
                    u: key.user,
                })
            })
            .collect::<Vec<_>>();
        self.seq += 1;
        let n = rows.len();
        let b = Batch {
            id: k.batch(&format!("{}:{}:{}", self.p.node, self.run, self.seq)),
            id_ttl: BATCH_ID_TTL,
            ttl: self.p.ttl,
            // A month ranking lives at least until the month is over.
            month_ttl: if self.p.ttl == 0 {
                0
            } else {
                self.p.ttl.max(32 * DAY as u64)
            },
            peak: format!("{PEAK}{}", self.p.node),
            stream: k.stream(),
            maxlen: self.p.stream_maxlen,
            rows,
            recs: recs
                .iter()
                .map(|f| stream_fields(&self.p.node, f))
                .collect(),
        };
        match serde_json::to_string(&b) {
            Ok(json) => {
                self.inflight = Some((json, n));
                true
            }
            Err(_) => false,
        }
    }
}

fn io_gone() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other("connection gone"))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The users at or over a budget on the cluster's totals of today and this month.
fn read_over(
    c: &mut redis::Connection,
    k: &UsageKeys,
    per_day: u64,
    per_month: u64,
) -> redis::RedisResult<HashMap<String, (u64, u64)>> {
    let now = now_unix();
    let mut over: HashMap<String, (u64, u64)> = HashMap::new();
    for (limit, key, is_day) in [
        (per_day, k.top("day", day_start(now)), true),
        (per_month, k.top("month", month_start(now)), false),
    ] {
        if limit == 0 {
            continue;
        }
        let v: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg(limit)
            .arg("+inf")
            .arg("WITHSCORES")
            .query(c)?;
        for (user, score) in v {
            let e = over.entry(user).or_default();
            if is_day {
                e.0 = score as u64;
            } else {
                e.1 = score as u64;
            }
        }
    }
    Ok(over)
}

/// The cluster-wide read side of `/api/usage`, `/api/usage/top` and `tern usage`.
pub struct ClusterReader {
    conn: redis::Connection,
    keys: UsageKeys,
}

fn rerr(e: redis::RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

fn counts_of(h: &HashMap<String, u64>) -> Counts {
    let g = |k: &str| h.get(k).copied().unwrap_or(0);
    Counts {
        to_peer_bytes: g("to_peer_bytes"),
        to_peer_packets: g("to_peer_packets"),
        to_client_bytes: g("to_client_bytes"),
        to_client_packets: g("to_client_packets"),
        tcp_to_peer_bytes: g("tcp_to_peer_bytes"),
        tcp_to_client_bytes: g("tcp_to_client_bytes"),
        allocation_ms: g("allocation_ms"),
        allocations: g("allocations"),
        // Like the SQLite store's rows of several nodes: the sum of the nodes' peaks.
        peak_allocations: h
            .iter()
            .filter(|(k, _)| k.starts_with(PEAK))
            .map(|(_, v)| *v)
            .sum(),
    }
}

impl ClusterReader {
    pub fn open(cfg: &crate::config::Config) -> Result<ClusterReader, StoreError> {
        let info =
            crate::cluster::conn::connection_info(&cfg.cluster, None).map_err(StoreError::Redis)?;
        Ok(ClusterReader {
            conn: connect(&info).map_err(rerr)?,
            keys: UsageKeys::new(&cfg.cluster.key_prefix),
        })
    }

    /// The hashes of `users` in one period, in order (absent ones as zeros).
    fn rows(
        &mut self,
        g: Granularity,
        start: i64,
        users: &[String],
    ) -> Result<Vec<UsageRow>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for u in users {
            p.cmd("HGETALL").arg(self.keys.row(g, start, u));
        }
        let hs: Vec<HashMap<String, u64>> = p.query(&mut self.conn).map_err(rerr)?;
        Ok(users
            .iter()
            .zip(hs)
            .filter(|(_, h)| !h.is_empty())
            .map(|(u, h)| row(u.clone(), g, start, counts_of(&h)))
            .collect())
    }

    /// Rows matching `q` summed over the nodes, by user then period.
    pub fn usage(&mut self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let g = q.granularity;
        let step = match g {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        };
        let first = g.start(q.from);
        if (q.to - first) / step > MAX_PERIODS {
            return Err(StoreError::Redis(format!(
                "at most {MAX_PERIODS} periods per query in cluster mode"
            )));
        }
        let mut out = Vec::new();
        let mut start = first;
        while start < q.to {
            let users = match &q.user {
                Some(u) => vec![u.clone()],
                None => redis::cmd("ZRANGE")
                    .arg(self.keys.top(g.name(), start))
                    .arg(0)
                    .arg(-1)
                    .query::<Vec<String>>(&mut self.conn)
                    .map_err(rerr)?,
            };
            out.extend(self.rows(g, start, &users)?);
            start += step;
        }
        out.sort_by(|a, b| (&a.user, a.period_start).cmp(&(&b.user, b.period_start)));
        Ok(out)
    }

    /// The `limit` users with the most bytes in the period holding `at`, cluster-wide.
    pub fn top(
        &mut self,
        g: Granularity,
        at: i64,
        limit: u32,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let start = g.start(at);
        let ranked: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.top(g.name(), start))
            .arg(0)
            .arg(i64::from(limit) - 1)
            .arg("REV")
            .arg("WITHSCORES")
            .query(&mut self.conn)
            .map_err(rerr)?;
        let users: Vec<String> = ranked.into_iter().map(|(u, _)| u).collect();
        let mut rows = self.rows(g, start, &users)?;
        // The ranking's order, ties by user (as the SQLite query).
        rows.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.user.cmp(&b.user)));
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_fields_put_tcp_bytes_apart() {
        let f = Finished {
            user: "alice".into(),
            tcp: true,
            start_ms: 1000,
            end_ms: 5000,
            total: RelayUsage {
                to_peer_bytes: 10,
                to_peer_packets: 0,
                to_client_bytes: 20,
                to_client_packets: 0,
            },
        };
        let v = stream_fields("n1", &f);
        let m: HashMap<_, _> = v
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        assert_eq!(m["transport"], "tcp");
        assert_eq!(m["tcp_to_peer_bytes"], "10");
        assert_eq!(m["tcp_to_client_bytes"], "20");
        assert_eq!(m["to_peer_bytes"], "0");
        assert_eq!(m["node"], "n1");
    }

    #[test]
    fn peaks_of_nodes_add_up_like_the_store() {
        let mut h = HashMap::new();
        h.insert("to_peer_bytes".to_string(), 5);
        h.insert(format!("{PEAK}a"), 2);
        h.insert(format!("{PEAK}b"), 3);
        let c = counts_of(&h);
        assert_eq!(c.to_peer_bytes, 5);
        assert_eq!(c.peak_allocations, 5);
    }
}
