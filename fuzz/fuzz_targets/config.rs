//! Arbitrary text through the configuration loader and validator (`Config::load`: TOML
//! file, then `TERN_*` variables, then `--set` flags, then `validate`), and a valid result
//! into the TURN core's view of it (`ServerConfig::from_config`). Errors are expected;
//! a panic is a bug (`tern check-config` and a SIGHUP reload must report, not crash).
//!
//! Input: the TOML file text, optionally followed by NUL-separated extras: `TERN_X__Y=v`
//! becomes an environment variable, anything else a `--set` argument.
//!
//! The loader reads files a config names (`secret_file`, `token_files`, TLS certificate
//! and key): inputs naming device or proc files, or using escapes that could spell one,
//! are skipped (relative paths resolve in `fuzz/`, whose files are small).

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern::config::Config;
use tern::turn::{RelayAddr, ServerConfig, Shared};

/// The file the input is written to (one per process).
fn scratch() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        std::env::temp_dir().join(format!("tern-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["/dev", "/proc", "/sys", "\\u", "\\U", "..", "~"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }
    let mut parts = text.split('\0');
    let file = parts.next().unwrap_or_default();
    let mut env = Vec::new();
    let mut sets = Vec::new();
    for p in parts.take(8) {
        match p.split_once('=') {
            Some((k, v)) if k.starts_with("TERN_") => env.push((k.to_string(), v.to_string())),
            _ => sets.push(p.to_string()),
        }
    }
    let path = scratch();
    std::fs::write(path, file).expect("write scratch config");
    let Ok(cfg) = Config::load(Some(path), env, &sets) else {
        return;
    };
    // What the daemon does next with a valid config (without sockets).
    let relay = vec![RelayAddr {
        local: "192.0.2.10".parse().unwrap(),
        advertised: "198.51.100.10".parse().unwrap(),
    }];
    if let Ok(sc) = ServerConfig::from_config(&cfg, relay) {
        let _ = Shared::new(&sc);
    }
    let _ = cfg.turn.worker_count();
    let _ = cfg.tls.enabled();
});
