//! IO drivers around the sans-IO TURN core: UDP workers, TCP framing, relay port pool.

use std::net::SocketAddr;

use crate::config::Config;

/// Errors starting the network service.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The running TURN listeners and workers.
pub struct TurnService {
    addrs: Vec<SocketAddr>,
}

impl TurnService {
    /// Binds every listener and starts the workers.
    pub fn start(_cfg: &Config) -> Result<TurnService, NetError> {
        Err(NetError::Other("TURN service not built yet".into()))
    }

    /// The bound listener addresses (with real ports when port 0 was configured).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops the workers and joins them.
    pub fn shutdown(self) {}
}
