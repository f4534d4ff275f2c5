//! `GET /api/usage` and `GET /api/usage/top` (issue 14, docs/usage.md): per-user usage
//! from the usage store, for billing and abuse checks, behind the admin bearer tokens
//! (`api.admin_tokens`). A credential-minting token is recognised and refused (403): it
//! may mint, not read everyone's usage.
//!
//! Owns parameter parsing and the HTTP answers; the queries are `crate::usage::query`'s,
//! shared with `tern usage`. The store is read on a blocking thread, never on the runtime.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ice::{bearer, token_ok};
use super::AppState;
use crate::usage::query::{self, UsageQuery};
use crate::usage::time::{format_utc, parse_time, DAY};
use crate::usage::Granularity;

/// Most rows `/api/usage/top` returns.
const MAX_TOP: u32 = 1000;
/// Default range of `/api/usage`: this many days back.
const DEFAULT_DAYS: i64 = 31;

/// A refused request: status and message, answered as `{"error": message}`.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn error(status: StatusCode, message: &str) -> Refusal {
    Refusal(status, message.to_string())
}

/// 401 without a valid admin token, 403 for a minting token.
fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(given) = bearer(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "an admin bearer token (api.admin_tokens) is required",
        ));
    };
    if token_ok(&st.cfg.api.admin_tokens, given) {
        return Ok(());
    }
    if token_ok(&st.tokens, given) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this token may mint credentials but not read usage (use one of api.admin_tokens)",
        ));
    }
    Err(error(StatusCode::UNAUTHORIZED, "invalid admin token"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn time_param(
    q: &HashMap<String, String>,
    name: &str,
    default: i64,
    now: i64,
) -> Result<i64, Refusal> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => {
            parse_time(v, now).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("{name}: {e}")))
        }
    }
}

fn granularity(q: &HashMap<String, String>, name: &str) -> Result<Granularity, Refusal> {
    match q.get(name) {
        None => Ok(Granularity::Day),
        Some(v) => Granularity::parse(v).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("{name}: expected hour or day"),
            )
        }),
    }
}

/// Runs `f` on the usage reader (the store, or the cluster's Redis) on a blocking thread;
/// answers with what `f` read and the reader's scope (`node` or `cluster`).
async fn with_store<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&mut query::Reader) -> Result<T, crate::usage::StoreError> + Send + 'static,
) -> Result<(T, &'static str), Refusal> {
    if !st.cfg.usage.enabled {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "usage accounting is off (usage.enabled = false)",
        ));
    }
    let cfg = st.cfg.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut r = query::Reader::open(&cfg)?;
        f(&mut r).map(|v| (v, r.scope()))
    })
    .await;
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ crate::usage::StoreError::Redis(_))) => {
            tracing::warn!(error = %e, "usage query: the cluster's Redis did not answer");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster usage unavailable: Redis did not answer (each node's own store has its share; see the log)",
            ))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "usage query failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "usage store unreadable (see the log)",
            ))
        }
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "usage query failed",
        )),
    }
}

/// `GET /api/usage?user=U&from=T&to=T&granularity=hour|day`: rows per user and period in
/// `[from, to)`, and their total. Defaults: every user, the last 31 days, by day.
pub(super) async fn usage(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return r.into_response();
    }
    let now = now();
    let g = match granularity(&q, "granularity") {
        Ok(g) => g,
        Err(r) => return r.into_response(),
    };
    let (from, to) = match (
        time_param(&q, "from", now - DEFAULT_DAYS * DAY, now),
        time_param(&q, "to", now + 1, now),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    if from >= to {
        return error(StatusCode::BAD_REQUEST, "from must be before to").into_response();
    }
    let user = q.get("user").filter(|u| !u.is_empty()).cloned();
    let uq = UsageQuery {
        user: user.clone(),
        from,
        to,
        granularity: g,
    };
    match with_store(&st, move |r| r.usage(&uq)).await {
        Ok((rows, scope)) => Json(json!({
            "scope": scope,
            "user": user,
            "granularity": g.name(),
            "from": format_utc(from),
            "to": format_utc(to),
            "total": query::total(&rows),
            "rows": rows,
        }))
        .into_response(),
        Err(r) => r.into_response(),
    }
}

/// `GET /api/usage/top?period=hour|day&at=T&limit=N`: the users with the most relayed
/// bytes in the period holding `at` (default: now), most first. Default limit 20.
pub(super) async fn top(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return r.into_response();
    }
    let now = now();
    let g = match granularity(&q, "period") {
        Ok(g) => g,
        Err(r) => return r.into_response(),
    };
    let at = match time_param(&q, "at", now, now) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let limit = match q.get("limit").map(|l| l.parse::<u32>()) {
        None => 20,
        Some(Ok(n)) if (1..=MAX_TOP).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("limit: expected 1 to {MAX_TOP}"),
            )
            .into_response()
        }
    };
    match with_store(&st, move |r| r.top(g, at, limit)).await {
        Ok((rows, scope)) => Json(json!({
            "scope": scope,
            "period": g.name(),
            "start": format_utc(g.start(at)),
            "rows": rows,
        }))
        .into_response(),
        Err(r) => r.into_response(),
    }
}
