//! The read side shared by `GET /api/usage`, `GET /api/usage/top` and `tern usage`: one
//! query type, one result type, and the table/CSV/JSON renderings. Reads the store with
//! its own read-only connection (WAL: never blocks the writer), or in cluster mode the
//! cluster's Redis ([`Reader`]), so any node answers for the whole cluster.

use std::path::Path;

use rusqlite::params;
use serde::Serialize;

use super::store::{Counts, Granularity, SqliteStore, StoreError};
use super::time::format_utc;

/// Rows of one user (or every user) in `[from, to)`.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub user: Option<String>,
    pub from: i64,
    pub to: i64,
    pub granularity: Granularity,
}

/// One user in one period, summed over nodes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageRow {
    pub user: String,
    pub granularity: &'static str,
    /// Period start, RFC 3339 UTC.
    pub period: String,
    pub period_start: i64,
    #[serde(flatten)]
    pub counts: Counts,
    /// `to_peer_bytes + to_client_bytes + tcp_to_peer_bytes + tcp_to_client_bytes`.
    pub total_bytes: u64,
}

const COLS: &str = "SUM(to_peer_bytes), SUM(to_peer_packets), SUM(to_client_bytes),
    SUM(to_client_packets), SUM(tcp_to_peer_bytes), SUM(tcp_to_client_bytes),
    SUM(allocation_ms), SUM(allocations), SUM(peak_allocations)";

fn counts_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Counts> {
    let g = |i: usize| r.get::<_, i64>(first + i).map(|v| v.max(0) as u64);
    Ok(Counts {
        to_peer_bytes: g(0)?,
        to_peer_packets: g(1)?,
        to_client_bytes: g(2)?,
        to_client_packets: g(3)?,
        tcp_to_peer_bytes: g(4)?,
        tcp_to_client_bytes: g(5)?,
        allocation_ms: g(6)?,
        allocations: g(7)?,
        peak_allocations: g(8)?,
    })
}

pub(super) fn row(user: String, g: Granularity, start: i64, counts: Counts) -> UsageRow {
    UsageRow {
        user,
        granularity: g.name(),
        period: format_utc(start),
        period_start: start,
        total_bytes: counts.total_bytes(),
        counts,
    }
}

fn sql_err(s: &SqliteStore) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: s.path().to_string(),
        source,
    }
}

/// Where usage is read from: this node's store, or in cluster mode the cluster's Redis.
pub enum Reader {
    /// `None`: the store was never written.
    Store(Option<SqliteStore>),
    Cluster(super::redis_side::ClusterReader),
}

impl Reader {
    /// The cluster's Redis when `[cluster]` is configured, else `usage.path`. An
    /// unreachable Redis is an error (never a silent fall-back to one node's share).
    pub fn open(cfg: &crate::config::Config) -> Result<Reader, StoreError> {
        if cfg.cluster.enabled() {
            return super::redis_side::ClusterReader::open(cfg).map(Reader::Cluster);
        }
        open(&cfg.usage.path).map(Reader::Store)
    }

    /// `node` or `cluster`: what the answer covers.
    pub fn scope(&self) -> &'static str {
        match self {
            Reader::Store(_) => "node",
            Reader::Cluster(_) => "cluster",
        }
    }

    pub fn usage(&mut self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        match self {
            Reader::Store(None) => Ok(Vec::new()),
            Reader::Store(Some(s)) => usage(s, q),
            Reader::Cluster(c) => c.usage(q),
        }
    }

    pub fn top(
        &mut self,
        g: Granularity,
        at: i64,
        limit: u32,
    ) -> Result<Vec<UsageRow>, StoreError> {
        match self {
            Reader::Store(None) => Ok(Vec::new()),
            Reader::Store(Some(s)) => top(s, g, at, limit),
            Reader::Cluster(c) => c.top(g, at, limit),
        }
    }
}

/// Opens the store at `path` for reading; a missing file means nothing was recorded yet.
pub fn open(path: &Path) -> Result<Option<SqliteStore>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    SqliteStore::open_read(path).map(Some)
}

/// Rows matching `q`, by user then period.
pub fn usage(store: &SqliteStore, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    let sql = format!(
        "SELECT user, period_start, {COLS} FROM usage
         WHERE granularity = ?1 AND period_start >= ?2 AND period_start < ?3
           AND (?4 IS NULL OR user = ?4)
         GROUP BY user, period_start ORDER BY user, period_start"
    );
    let e = sql_err(store);
    let mut st = store.conn().prepare(&sql).map_err(&e)?;
    let g = q.granularity;
    let rows = st
        .query_map(
            params![g.name(), g.start(q.from), q.to, q.user.as_deref()],
            |r| Ok(row(r.get(0)?, g, r.get(1)?, counts_at(r, 2)?)),
        )
        .map_err(&e)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(e)
}

/// The `limit` users with the most bytes in the period of granularity `g` holding `at`.
pub fn top(
    store: &SqliteStore,
    g: Granularity,
    at: i64,
    limit: u32,
) -> Result<Vec<UsageRow>, StoreError> {
    let sql = format!(
        "SELECT user, {COLS} FROM usage WHERE granularity = ?1 AND period_start = ?2
         GROUP BY user
         ORDER BY SUM(to_peer_bytes + to_client_bytes + tcp_to_peer_bytes + tcp_to_client_bytes) DESC,
                  user
         LIMIT ?3"
    );
    let e = sql_err(store);
    let mut st = store.conn().prepare(&sql).map_err(&e)?;
    let start = g.start(at);
    let rows = st
        .query_map(params![g.name(), start, limit], |r| {
            Ok(row(r.get(0)?, g, start, counts_at(r, 1)?))
        })
        .map_err(&e)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(e)
}

/// Sum of `rows` (the API's `total`).
pub fn total(rows: &[UsageRow]) -> Counts {
    let mut t = Counts::default();
    for r in rows {
        // Summing periods: the peak of the whole range is the largest period peak.
        t.merge(&r.counts);
    }
    t
}

const HEADER: [&str; 13] = [
    "user",
    "period",
    "to_peer_bytes",
    "to_peer_packets",
    "to_client_bytes",
    "to_client_packets",
    "tcp_to_peer_bytes",
    "tcp_to_client_bytes",
    "allocation_seconds",
    "allocations",
    "peak_allocations",
    "total_bytes",
    "granularity",
];

fn fields(r: &UsageRow) -> [String; 13] {
    let c = &r.counts;
    [
        r.user.clone(),
        r.period.clone(),
        c.to_peer_bytes.to_string(),
        c.to_peer_packets.to_string(),
        c.to_client_bytes.to_string(),
        c.to_client_packets.to_string(),
        c.tcp_to_peer_bytes.to_string(),
        c.tcp_to_client_bytes.to_string(),
        format!("{:.3}", c.allocation_ms as f64 / 1000.0),
        c.allocations.to_string(),
        c.peak_allocations.to_string(),
        r.total_bytes.to_string(),
        r.granularity.to_string(),
    ]
}

/// RFC 4180 CSV with a header line. User ids are quoted when they need it.
pub fn to_csv(rows: &[UsageRow]) -> String {
    let mut out = HEADER.join(",") + "\n";
    for r in rows {
        let f = fields(r);
        let line: Vec<String> = f
            .iter()
            .map(|v| {
                if v.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", v.replace('"', "\"\""))
                } else {
                    v.clone()
                }
            })
            .collect();
        out += &line.join(",");
        out.push('\n');
    }
    out
}

/// An aligned text table.
pub fn to_table(rows: &[UsageRow]) -> String {
    let all: Vec<[String; 13]> = std::iter::once(HEADER.map(String::from))
        .chain(rows.iter().map(fields))
        .collect();
    let mut w = [0usize; 13];
    for r in &all {
        for (i, v) in r.iter().enumerate() {
            w[i] = w[i].max(v.chars().count());
        }
    }
    let mut out = String::new();
    for r in &all {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<width$}", width = w[i]))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}
