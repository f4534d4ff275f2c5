//! Log setup (`[log]`): `tracing` to stderr, text or JSON, so journald captures it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(cfg: &LogConfig) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // stun-types logs malformed network input at warn; Tern counts it and logs at debug
    // itself, so those lines would only let a remote sender flood the log.
    if !cfg.level.contains("stun_types") {
        if let Ok(d) = "stun_types=error".parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour only for a person at a terminal: journald, log files and pipes would keep the
    // escape sequences raw. NO_COLOR (no-color.org) still turns it off there.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
