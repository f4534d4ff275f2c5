//! HTTPS for the API listener (`api.tls = true`): the TLS handshake of one accepted
//! connection with the shared `[tls]` certificate (tokio-rustls).
//!
//! Handshakes are bounded in number (CPU) and in time (including the wait for a slot), so
//! a client that never finishes one holds neither a worker nor its socket for long.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::conn_limit::ConnStats;

/// Handshakes computed at once; further clients wait (within their handshake timeout).
const MAX_HANDSHAKES: usize = 512;

/// Completes TLS handshakes for the HTTP listener.
#[derive(Clone)]
pub struct Handshaker {
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl Handshaker {
    pub fn new(config: Arc<rustls::ServerConfig>, timeout: Duration) -> Handshaker {
        Handshaker {
            acceptor: TlsAcceptor::from(config),
            slots: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            timeout,
        }
    }

    /// The TLS session over `io`, or `None` (counted, logged at debug) if the client did not
    /// complete a handshake within `tls.handshake_timeout_secs`.
    pub async fn accept<IO>(
        &self,
        io: IO,
        peer: SocketAddr,
        stats: &ConnStats,
    ) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let done = tokio::time::timeout(self.timeout, async {
            let _slot = self.slots.acquire().await;
            self.acceptor.accept(io).await
        })
        .await;
        match done {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
            Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
        }
        stats.tls_handshake_failed.fetch_add(1, Relaxed);
        None
    }
}
