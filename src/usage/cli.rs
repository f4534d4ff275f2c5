//! `tern usage`: the store's rollups on the command line, for cron jobs and billing
//! exports. The same queries as `GET /api/usage` (`super::query`), read from
//! `usage.path` directly (the daemon need not run), or in cluster mode from the cluster's
//! Redis (every node's usage).

use super::query::{self, UsageQuery};
use super::time::{parse_time, DAY};
use super::Granularity;

/// What `tern usage` was asked (already parsed by clap in main.rs).
#[derive(Debug, Clone, Default)]
pub struct UsageArgs {
    pub user: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `hour` or `day` (default `day`).
    pub granularity: Option<String>,
    /// `table` (default), `csv` or `json`.
    pub format: Option<String>,
    /// Only the N users with the most bytes in the period holding `--to` (default now).
    pub top: Option<u32>,
}

/// Runs the query and renders it; the error is one line for the user.
pub fn run(cfg: &crate::config::Config, a: &UsageArgs) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let g = match a.granularity.as_deref() {
        None => Granularity::Day,
        Some(s) => Granularity::parse(s).ok_or("--granularity: expected hour or day")?,
    };
    let from = match &a.from {
        Some(s) => parse_time(s, now).map_err(|e| format!("--from: {e}"))?,
        None => now - 31 * DAY,
    };
    let to = match &a.to {
        Some(s) => parse_time(s, now).map_err(|e| format!("--to: {e}"))?,
        None => now + 1,
    };
    let format = a.format.as_deref().unwrap_or("table");
    if !["table", "csv", "json"].contains(&format) {
        return Err("--format: expected table, csv or json".into());
    }
    let mut reader = query::Reader::open(cfg).map_err(|e| e.to_string())?;
    let rows = match a.top {
        Some(n) => reader.top(g, to.min(now), n),
        None => reader.usage(&UsageQuery {
            user: a.user.clone(),
            from,
            to,
            granularity: g,
        }),
    }
    .map_err(|e| e.to_string())?;
    Ok(match format {
        "csv" => query::to_csv(&rows),
        "json" => {
            serde_json::to_string_pretty(&serde_json::json!({
                "granularity": g.name(),
                "scope": reader.scope(),
                "total": query::total(&rows),
                "rows": rows,
            }))
            .map_err(|e| e.to_string())?
                + "\n"
        }
        _ => query::to_table(&rows),
    })
}
