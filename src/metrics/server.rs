//! The metrics listener (`[metrics] listen`, default 127.0.0.1:9641): `/metrics` for
//! Prometheus, `/healthz` (the process answers) and `/readyz` (listeners bound and not
//! draining) for load balancers and systemd checks. One thread, its own small runtime, so
//! a scrape never waits behind the API's load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::Metrics;
use crate::lifecycle::{Lifecycle, STATE};

/// Errors starting the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("bind metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// Prometheus text exposition format 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Shared {
    metrics: Metrics,
}

/// The running metrics listener.
pub struct MetricsService {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsService {
    /// Binds `listen` and serves until [`MetricsService::shutdown`].
    pub fn start(listen: SocketAddr, metrics: Metrics) -> Result<MetricsService, MetricsError> {
        let bind = |source| MetricsError::Bind {
            addr: listen,
            source,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(MetricsError::Thread)?;
        let app = Router::new()
            .route("/metrics", get(scrape))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Arc::new(Shared { metrics }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tern-metrics".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "metrics listener");
                            return;
                        }
                    };
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "metrics listener stopped");
                    }
                });
                // Open scrape connections get a moment, never a hang at exit.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(MetricsError::Thread)?;
        Ok(MetricsService {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when port 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the listener and joins its thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the metrics thread panicked");
            }
        }
    }
}

impl Drop for MetricsService {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn scrape(State(s): State<Arc<Shared>>) -> Response {
    match s.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response()
        }
    }
}

async fn healthz() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "ok\n",
    )
        .into_response()
}

/// `/readyz`'s answer for a lifecycle state: 200 only while serving and not draining.
pub fn readiness(state: &Lifecycle) -> (StatusCode, &'static str) {
    if state.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if state.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn readyz() -> Response {
    let (code, body) = readiness(&STATE);
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}
