//! `tern serve`: starts every face on the shared config and waits for SIGINT/SIGTERM.
//! Owns process-level wiring only; protocol logic lives in the faces' modules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;

/// Errors that stop the daemon at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs until SIGINT or SIGTERM, then stops the listeners and returns.
pub fn run(mut cfg: Config) -> Result<(), DaemonError> {
    if cfg.add_ephemeral_secret_if_none()? {
        tracing::warn!(
            "no turn.auth_secrets, turn.secret_file or turn.users configured: using a random \
             secret for this run only (the built-in page and /api/ice work; a backend minting its \
             own credentials needs turn.secret_file)"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }
    let mut sup = crate::ops::supervisor::Supervisor::from_env();
    sup.status("starting");
    let failed = |e: &dyn std::fmt::Display| format!("failed to start: {e}");
    // One certificate store for TURN over TLS and HTTPS: one reload swaps both.
    let tls =
        crate::tls::TlsContext::from_config(&cfg.tls).inspect_err(|e| sup.status(&failed(e)))?;
    let turn = crate::net::TurnService::start_tls(&cfg, tls.clone())
        .inspect_err(|e| sup.status(&failed(e)))?;
    for addr in turn.local_addrs() {
        tracing::info!(%addr, sniff_tls = cfg.turn.sniff_tls && tls.is_some(), "TURN listening (udp+tcp)");
    }
    for addr in turn.local_tls_addrs() {
        tracing::info!(%addr, "TURN listening (tls)");
    }
    let http = if cfg.api.enabled {
        // ICE URLs carry the TURN port actually bound (it may have been configured as 0).
        let mut api_cfg = cfg.clone();
        if !turn.local_addrs().is_empty() {
            api_cfg.turn.listen = turn.local_addrs().to_vec();
        }
        api_cfg.tls.listen = turn.local_tls_addrs().to_vec();
        let http =
            crate::api::HttpService::start_tls(&api_cfg, tls.clone().filter(|_| cfg.api.tls))
                .inspect_err(|e| sup.status(&failed(e)))?;
        tracing::info!(addr = %http.local_addr(), "HTTP API and signaling listening");
        Some(http)
    } else {
        None
    };
    // READY=1 once every listener is bound and TURN answers; WATCHDOG=1 only while it does.
    sup.watch_turn(turn.local_addrs());
    sup.ready(&crate::ops::supervisor::serving_status(turn.local_addrs()));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        sup.tick();
    }
    tracing::info!("signal received, shutting down");
    sup.stopping("shutting down");
    if let Some(http) = http {
        http.shutdown();
    }
    turn.shutdown();
    Ok(())
}
