//! The HTTP face (axum): ephemeral ICE credentials (`/api/ice`, `/api/turn`), native
//! signaling (`/ws`), the PeerJS-compatible server (`signal.peerjs_path`) and the
//! WebSocket relay (`/relay`), per-user usage for admins (`/api/usage`), and the built-in page (`/`, `/tern.js`), on one listener
//! with its own small tokio runtime.
//!
//! Owns routing, HTTP-level auth (tokens, origins, rate limits), CORS, and the listener's
//! defences against slow and excess clients (header read timeout, connection caps). It must
//! not hold protocol state itself: rooms and PeerJS live in `signal`, relay sessions in
//! `relay_ws`.

mod conn_limit;
mod cors;
pub mod http_metrics;
pub(crate) mod ice;
mod routes;
mod serve;
mod tls_listener;
mod usage;
mod web;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::Config;
use crate::rate::TokenBucket;
use crate::relay_ws::RelayHub;
use crate::signal::driver::{Hub, SendBudget};
use crate::signal::peerjs::PeerJsService;
use crate::signal::rooms::RoomService;

/// Errors starting the HTTP service.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the HTTP runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tls(String),
}

/// Everything the handlers share. A reload builds a new one around the same hubs and
/// buckets and swaps it in whole ([`Live`]); a request keeps the snapshot it started with.
pub(crate) struct AppState {
    pub cfg: Config,
    pub secrets: Vec<String>,
    pub tokens: Vec<String>,
    pub anon_buckets: Arc<Mutex<HashMap<IpAddr, TokenBucket>>>,
    pub rooms: Arc<Hub<RoomService>>,
    pub peerjs: Arc<Hub<PeerJsService>>,
    pub relay: Option<Arc<RelayHub>>,
    /// Per-route request counters (kept across reloads).
    pub http_metrics: Arc<http_metrics::HttpMetrics>,
    /// Connection caps and counters of the listener (kept across reloads).
    pub conn_limits: Arc<conn_limit::ConnLimits>,
    /// Cluster mode's view of the other nodes (`[cluster]`), for `/api/ice` steering.
    pub cluster: Option<Arc<crate::cluster::ClusterView>>,
}

impl AppState {
    /// During a graceful drain new signaling connections are refused (503). The process's
    /// one flag ([`crate::lifecycle::STATE`], which `/readyz` reads too).
    pub fn draining(&self) -> bool {
        crate::lifecycle::STATE.draining()
    }
}

/// The router's state: the current [`AppState`], replaced on reload. Handlers extract
/// `State<Arc<AppState>>`, a snapshot taken per request (one uncontended read lock).
#[derive(Clone)]
pub(crate) struct Live(Arc<RwLock<Arc<AppState>>>);

impl Live {
    pub fn current(&self) -> Arc<AppState> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn replace(&self, st: Arc<AppState>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = st;
    }
}

impl axum::extract::FromRef<Live> for Arc<AppState> {
    fn from_ref(live: &Live) -> Arc<AppState> {
        live.current()
    }
}

/// A snapshot of the HTTP face's counters, for the metrics face.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpStats {
    pub signal_peers: usize,
    pub signal_rooms: usize,
    pub signal: crate::signal::rooms::RoomStats,
    pub peerjs_clients: usize,
    pub peerjs: crate::signal::peerjs::PeerJsStats,
    /// Signaling connections closed for going over the send budget (native, PeerJS).
    pub signal_slow_closed: u64,
    pub peerjs_slow_closed: u64,
    pub relay_sessions_active: usize,
    pub relay_sessions_started: u64,
    pub relay_bytes_forwarded: u64,
    pub relay_frames_forwarded: u64,
    pub relay_oversized_frames: u64,
    pub relay_bad_tickets: u64,
    pub relay_sessions_cancelled: u64,
    /// HTTP connections open now (plain or TLS, WebSockets included).
    pub connections_open: usize,
    pub connections_accepted: u64,
    /// Closed right after accept: `api.max_connections` reached ...
    pub connections_refused_total: u64,
    /// ... or `api.max_connections_per_ip` reached for the client's address.
    pub connections_refused_per_ip: u64,
    /// TLS handshakes failed or not finished within `tls.handshake_timeout_secs`.
    pub tls_handshakes_failed: u64,
    /// Closed for no request head within `api.header_read_timeout_secs`: before the first
    /// request (slow or silent clients) ...
    pub header_timeouts_first: u64,
    /// ... or after answered requests (idle keep-alive connections).
    pub header_timeouts_keep_alive: u64,
    /// Closed because the client stopped reading a response (`api.write_stall_timeout_secs`).
    pub write_stalls: u64,
    /// Answered 431 and closed: a request head over `api.max_header_bytes`.
    pub header_too_large: u64,
}

/// Read access to the HTTP face's counters, for the metrics face (cheap to clone; follows
/// reloads).
#[derive(Clone)]
pub struct HttpStatsSource(Live);

impl HttpStatsSource {
    /// Current counters (locks the signaling state machines briefly).
    pub fn snapshot(&self) -> HttpStats {
        snapshot(&self.0.current())
    }

    /// The per-route request counters the router's middleware updates.
    pub fn http_metrics(&self) -> Arc<http_metrics::HttpMetrics> {
        Arc::clone(&self.0.current().http_metrics)
    }
}

fn snapshot(st: &AppState) -> HttpStats {
    use std::sync::atomic::Ordering::Relaxed;
    let (signal_peers, signal_rooms, signal) = st
        .rooms
        .with_core(|c| (c.live_peers(), c.room_count(), c.stats()));
    let (peerjs_clients, peerjs) = st.peerjs.with_core(|c| (c.client_count(), c.stats()));
    let mut s = HttpStats {
        signal_peers,
        signal_rooms,
        signal,
        peerjs_clients,
        peerjs,
        signal_slow_closed: st.rooms.dropped_slow(),
        peerjs_slow_closed: st.peerjs.dropped_slow(),
        ..HttpStats::default()
    };
    let c = &st.conn_limits.stats;
    s.connections_open = st.conn_limits.open();
    s.connections_accepted = c.accepted.load(Relaxed);
    s.connections_refused_total = c.refused_total.load(Relaxed);
    s.connections_refused_per_ip = c.refused_per_ip.load(Relaxed);
    s.tls_handshakes_failed = c.tls_handshake_failed.load(Relaxed);
    s.header_timeouts_first = c.header_timeout_first.load(Relaxed);
    s.header_timeouts_keep_alive = c.header_timeout_keep_alive.load(Relaxed);
    s.write_stalls = c.write_stalled.load(Relaxed);
    s.header_too_large = c.header_too_large.load(Relaxed);
    if let Some(r) = &st.relay {
        s.relay_sessions_active = r.active_sessions();
        s.relay_sessions_started = r.stats.sessions_started.load(Relaxed);
        s.relay_bytes_forwarded = r.stats.bytes_forwarded.load(Relaxed);
        s.relay_frames_forwarded = r.stats.frames_forwarded.load(Relaxed);
        s.relay_oversized_frames = r.stats.oversized_frames.load(Relaxed);
        s.relay_bad_tickets = r.stats.bad_tickets.load(Relaxed);
        s.relay_sessions_cancelled = r.stats.sessions_cancelled.load(Relaxed);
    }
    s
}

/// The running HTTP listener.
pub struct HttpService {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
    live: Live,
}

impl HttpService {
    /// Binds `api.listen` and serves on a runtime of `api.workers` threads.
    /// ICE URLs use the port of the first `turn.listen` address.
    pub fn start(cfg: &Config) -> Result<HttpService, ApiError> {
        let tls = if cfg.api.tls {
            crate::tls::TlsContext::from_config(&cfg.tls)
                .map_err(|e| ApiError::Tls(e.to_string()))?
        } else {
            None
        };
        Self::start_tls(cfg, tls)
    }

    /// As [`Self::start`], serving HTTPS with `tls` (the process's shared certificate
    /// store) when given.
    pub fn start_tls(
        cfg: &Config,
        tls: Option<crate::tls::TlsContext>,
    ) -> Result<HttpService, ApiError> {
        let addr = cfg.api.listen;
        let listener = serve::bind(addr, cfg.api.listen_backlog)
            .map_err(|source| ApiError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ApiError::Bind { addr, source })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.api.workers)
            .thread_name("tern-http")
            .enable_all()
            .build()
            .map_err(ApiError::Runtime)?;
        let secrets = cfg.turn_secrets()?;
        let tokens = cfg.api_tokens()?;
        let relay = cfg.relay_ws.enabled.then(|| {
            RelayHub::new(
                cfg.relay_ws.clone(),
                Duration::from_secs(cfg.signal.relay_ticket_ttl_secs.into()),
            )
        });
        let send_budget = SendBudget {
            frames: cfg.signal.send_queue,
            bytes: cfg.signal.send_queue_bytes,
        };
        let rooms = Hub::new(
            RoomService::new(cfg.signal.clone(), relay.is_some(), StdRng::from_os_rng()),
            send_budget,
            relay.clone(),
            cfg.signal.relay_ticket_ttl_secs,
        );
        let peerjs = Hub::new(
            PeerJsService::new(cfg.signal.clone(), StdRng::from_os_rng()),
            send_budget,
            None,
            0,
        );
        let state = Arc::new(AppState {
            cfg: cfg.clone(),
            secrets,
            tokens,
            anon_buckets: Arc::new(Mutex::new(HashMap::new())),
            rooms,
            peerjs,
            relay,
            http_metrics: http_metrics::HttpMetrics::new(),
            conn_limits: conn_limit::ConnLimits::new(
                cfg.api.max_connections,
                cfg.api.max_connections_per_ip,
            ),
            cluster: None,
        });
        let live = Live(Arc::new(RwLock::new(Arc::clone(&state))));
        let app = routes::router(live.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serve_state = Arc::clone(&state);
        let serve_live = live.clone();
        rt.spawn(async move {
            serve_state.rooms.spawn_ticker();
            serve_state.peerjs.spawn_ticker();
            if let Some(relay) = serve_state.relay.clone() {
                tokio::spawn(async move {
                    let mut iv = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        iv.tick().await;
                        relay.sweep(std::time::Instant::now());
                    }
                });
            }
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "HTTP listener");
                    return;
                }
            };
            let stopped = async {
                let _ = stop_rx.await;
            };
            serve::Server {
                app,
                live: serve_live,
                limits: Arc::clone(&serve_state.conn_limits),
                tls: tls.map(|t| {
                    tls_listener::Handshaker::new(Arc::clone(&t.server_config), t.handshake_timeout)
                }),
            }
            .run(listener, stopped)
            .await;
        });
        Ok(HttpService {
            addr: local,
            stop: Some(stop_tx),
            rt: Some(rt),
            live,
        })
    }

    /// Applies a reloaded configuration (SIGHUP): credentials API settings, secrets and
    /// tokens (files re-read), signaling limits, the connection caps, the header read
    /// timeout and `api.max_header_bytes` take effect for new requests, messages and
    /// connections; open WebSocket sessions stay. The listener (`api.listen_backlog` too),
    /// the routes (`peerjs_enabled`,
    /// `peerjs_path`) and `[relay_ws]` need a restart (the caller reports those).
    pub fn reload(&self, cfg: &Config) -> Result<(), ApiError> {
        let old = self.live.current();
        self.swap_state(cfg, old.cluster.clone())
    }

    /// Cluster mode: `/api/ice` and `/api/turn` consult `view` from now on.
    pub fn set_cluster(&self, view: Arc<crate::cluster::ClusterView>) -> Result<(), ApiError> {
        let cfg = self.live.current().cfg.clone();
        self.swap_state(&cfg, Some(view))
    }

    fn swap_state(
        &self,
        cfg: &Config,
        cluster: Option<Arc<crate::cluster::ClusterView>>,
    ) -> Result<(), ApiError> {
        let old = self.live.current();
        let secrets = cfg.turn_secrets()?;
        let tokens = cfg.api_tokens()?;
        old.rooms.with_core(|c| c.set_config(cfg.signal.clone()));
        old.peerjs.with_core(|c| c.set_config(cfg.signal.clone()));
        self.live.replace(Arc::new(AppState {
            cfg: cfg.clone(),
            secrets,
            tokens,
            anon_buckets: Arc::clone(&old.anon_buckets),
            rooms: Arc::clone(&old.rooms),
            peerjs: Arc::clone(&old.peerjs),
            relay: old.relay.clone(),
            http_metrics: Arc::clone(&old.http_metrics),
            conn_limits: Arc::clone(&old.conn_limits),
            cluster,
        }));
        old.conn_limits
            .set_limits(cfg.api.max_connections, cfg.api.max_connections_per_ip);
        Ok(())
    }

    /// The native room service's hub (cluster mode feeds it bus events).
    pub fn rooms_hub(&self) -> Arc<Hub<RoomService>> {
        Arc::clone(&self.live.current().rooms)
    }

    /// The PeerJS realm's hub (cluster mode feeds it bus events).
    pub fn peerjs_hub(&self) -> Arc<Hub<PeerJsService>> {
        Arc::clone(&self.live.current().peerjs)
    }

    /// `/relay` sessions open (paired or waiting), for the drain's end.
    pub fn relay_sessions(&self) -> usize {
        self.live
            .current()
            .relay
            .as_ref()
            .map_or(0, |r| r.active_sessions())
    }

    /// The bound address (with the real port when port 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current counters.
    pub fn stats(&self) -> HttpStats {
        snapshot(&self.live.current())
    }

    /// A handle that reads the counters, for the metrics face.
    pub fn stats_source(&self) -> HttpStatsSource {
        HttpStatsSource(self.live.clone())
    }

    /// Stops accepting, closes open connections after a short grace, joins the runtime.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            // Blocking on shutdown is not allowed inside another runtime (an embedding
            // async caller): then let the threads wind down in the background.
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for HttpService {
    fn drop(&mut self) {
        self.stop_now();
    }
}
