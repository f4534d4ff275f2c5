//! Where rollups go: the [`UsageSink`] trait the writer thread drives, and [`SqliteStore`],
//! the embedded store of a single node (one file, WAL journal, written in one transaction
//! per batch). A cluster sink (Redis `HINCRBY` per user and period, a stream of finished
//! allocations) implements the same trait beside it.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

/// Rollup period (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }

    /// Start of the period holding Unix time `t`.
    pub fn start(self, t: i64) -> i64 {
        match self {
            Granularity::Hour => super::time::hour_start(t),
            Granularity::Day => super::time::day_start(t),
        }
    }
}

/// One rollup row: a user in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub user: String,
    pub granularity: Granularity,
    /// Unix seconds of the period's start.
    pub start: i64,
}

/// What a user did in one period. Bytes are relayed payload (no TURN framing); UDP relay
/// datagrams and RFC 6062 TCP relay bytes are kept apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub to_peer_bytes: u64,
    pub to_peer_packets: u64,
    pub to_client_bytes: u64,
    pub to_client_packets: u64,
    pub tcp_to_peer_bytes: u64,
    pub tcp_to_client_bytes: u64,
    pub allocation_ms: u64,
    pub allocations: u64,
    /// Most allocations the user held at once in the period (on this node).
    pub peak_allocations: u64,
}

impl Counts {
    /// Folds `o` in: sums, except the peak, which is a maximum.
    pub fn merge(&mut self, o: &Counts) {
        self.to_peer_bytes += o.to_peer_bytes;
        self.to_peer_packets += o.to_peer_packets;
        self.to_client_bytes += o.to_client_bytes;
        self.to_client_packets += o.to_client_packets;
        self.tcp_to_peer_bytes += o.tcp_to_peer_bytes;
        self.tcp_to_client_bytes += o.tcp_to_client_bytes;
        self.allocation_ms += o.allocation_ms;
        self.allocations += o.allocations;
        self.peak_allocations = self.peak_allocations.max(o.peak_allocations);
    }

    /// All relayed bytes, both directions, UDP and TCP (what budgets count).
    pub fn total_bytes(&self) -> u64 {
        self.to_peer_bytes
            + self.to_client_bytes
            + self.tcp_to_peer_bytes
            + self.tcp_to_client_bytes
    }
}

/// A failure of the store; the writer keeps the batch in memory and retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("usage store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("usage in Redis: {0}")]
    Redis(String),
    #[error("usage store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Where the writer thread puts rollups. Called from the writer thread only.
pub trait UsageSink: Send {
    /// Adds `rows` (deltas) to the stored rollups of `node`, all or nothing.
    fn write(&mut self, node: &str, rows: &[(RowKey, Counts)]) -> Result<(), StoreError>;
    /// Deletes rollups of periods that started before `before`; returns how many.
    fn prune(&mut self, before: i64) -> Result<u64, StoreError>;
    /// Bytes per user since `day` and since `month` (period starts), to seed the budgets.
    fn spend(&mut self, day: i64, month: i64) -> Result<Vec<(String, u64, u64)>, StoreError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    user TEXT NOT NULL,
    granularity TEXT NOT NULL CHECK (granularity IN ('hour', 'day')),
    period_start INTEGER NOT NULL,
    node TEXT NOT NULL,
    to_peer_bytes INTEGER NOT NULL DEFAULT 0,
    to_peer_packets INTEGER NOT NULL DEFAULT 0,
    to_client_bytes INTEGER NOT NULL DEFAULT 0,
    to_client_packets INTEGER NOT NULL DEFAULT 0,
    tcp_to_peer_bytes INTEGER NOT NULL DEFAULT 0,
    tcp_to_client_bytes INTEGER NOT NULL DEFAULT 0,
    allocation_ms INTEGER NOT NULL DEFAULT 0,
    allocations INTEGER NOT NULL DEFAULT 0,
    peak_allocations INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (granularity, period_start, user, node)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_user ON usage (user, granularity, period_start);
PRAGMA user_version = 1;
";

/// The SQLite store (one file; WAL so `tern usage` and the API read while the daemon
/// writes; `synchronous = NORMAL`: a committed batch survives a crash of the process).
pub struct SqliteStore {
    conn: Connection,
    path: String,
}

fn err(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_string(),
        source,
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the store at `path` for writing.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let p = path.display().to_string();
        let io = |source| StoreError::Io {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Who relayed how much is nobody else's business: owner and group only.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io)?;
        }
        let fresh = !path.exists();
        let conn = Connection::open(path).map_err(err(&p))?;
        if fresh {
            // SQLite gives its -wal and -shm files the main file's mode.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).map_err(io)?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err(&p))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err(&p))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err(&p))?;
        conn.execute_batch(SCHEMA).map_err(err(&p))?;
        Ok(SqliteStore { conn, path: p })
    }

    /// Opens an existing store read-only (the API and `tern usage`).
    pub fn open_read(path: &Path) -> Result<SqliteStore, StoreError> {
        let p = path.display().to_string();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err(&p))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err(&p))?;
        Ok(SqliteStore { conn, path: p })
    }

    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// `PRAGMA integrity_check`: "ok" when the file is sound.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(err(&self.path))
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl UsageSink for SqliteStore {
    fn write(&mut self, node: &str, rows: &[(RowKey, Counts)]) -> Result<(), StoreError> {
        let p = self.path.clone();
        let tx = self.conn.transaction().map_err(err(&p))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO usage (user, granularity, period_start, node, to_peer_bytes,
                        to_peer_packets, to_client_bytes, to_client_packets, tcp_to_peer_bytes,
                        tcp_to_client_bytes, allocation_ms, allocations, peak_allocations)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT (granularity, period_start, user, node) DO UPDATE SET
                        to_peer_bytes = to_peer_bytes + excluded.to_peer_bytes,
                        to_peer_packets = to_peer_packets + excluded.to_peer_packets,
                        to_client_bytes = to_client_bytes + excluded.to_client_bytes,
                        to_client_packets = to_client_packets + excluded.to_client_packets,
                        tcp_to_peer_bytes = tcp_to_peer_bytes + excluded.tcp_to_peer_bytes,
                        tcp_to_client_bytes = tcp_to_client_bytes + excluded.tcp_to_client_bytes,
                        allocation_ms = allocation_ms + excluded.allocation_ms,
                        allocations = allocations + excluded.allocations,
                        peak_allocations = max(peak_allocations, excluded.peak_allocations)",
                )
                .map_err(err(&p))?;
            for (k, c) in rows {
                st.execute(params![
                    k.user,
                    k.granularity.name(),
                    k.start,
                    node,
                    i(c.to_peer_bytes),
                    i(c.to_peer_packets),
                    i(c.to_client_bytes),
                    i(c.to_client_packets),
                    i(c.tcp_to_peer_bytes),
                    i(c.tcp_to_client_bytes),
                    i(c.allocation_ms),
                    i(c.allocations),
                    i(c.peak_allocations),
                ])
                .map_err(err(&p))?;
            }
        }
        tx.commit().map_err(err(&p))
    }

    fn prune(&mut self, before: i64) -> Result<u64, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM usage WHERE period_start < ?1", [before])
            .map_err(err(&self.path))?;
        Ok(n as u64)
    }

    fn spend(&mut self, day: i64, month: i64) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let p = self.path.clone();
        let mut st = self
            .conn
            .prepare(
                "SELECT user,
                    SUM(CASE WHEN period_start >= ?1 THEN b ELSE 0 END), SUM(b)
                 FROM (SELECT user, period_start, to_peer_bytes + to_client_bytes
                        + tcp_to_peer_bytes + tcp_to_client_bytes AS b
                       FROM usage WHERE granularity = 'day' AND period_start >= ?2)
                 GROUP BY user",
            )
            .map_err(err(&p))?;
        let rows = st
            .query_map([day, month], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?.max(0) as u64,
                    r.get::<_, i64>(2)?.max(0) as u64,
                ))
            })
            .map_err(err(&p))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err(&p))
    }
}
