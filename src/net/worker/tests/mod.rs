//! The workers driven with the real TURN core (`turn::Server`), as a client and a peer see
//! them: `udp.rs` control answers, ChannelData both ways over UDP and TCP, TCP framing,
//! garbage, idle timeout, the per-IP limit and bandwidth caps; `tcp_relay.rs` RFC 6062 peer
//! connects and accepts, ConnectionBind, splicing with backpressure, half-close, and the
//! handover of a data connection to the worker owning its CONNECTION-ID. `client.rs` is the
//! TURN client both use (and `tests/net_hot_path.rs`).

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::net::{NetStats, TurnService};

mod client;
mod tcp_relay;
mod udp;

/// Starts the TURN service of `cfg` (see [`client::config`]).
fn start(cfg: &Config) -> TurnService {
    TurnService::start(cfg).unwrap()
}

/// The workers' counters once `ok` holds for them (or after 10 s, for the caller's
/// assertions to report).
fn wait_stats(s: &TurnService, ok: impl Fn(&NetStats) -> bool) -> NetStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = s.stats();
        if ok(&st) || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (up to 20 s) until `ok` holds.
fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
