//! The HTTP listener's accept loop: admits each connection under the caps
//! ([`ConnLimits`]), completes TLS when on, and serves HTTP/1.1 with hyper under a header
//! read timeout (`api.header_read_timeout_secs`).
//!
//! hyper starts that timer whenever it waits for a request head: on a new connection and
//! again after each response, so it bounds a slowloris client (a header byte every few
//! seconds) and an idle keep-alive connection alike. An upgraded WebSocket leaves hyper,
//! and the timer with it; its socket keeps the connection's [`ConnGuard`] until it closes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::conn_limit::{ConnGuard, ConnLimits};
use super::tls_listener::Handshaker;
use super::Live;

/// What the accept loop serves with.
pub(super) struct Server {
    pub app: Router,
    /// The current config (`api.header_read_timeout_secs` is read per connection).
    pub live: Live,
    pub limits: Arc<ConnLimits>,
    /// `Some` for HTTPS.
    pub tls: Option<Handshaker>,
}

impl Server {
    /// Accepts until `stop` resolves; then open connections finish the request in flight
    /// and close (idle ones at once).
    pub async fn run(self, listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
        // Never sent on: dropping it tells every connection to shut down gracefully.
        let (closing_tx, closing_rx) = watch::channel(());
        tokio::pin!(stop);
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::debug!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Past a cap the socket is closed here (counted and logged by `admit`), and the
            // loop goes on serving the connections it holds.
            let Ok(guard) = self.limits.admit(peer.ip()) else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            let conn = Conn {
                app: self.app.clone(),
                peer,
                header_timeout: Duration::from_secs(
                    self.live.current().cfg.api.header_read_timeout_secs.into(),
                ),
                closing: closing_rx.clone(),
                limits: Arc::clone(&self.limits),
            };
            let io = Counted {
                inner: sock,
                _guard: guard,
            };
            match &self.tls {
                None => {
                    tokio::spawn(conn.serve(io));
                }
                Some(tls) => {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        if let Some(s) = tls.accept(io, peer, &conn.limits.stats).await {
                            conn.serve(s).await;
                        }
                    });
                }
            }
        }
        drop(closing_tx);
    }
}

/// One admitted connection.
struct Conn {
    app: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    closing: watch::Receiver<()>,
    limits: Arc<ConnLimits>,
}

impl Conn {
    async fn serve<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let requests = Arc::new(AtomicU64::new(0));
        let svc = WithPeer {
            app: self.app,
            peer: self.peer,
            requests: Arc::clone(&requests),
        };
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        let mut closing = self.closing;
        let done = tokio::select! {
            r = conn.as_mut() => r,
            _ = closing.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        let Err(e) = done else { return };
        let stats = &self.limits.stats;
        if e.is_timeout() {
            if requests.load(Relaxed) == 0 {
                stats.header_timeout_first.fetch_add(1, Relaxed);
                tracing::debug!(peer = %self.peer, "HTTP request head not received in time");
            } else {
                stats.header_timeout_keep_alive.fetch_add(1, Relaxed);
            }
        } else {
            tracing::debug!(peer = %self.peer, error = %e, "HTTP connection ended");
        }
    }
}

/// The router as a hyper service, with the client's address for `ConnectInfo`.
struct WithPeer {
    app: Router,
    peer: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        self.requests.fetch_add(1, Relaxed);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        // Router is always ready (its Service::poll_ready returns Ready).
        let mut app = self.app.clone();
        tower_service::Service::call(&mut app, req)
    }
}

/// A socket holding its place under the connection caps until it is dropped.
struct Counted<S> {
    inner: S,
    _guard: ConnGuard,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
