//! The router: credential routes, WebSocket upgrades, and the PeerJS HTTP routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{cors, ice, usage, AppState, Live};
use crate::config::SignalConfig;
use crate::signal::client_ip::{client_ip, lan_key};
use crate::signal::peerjs::INFO_JSON;
use crate::signal::ws::Upgrade;

/// Which signaling protocol a socket speaks: each keeps its own frame limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Face {
    Native,
    PeerJs,
}

/// The largest signaling WebSocket message accepted; a larger one closes its sender with
/// 1009 at its frame header, before it is buffered (`signal::ws::Decoder`). Native `/ws`: four times `max_message_bytes`
/// (between the two the machine answers "too large"). PeerJS: four times
/// `peerjs_max_message_bytes` (2 MiB, so a 1 MiB payload passes at defaults as with the
/// `peer` server); between the two the machine closes the sender with 1009 and a reason
/// naming the key, past it the codec does, before buffering the frame.
fn ws_limit(cfg: &SignalConfig, face: Face) -> usize {
    match face {
        Face::Native => cfg.max_message_bytes.saturating_mul(4).max(64 * 1024),
        Face::PeerJs => cfg
            .peerjs_max_message_bytes
            .saturating_mul(4)
            .max(64 * 1024),
    }
}

pub(super) fn router(live: Live) -> Router {
    let st = live.current();
    let mut r = Router::new()
        .route("/api/ice", get(ice::ice).options(ice::preflight))
        .route("/api/turn", get(ice::turn_rest).options(ice::preflight))
        .route("/api/usage", get(usage::usage))
        .route("/api/usage/top", get(usage::top))
        .route("/ws", get(ws_native))
        .route("/relay", get(relay));
    let peerjs_at_root =
        st.cfg.signal.peerjs_enabled && st.cfg.signal.peerjs_path.trim_end_matches('/').is_empty();
    for asset in super::web::ASSETS {
        // A PeerJS server mounted at `/` keeps `/` (its info route); the rest still serve.
        if asset.path == "/" && peerjs_at_root {
            continue;
        }
        r = r.route(
            asset.path,
            get(move || async move { super::web::serve(asset) }),
        );
    }
    if st.cfg.signal.peerjs_enabled {
        let base = st.cfg.signal.peerjs_path.trim_end_matches('/').to_string();
        let root = if base.is_empty() {
            "/".to_string()
        } else {
            base.clone()
        };
        // Every PeerJS route answers a CORS preflight as `peer` does (its `cors` middleware
        // covers the whole mount).
        r = r
            .route(&root, get(peerjs_info).options(peerjs_preflight))
            .route(
                &format!("{base}/peerjs"),
                get(peerjs_ws).options(peerjs_preflight),
            )
            .route(
                &format!("{base}/{{key}}/id"),
                get(peerjs_id).options(peerjs_preflight),
            )
            .route(
                &format!("{base}/{{key}}/peers"),
                get(peerjs_peers).options(peerjs_preflight),
            );
        if !base.is_empty() {
            r = r.route(
                &format!("{base}/"),
                get(peerjs_info).options(peerjs_preflight),
            );
        }
    }
    let metrics = Arc::clone(&live.current().http_metrics);
    r.layer(axum::middleware::from_fn_with_state(metrics, count_request))
        .with_state(live)
}

/// Counts every request by route template (bounded: never the raw path) and status.
async fn count_request(
    State(m): State<Arc<super::http_metrics::HttpMetrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    m.observe(
        route.as_deref().unwrap_or("unmatched"),
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

/// New signaling connections are refused while draining (the load balancer sends them
/// to another node; `/readyz` says not ready).
fn draining_refusal() -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server is draining; connect to another node",
    )
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The `Sec-WebSocket-Protocol` a native client offers along with `resume.TOKEN`; the
/// server selects it, never echoing the token.
const NATIVE_SUBPROTOCOL: &str = "tern";

/// A resume token offered as the subprotocol `resume.TOKEN` (kept out of URLs and proxy
/// logs), else the old `?resume=TOKEN` form. Either way the token is single-use.
fn resume_token(headers: &HeaderMap, q: &HashMap<String, String>) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("resume."))
        .map(str::to_owned)
        .or_else(|| q.get("resume").cloned())
}

/// `GET /ws[?resume=TOKEN]` (or subprotocols `tern, resume.TOKEN`): native signaling.
async fn ws_native(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: Upgrade,
) -> Response {
    if st.draining() {
        return draining_refusal();
    }
    let ip = client_ip(peer.ip(), &headers, &st.cfg.api.trusted_proxies);
    let lan = lan_key(ip, st.cfg.signal.lan_ipv6_prefix_len);
    let resume = resume_token(&headers, &q);
    let hub = Arc::clone(&st.rooms);
    let (resp, socket) = ws.accept(Some(NATIVE_SUBPROTOCOL));
    hub.spawn(
        socket,
        ws_limit(&st.cfg.signal, Face::Native),
        move |core, conn, now| core.connect(conn, lan, resume.as_deref(), now),
    );
    resp
}

/// `GET /relay?ticket=T`: one side of a relay session.
async fn relay(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(hub) = st.relay.clone() else {
        return json_error(StatusCode::NOT_FOUND, "the WebSocket relay is disabled");
    };
    let Some(ticket) = q.get("ticket") else {
        return json_error(StatusCode::BAD_REQUEST, "missing ticket parameter");
    };
    let side = match hub.claim(ticket, Instant::now()) {
        Ok(s) => s,
        Err(e) => return json_error(StatusCode::FORBIDDEN, &e.to_string()),
    };
    let max = hub.config().max_frame_bytes;
    // Buffers are counted in the relay's memory bound: 64 KiB each way per socket, and
    // at most two frames queued in the codec's write buffer.
    ws.read_buffer_size(64 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(64 * 1024 + 2 * max)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::relay_ws::run_side(hub, side, socket))
}

/// The `peer` server answers every PeerJS route with CORS `origin: true` (echo).
fn peerjs_cors(headers: &HeaderMap, mut r: Response) -> Response {
    if let Some(o) = headers.get(header::ORIGIN) {
        cors::allow(r.headers_mut(), o);
    }
    r
}

/// `OPTIONS` on a PeerJS route: 204 with the headers `peer` sends.
async fn peerjs_preflight(headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors::peerjs_preflight(&headers, r.headers_mut());
    r
}

async fn peerjs_info(headers: HeaderMap) -> Response {
    let r = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        INFO_JSON,
    )
        .into_response();
    peerjs_cors(&headers, r)
}

/// `GET {path}/{key}/id`: a fresh id, as text/html like the `peer` server.
async fn peerjs_id(
    State(st): State<Arc<AppState>>,
    Path(_key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = st.peerjs.with_core(|c| c.fresh_id());
    let r = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        id,
    )
        .into_response();
    peerjs_cors(&headers, r)
}

/// `GET {path}/{key}/peers`: connected ids when discovery is on, else 401.
async fn peerjs_peers(
    State(st): State<Arc<AppState>>,
    Path(_key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = if st.cfg.signal.peerjs_allow_discovery {
        Json(st.peerjs.with_core(|c| c.ids())).into_response()
    } else {
        (StatusCode::UNAUTHORIZED, "Unauthorized").into_response()
    };
    peerjs_cors(&headers, r)
}

/// `GET {path}/peerjs?key=&id=&token=&version=`: the PeerJS signaling socket.
async fn peerjs_ws(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    ws: Upgrade,
) -> Response {
    if st.draining() {
        return draining_refusal();
    }
    let hub = Arc::clone(&st.peerjs);
    let (resp, socket) = ws.accept(None);
    hub.spawn(
        socket,
        ws_limit(&st.cfg.signal, Face::PeerJs),
        move |core, conn, now| {
            core.connect(
                conn,
                q.get("key").map(String::as_str),
                q.get("id").map(String::as_str),
                q.get("token").map(String::as_str),
                now,
            )
        },
    );
    resp
}
