//! A real browser relays through Tern (issue 2, "A real browser"): headless Debian Chromium,
//! driven by `tests/browser/turn_relay.mjs`, opens two relay-only RTCPeerConnections with the
//! real `tern` binary as the only ICE server, over UDP and over TCP, moves 20 MiB over a data
//! channel with a SHA-256 check, and getStats must show a relay/relay pair with the expected
//! relayProtocol. Credentials minted for another secret must yield no relay candidate.
//!
//! Needs /usr/bin/chromium, node and `tests/browser/node_modules` (`npm ci` there). When they
//! are missing the tests fail if `CI` is set and are skipped loudly otherwise.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Tern, TernOpts};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why the browser test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let chromium = std::env::var("TERN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} not found (apt-get install chromium)"));
    }
    if Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        return Some("node not found (apt-get install nodejs npm)".into());
    }
    let pw = manifest_dir().join("tests/browser/node_modules/playwright-core");
    if !pw.exists() {
        return Some(format!(
            "{} not found (run `npm ci` in tests/browser)",
            pw.display()
        ));
    }
    None
}

/// `true` when the test may run; panics under CI when a prerequisite is missing.
fn browser_available(test: &str) -> bool {
    match missing_prerequisite() {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: cannot run the browser test under CI: {why}")
        }
        Some(why) => {
            eprintln!("\n!!!!!!!! SKIPPING {test}: {why} !!!!!!!!\n");
            false
        }
    }
}

/// Runs `node tests/browser/turn_relay.mjs` and returns its JSON result line.
/// The secret goes through the environment, not the command line (visible to other users).
fn run_page(port: u16, transport: &str, secret: &str) -> serde_json::Value {
    run_page_with(port, transport, secret, &[])
}

fn run_page_with(port: u16, transport: &str, secret: &str, extra: &[&str]) -> serde_json::Value {
    let mut child = Command::new("node")
        .current_dir(manifest_dir())
        .arg("tests/browser/turn_relay.mjs")
        .args(["--port", &port.to_string(), "--transport", transport])
        .args(extra)
        .args(["--timeout", "240"])
        .env("TERN_TEST_SECRET", secret)
        .env_remove("TERN_TEST_SECRET_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node");
    // The script has its own 240 s limit; this one only guards against a wedged node.
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("turn_relay.mjs ({transport}) did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let line = out.lines().rev().find(|l| l.starts_with('{'));
    let line = line.unwrap_or_else(|| panic!("turn_relay.mjs printed no result: {out:?}"));
    println!("{line}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad result line {line:?}: {e}"))
}

/// Relay ports for these tests (one browser test runs at a time, so they share them; the
/// other test binaries use ranges below this one).
const RELAY_MIN: u16 = 30000;

fn relay_20_mib(transport: &str) {
    let _one = common::browser_lock();
    let tern = Tern::start(TernOpts::new(RELAY_MIN));
    let r = run_page(tern.port, transport, &tern.secret);
    // On failure, common::Tern prints the daemon's log when dropped.
    assert_eq!(r["ok"], true, "browser relay over {transport} failed: {r}");
    assert_eq!(r["bytes"], 20 * 1024 * 1024);
    assert_eq!(r["sha256Match"], true);
    for pair in ["pairA", "pairB"] {
        assert_eq!(r[pair]["local"]["candidateType"], "relay", "{r}");
        assert_eq!(r[pair]["remote"]["candidateType"], "relay", "{r}");
        assert_eq!(r[pair]["local"]["relayProtocol"], transport, "{r}");
    }
}

#[test]
fn chromium_relays_20_mib_through_tern_over_udp() {
    if browser_available("chromium_relays_20_mib_through_tern_over_udp") {
        relay_20_mib("udp");
    }
}

#[test]
fn chromium_relays_20_mib_through_tern_over_tcp() {
    if browser_available("chromium_relays_20_mib_through_tern_over_tcp") {
        relay_20_mib("tcp");
    }
}

#[test]
fn chromium_gets_no_relay_with_credentials_for_another_secret() {
    if !browser_available("chromium_gets_no_relay_with_credentials_for_another_secret") {
        return;
    }
    let _one = common::browser_lock();
    let tern = Tern::start(TernOpts::new(RELAY_MIN));
    let r = run_page(tern.port, "udp", "not-the-servers-secret");
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("no relay candidate"),
        "unexpected failure: {r}"
    );
}

/// A self-signed certificate for 127.0.0.1 in `dir` and the base64 SHA-256 of its SPKI (what
/// `--ignore-certificate-errors-spki-list` takes), from the openssl CLI.
fn self_signed_with_spki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (cert, key) = common::tls::self_signed(dir, "cert", "127.0.0.1");
    let spki = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl base64 -A",
        )
        .arg("sh")
        .arg(&cert)
        .output()
        .expect("openssl spki");
    let spki = String::from_utf8_lossy(&spki.stdout).trim().to_string();
    assert_eq!(spki.len(), 44, "bad SPKI hash {spki:?}");
    (cert, key, spki)
}

/// 20 MiB through `turns:` (RFC 8656 §3.1): on the TLS listener, or with `sniff` on the one
/// TURN port that also carries UDP and plain TCP.
fn relay_20_mib_over_tls(sniff: bool) {
    let _one = common::browser_lock();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, spki) = self_signed_with_spki(certs.path());
    let tls_port = common::free_port();
    let mut opts = TernOpts::new(RELAY_MIN);
    let listen = if sniff {
        "[]".to_string()
    } else {
        format!("[\"127.0.0.1:{tls_port}\"]")
    };
    opts.extra_turn += &format!(
        "sniff_tls = {sniff}\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nlisten = {listen}\n"
    );
    let tern = Tern::start(opts);
    let port = if sniff { tern.port } else { tls_port };
    let r = run_page_with(port, "tls", &tern.secret, &["--spki", &spki]);
    assert_eq!(r["ok"], true, "browser relay over TLS failed: {r}");
    assert_eq!(r["bytes"], 20 * 1024 * 1024);
    assert_eq!(r["sha256Match"], true);
    for pair in ["pairA", "pairB"] {
        assert_eq!(r[pair]["local"]["candidateType"], "relay", "{r}");
        assert_eq!(r[pair]["remote"]["candidateType"], "relay", "{r}");
        assert_eq!(r[pair]["local"]["relayProtocol"], "tls", "{r}");
    }
    assert!(
        tern.log()
            .lines()
            .any(|l| l.contains("allocation created") && l.contains("transport=Tls")),
        "no allocation over TLS in the daemon log"
    );
}

#[test]
fn chromium_relays_20_mib_through_tern_over_tls() {
    if browser_available("chromium_relays_20_mib_through_tern_over_tls") {
        relay_20_mib_over_tls(false);
    }
}

#[test]
fn chromium_relays_20_mib_over_tls_on_the_sniffing_turn_port() {
    if browser_available("chromium_relays_20_mib_over_tls_on_the_sniffing_turn_port") {
        relay_20_mib_over_tls(true);
    }
}
