//! Ephemeral ICE credentials: `GET /api/ice` (an RTCConfiguration fragment) and
//! `GET /api/turn` (draft-uberti-behave-turn-rest-00 §2.2), minted with the secret the TURN
//! server checks (TURN REST API usernames `expiry:user`, RFC 8489 §9.2 long-term auth).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::cors::{self, OriginCheck};
use super::AppState;
use crate::rate::TokenBucket;
use crate::signal::client_ip::client_ip;
use crate::turn::auth::mint_rest_credential;

/// Anonymous rate-limit entries kept before idle ones are pruned.
const MAX_ANON_ENTRIES: usize = 50_000;

/// A refusal: status and a JSON `{"error": ...}` body.
struct Deny {
    status: StatusCode,
    message: String,
    retry_after: bool,
}

fn error(status: StatusCode, message: &str) -> Deny {
    Deny {
        status,
        message: message.to_string(),
        retry_after: false,
    }
}

impl IntoResponse for Deny {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("6"));
        }
        r
    }
}

/// Who is asking, after token, origin and rate-limit checks.
enum Caller {
    /// A backend with a valid bearer token: any user id, TTL up to the maximum.
    Backend,
    /// A browser from an allowed origin: a random user id, the anonymous TTL.
    Anonymous,
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(super) fn token_ok(tokens: &[String], given: &str) -> bool {
    // Check every token so timing does not tell which one (or how many) matched.
    tokens.iter().fold(false, |acc, t| {
        acc | bool::from(t.as_bytes().ct_eq(given.as_bytes()))
    })
}

/// The request's origin under `api.allowed_origins` and the own-origin rule.
fn origin(st: &AppState, headers: &HeaderMap) -> OriginCheck {
    let api = &st.cfg.api;
    cors::check_origin(headers, &api.allowed_origins, &api.public_host)
}

/// Decides whether the caller may mint; the error is the full HTTP answer.
fn authorize(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query_key: Option<&str>,
) -> Result<Caller, Deny> {
    if let Some(given) = bearer(headers).or(query_key) {
        return if token_ok(&st.tokens, given) {
            Ok(Caller::Backend)
        } else {
            Err(error(StatusCode::UNAUTHORIZED, "invalid API token"))
        };
    }
    if !st.cfg.api.anonymous_enabled {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (anonymous minting is disabled)",
        ));
    }
    match origin(st, headers) {
        OriginCheck::Allowed(_) => {}
        OriginCheck::Denied => {
            return Err(error(
                StatusCode::FORBIDDEN,
                "this origin may not mint credentials (see api.allowed_origins)",
            ))
        }
        OriginCheck::Absent => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required outside a browser page from an allowed origin",
            ))
        }
    }
    let ip = client_ip(peer.ip(), headers, &st.cfg.api.trusted_proxies);
    if !anon_allowed(st, ip) {
        let mut d = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many credential requests from this address; try again later",
        );
        d.retry_after = true;
        return Err(d);
    }
    Ok(Caller::Anonymous)
}

fn anon_allowed(st: &AppState, ip: IpAddr) -> bool {
    let now = Instant::now();
    let rate = f64::from(st.cfg.api.anonymous_rate_per_min) / 60.0;
    let burst = f64::from(st.cfg.api.anonymous_burst);
    let mut map = st.anon_buckets.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_ANON_ENTRIES {
        map.retain(|_, b| !b.is_full(now));
        if map.len() >= MAX_ANON_ENTRIES {
            // Under a spray of addresses, refuse new ones rather than grow without bound.
            return map.get_mut(&ip).is_some_and(|b| b.try_take(1.0, now));
        }
    }
    map.entry(ip)
        .or_insert_with(|| TokenBucket::new(rate, burst, now))
        .try_take(1.0, now)
}

/// Host for ICE URLs: `api.public_host`, else the first external/relay address, else the
/// request's Host header (without its port).
fn ice_host(st: &AppState, headers: &HeaderMap) -> Option<String> {
    let api = &st.cfg.api;
    let t = &st.cfg.turn;
    let host = if !api.public_host.is_empty() {
        api.public_host.clone()
    } else if let Some(ip) = t.external_ip.first().or(t.relay_ip.first()) {
        ip.to_string()
    } else {
        let h = headers.get(header::HOST)?.to_str().ok()?;
        cors::strip_port(h).to_string()
    };
    // IPv6 literals go in brackets in URIs (RFC 7064 §3.1, RFC 7065 §3.1).
    Some(if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host
    })
}

fn random_user() -> String {
    let b: [u8; 8] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("anon-{hex}")
}

fn valid_user(u: &str) -> bool {
    u.len() <= 128 && !u.bytes().any(|b| b.is_ascii_control())
}

struct Minted {
    username: String,
    password: String,
    ttl: u64,
    host: String,
    port: u16,
    /// TURN over TLS port, when a certificate is configured (RFC 8656 §3.1).
    tls_port: Option<u16>,
}

/// Where `turns:` clients connect: the first TLS listener, else the sniffing TURN port.
pub(crate) fn turns_port(cfg: &crate::config::Config) -> Option<u16> {
    if !cfg.tls.enabled() {
        return None;
    }
    match cfg.tls.listen.first() {
        Some(a) => Some(a.port()),
        None if cfg.turn.sniff_tls => Some(cfg.turn.listen.first().map_or(3478, SocketAddr::port)),
        None => None,
    }
}

fn mint(
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    user: Option<&str>,
    ttl: Option<&str>,
) -> Result<Minted, Deny> {
    let Some(secret) = st.secrets.first() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no TURN REST secret configured: set turn.auth_secrets or turn.secret_file",
        ));
    };
    let api = &st.cfg.api;
    let (user, ttl) = match caller {
        Caller::Anonymous => (random_user(), u64::from(api.anonymous_ttl_secs)),
        Caller::Backend => {
            let user = user.unwrap_or("").to_string();
            if !valid_user(&user) {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "user must be at most 128 characters without control characters",
                ));
            }
            let ttl = match ttl {
                None => u64::from(api.default_ttl_secs),
                Some(t) => match t.parse::<u64>() {
                    Ok(t) if (1..=u64::from(api.max_ttl_secs)).contains(&t) => t,
                    _ => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            &format!("ttl must be 1 to {} seconds", api.max_ttl_secs),
                        ))
                    }
                },
            };
            (user, ttl)
        }
    };
    let Some(host) = ice_host(st, headers) else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no public host: set api.public_host",
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let c = mint_rest_credential(secret, &user, ttl, now, &st.cfg.turn.username_separator);
    let port = st.cfg.turn.listen.first().map_or(3478, SocketAddr::port);
    let (host, port, tls_port) = match cluster_target(st) {
        Some(t) => t,
        None => (host, port, turns_port(&st.cfg)),
    };
    Ok(Minted {
        username: c.username,
        password: c.password,
        ttl,
        host,
        port,
        tls_port,
    })
}

/// Cluster mode: the TURN host and ports of the healthy node new sessions should use when
/// this one is draining or over its ceilings (`None`: this node). The secret is shared, so
/// the credential works there.
fn cluster_target(st: &AppState) -> Option<(String, u16, Option<u16>)> {
    let n = st.cluster.as_ref()?.steer(st.draining())?;
    let host = if n.turn_host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{}]", n.turn_host)
    } else {
        n.turn_host
    };
    Some((host, n.turn_port, n.turns_port))
}

fn with_cors(st: &AppState, headers: &HeaderMap, mut r: Response) -> Response {
    if let OriginCheck::Allowed(Some(o)) = origin(st, headers) {
        cors::allow(r.headers_mut(), &o);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `OPTIONS` preflight for the credential routes.
pub async fn preflight(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match origin(&st, &headers) {
        OriginCheck::Allowed(Some(o)) => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            cors::preflight(r.headers_mut(), &o);
            r
        }
        _ => error(StatusCode::FORBIDDEN, "origin not allowed").into_response(),
    }
}

/// `GET /api/ice[?user=ID&ttl=SECS]`.
pub async fn ice(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = authorize(&st, peer, &headers, None).and_then(|caller| {
        mint(
            &st,
            &caller,
            &headers,
            q.get("user").map(String::as_str),
            q.get("ttl").map(String::as_str),
        )
    });
    let r = match r {
        Ok(m) => {
            let (h, p) = (&m.host, m.port);
            let mut urls: Vec<Value> = vec![
                format!("stun:{h}:{p}").into(),
                format!("turn:{h}:{p}?transport=udp").into(),
                format!("turn:{h}:{p}?transport=tcp").into(),
            ];
            if let Some(tp) = m.tls_port {
                urls.push(format!("turns:{h}:{tp}?transport=tcp").into());
            }
            Json(json!({
                "iceServers": [{
                    "urls": urls,
                    "username": m.username,
                    "credential": m.password,
                }],
                "ttl": m.ttl,
            }))
            .into_response()
        }
        Err(d) => d.into_response(),
    };
    with_cors(&st, &headers, r)
}

/// `GET /api/turn?service=turn&username=ID[&key=TOKEN]` (draft-uberti-behave-turn-rest-00).
pub async fn turn_rest(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if q.get("service").is_some_and(|s| s != "turn") {
        return with_cors(
            &st,
            &headers,
            error(StatusCode::BAD_REQUEST, "service must be \"turn\"").into_response(),
        );
    }
    let r = authorize(&st, peer, &headers, q.get("key").map(String::as_str)).and_then(|caller| {
        mint(
            &st,
            &caller,
            &headers,
            q.get("username").map(String::as_str),
            q.get("ttl").map(String::as_str),
        )
    });
    let r = match r {
        Ok(m) => {
            let (h, p) = (&m.host, m.port);
            let mut uris = vec![
                format!("turn:{h}:{p}?transport=udp"),
                format!("turn:{h}:{p}?transport=tcp"),
            ];
            if let Some(tp) = m.tls_port {
                uris.push(format!("turns:{h}:{tp}?transport=tcp"));
            }
            Json(json!({
                "username": m.username,
                "password": m.password,
                "ttl": m.ttl,
                "uris": uris,
            }))
            .into_response()
        }
        Err(d) => d.into_response(),
    };
    with_cors(&st, &headers, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_all() {
        let t = vec!["a".repeat(20), "b".repeat(20)];
        assert!(token_ok(&t, &"b".repeat(20)));
        assert!(!token_ok(&t, &"c".repeat(20)));
        assert!(!token_ok(&t, ""));
    }
}
