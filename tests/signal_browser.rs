//! Real browsers against the HTTP face: the `peerjs` npm client in headless Chromium
//! (tests/browser/peerjs.mjs: two Peers, a DataConnection, text and a 5 MiB blob with
//! SHA-256, then a 1 MiB signal — an OFFER carrying 1 MiB of metadata — at default
//! settings), and the native protocol (tests/browser/signal.mjs: /api/ice, /ws signaling for
//! an RTCDataChannel, then /relay with 2 MiB and SHA-256).

use crate::signal_common;

use std::path::Path;
use std::process::Command;

/// Whether the browser tooling is here; in CI its absence is a failure, not a skip.
pub fn tooling_present() -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let missing: Vec<&str> = [
        (
            "tests/browser/node_modules/peerjs",
            root.join("tests/browser/node_modules/peerjs").exists(),
        ),
        (
            "tests/browser/node_modules/playwright-core",
            root.join("tests/browser/node_modules/playwright-core")
                .exists(),
        ),
        ("/usr/bin/chromium", Path::new("/usr/bin/chromium").exists()),
        (
            "node",
            Command::new("node").arg("--version").output().is_ok(),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("browser test tooling missing in CI: {missing:?} (run `npm ci` in tests/browser)");
    }
    eprintln!(
        "\n!!! SKIPPING the PeerJS browser test: missing {missing:?}.\n\
         !!! Install chromium and run `npm ci` in tests/browser. (With CI set this fails.)\n"
    );
    false
}

fn run_script(name: &str, api_extra: &str) {
    let _one = crate::common::browser_lock();
    let svc = signal_common::start(api_extra, "");
    let port = svc.local_addr().port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(name);
    let out = Command::new("node")
        .arg(&script)
        .env("TERN_PORT", port.to_string())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "{name} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{}", stdout.trim());
    svc.shutdown();
}

#[test]
fn real_peerjs_client_in_chromium_exchanges_text_5_mib_and_a_1_mib_signal() {
    if tooling_present() {
        run_script("peerjs.mjs", "");
    }
}

#[test]
fn native_signaling_and_relay_in_chromium() {
    if tooling_present() {
        run_script("signal.mjs", "");
    }
}
