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
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs until SIGINT or SIGTERM, then stops the listeners and returns.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }
    let mut sup = crate::ops::supervisor::Supervisor::from_env();
    sup.status("starting");
    let turn = crate::net::TurnService::start(&cfg)?;
    for addr in turn.local_addrs() {
        tracing::info!(%addr, "TURN listening (udp+tcp)");
    }
    // READY=1 once the TURN listeners answer; WATCHDOG=1 only while they keep answering.
    sup.watch_turn(turn.local_addrs());
    sup.ready(&crate::ops::supervisor::serving_status(turn.local_addrs()));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        sup.tick();
    }
    tracing::info!("signal received, shutting down");
    sup.stopping("shutting down");
    turn.shutdown();
    Ok(())
}
