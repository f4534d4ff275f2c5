//! The HTTP listener: its socket (a listen backlog sized for reconnect bursts) and the
//! accept loop, which admits each connection under the caps ([`ConnLimits`]), completes TLS
//! when on, and serves HTTP/1.1 with hyper under a header read timeout
//! (`api.header_read_timeout_secs`) and a cap on the request head (`api.max_header_bytes`,
//! which also bounds the connection's read buffer: hyper's default lets each connection
//! buffer ~400 KB before any authentication).
//!
//! hyper starts that timer whenever it waits for a request head: on a new connection and
//! again after each response, so it bounds a slowloris client (a header byte every few
//! seconds) and an idle keep-alive connection alike. A client that stops reading a response
//! is cut after `api.write_stall_timeout_secs` without progress. An upgraded WebSocket
//! leaves hyper, and both timers with it; its socket keeps the connection's [`ConnGuard`]
//! until it closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
use tokio::time::Sleep;

use socket2::{Domain, Protocol, Socket, Type};

use super::conn_limit::{ConnGuard, ConnLimits};
use super::tls_listener::Handshaker;
use super::Live;

/// The listen(2) backlog asked when `api.listen_backlog` is 0 and somaxconn is lower (the
/// kernel caps it there anyway; asking more takes effect once an operator raises the sysctl).
const MIN_DEFAULT_BACKLOG: u32 = 4096;

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), when readable.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds the HTTP listener (non-blocking) with a listen backlog of `configured`, or with 0
/// the system's maximum (at least [`MIN_DEFAULT_BACKLOG`] asked). std's
/// `TcpListener::bind` asks 128: a burst of connects (every client reconnecting after a
/// restart) overflows that queue, the kernel drops SYNs and the clients retry a second
/// later. Warns when the kernel caps the backlog below what was asked.
pub(super) fn bind(addr: SocketAddr, configured: u32) -> io::Result<std::net::TcpListener> {
    let max = somaxconn();
    let asked = match configured {
        0 => max.unwrap_or(0).max(MIN_DEFAULT_BACKLOG),
        n => n,
    };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restart binds again at once despite connections in TIME_WAIT.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(i32::try_from(asked).unwrap_or(i32::MAX))?;
    match max {
        Some(m) if m < asked => tracing::warn!(
            asked,
            somaxconn = m,
            "the kernel caps the HTTP listen backlog at net.core.somaxconn: a burst of connecting clients may see SYNs dropped and retried (raise the sysctl)"
        ),
        _ => tracing::debug!(backlog = asked, "HTTP listen backlog"),
    }
    Ok(s.into())
}

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
    pub async fn run(self, listener: TcpListener, stop: impl Future<Output = ()>) {
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
            let current = self.live.current();
            let api = &current.cfg.api;
            let state = Arc::new(ConnState::default());
            let conn = Conn {
                app: self.app.clone(),
                peer,
                header_timeout: Duration::from_secs(api.header_read_timeout_secs.into()),
                max_header_bytes: api.max_header_bytes,
                closing: closing_rx.clone(),
                limits: Arc::clone(&self.limits),
                http_metrics: Arc::clone(&current.http_metrics),
                state: Arc::clone(&state),
            };
            let io = Counted {
                inner: sock,
                _guard: guard,
                state,
                stall_limit: Duration::from_secs(api.write_stall_timeout_secs.into()),
                stall: None,
                stall_armed: false,
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
    /// `api.max_header_bytes` (validated: at least hyper's 8 KiB minimum buffer).
    max_header_bytes: usize,
    closing: watch::Receiver<()>,
    limits: Arc<ConnLimits>,
    /// Where a request refused before routing (431) is counted.
    http_metrics: Arc<super::http_metrics::HttpMetrics>,
    state: Arc<ConnState>,
}

/// What the connection's task and its socket share.
#[derive(Default)]
struct ConnState {
    /// Requests received (to tell a slow first request from an idle keep-alive).
    requests: AtomicU64,
    /// hyper is done with the socket: closed, or handed to an upgraded WebSocket.
    http_done: AtomicBool,
    /// The socket gave up on a client that stopped reading.
    write_stalled: AtomicBool,
}

impl Conn {
    async fn serve<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = WithPeer {
            app: self.app,
            peer: self.peer,
            state: Arc::clone(&self.state),
        };
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            // Past the cap hyper answers 431 and closes; the buffer never grows beyond it.
            .max_header_size(self.max_header_bytes)
            .max_buf_size(self.max_header_bytes.max(8192));
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
        self.state.http_done.store(true, Relaxed);
        let Err(e) = done else { return };
        let stats = &self.limits.stats;
        if e.is_parse_too_large() {
            stats.header_too_large.fetch_add(1, Relaxed);
            self.http_metrics.refused_unparsed(431);
            tracing::debug!(peer = %self.peer, "HTTP request head too large (431)");
        } else if self.state.write_stalled.load(Relaxed) {
            stats.write_stalled.fetch_add(1, Relaxed);
            tracing::debug!(peer = %self.peer, "HTTP client stopped reading its response");
        } else if e.is_timeout() {
            if self.state.requests.load(Relaxed) == 0 {
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
    state: Arc<ConnState>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        self.state.requests.fetch_add(1, Relaxed);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        // Router is always ready (its Service::poll_ready returns Ready).
        let mut app = self.app.clone();
        tower_service::Service::call(&mut app, req)
    }
}

/// A socket holding its place under the connection caps until it is dropped, and giving
/// up on a client that accepts no byte of a response for `stall_limit` while hyper serves
/// it (an upgraded WebSocket is not cut: its backpressure rules are its own).
struct Counted<S> {
    inner: S,
    _guard: ConnGuard,
    state: Arc<ConnState>,
    stall_limit: Duration,
    /// The deadline of a blocked write; allocated on the first blocked write only.
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` runs (a write is blocked since it was set).
    stall_armed: bool,
}

impl<S> Counted<S> {
    /// Called with the outcome of a write: `Pending` for too long becomes an error.
    fn check_stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() || self.state.http_done.load(Relaxed) {
            self.stall_armed = false;
            return r;
        }
        let deadline = tokio::time::Instant::now() + self.stall_limit;
        let sleep = match (&mut self.stall, self.stall_armed) {
            (Some(s), true) => s,
            (Some(s), false) => {
                s.as_mut().reset(deadline);
                s
            }
            (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stall_armed = true;
        if sleep.as_mut().poll(cx).is_ready() {
            self.state.write_stalled.store(true, Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client read nothing of the response in time",
            )));
        }
        Poll::Pending
    }
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
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check_stall(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check_stall(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check_stall(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn counted(
        inner: tokio::io::DuplexStream,
        stall_limit: Duration,
    ) -> (Counted<tokio::io::DuplexStream>, Arc<ConnState>) {
        let limits = ConnLimits::new(10, 10);
        let state = Arc::new(ConnState::default());
        let c = Counted {
            inner,
            _guard: limits.admit("192.0.2.1".parse().unwrap()).unwrap(),
            state: Arc::clone(&state),
            stall_limit,
            stall: None,
            stall_armed: false,
        };
        (c, state)
    }

    /// Writes until the peer's buffer is full, then once more: the blocked write's outcome.
    async fn blocked_write(c: &mut Counted<tokio::io::DuplexStream>) -> Option<io::Result<()>> {
        let chunk = [0u8; 256];
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_secs(2), c.write_all(&chunk)).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
        panic!("the duplex buffer never filled");
    }

    #[tokio::test]
    async fn a_stalled_write_fails_while_hyper_serves() {
        let (a, _b) = tokio::io::duplex(1024);
        let (mut c, state) = counted(a, Duration::from_millis(50));
        let e = blocked_write(&mut c)
            .await
            .expect("the stall ended the write");
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(state.write_stalled.load(Relaxed));
    }

    #[tokio::test]
    async fn an_upgraded_socket_may_stall() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut c, state) = counted(a, Duration::from_millis(50));
        state.http_done.store(true, Relaxed);
        assert!(blocked_write(&mut c).await.is_none(), "the write was cut");
        assert!(!state.write_stalled.load(Relaxed));
        // Once the peer reads, writing goes on.
        let mut buf = [0u8; 4096];
        let _ = tokio::io::AsyncReadExt::read(&mut b, &mut buf)
            .await
            .unwrap();
        c.write_all(&[1u8; 16]).await.unwrap();
    }
}
