//! The built-in page and /tern.js: served from the binary (status, types, headers), and
//! driven end to end in headless Chromium against the real daemon:
//! - tests/browser/web_page.mjs: two pages, LAN room, 50 MiB + a small file + text, forced
//!   TURN and WebSocket-relay paths checked against the metrics, the share-link room, the
//!   sender closed mid-transfer;
//! - tests/browser/web_group.mjs: three pages in one room by link: chat to everyone with
//!   delivery marks, two files to everyone, the same file picked again mid-send, markup
//!   shown as text, the creator's reload;
//! - tests/browser/web_big.mjs: tern.js's SHA-256 against WebCrypto, 1 GiB direct with the
//!   receiving renderer's memory bounded, cancels from both sides leaving nothing stored;
//! - tests/browser/web_steps.mjs: ICE made to fail, each step named before the relay;
//! - tests/browser/web_save.mjs: a browser without OPFS writable streams: received files
//!   stream into its downloads through the Service Worker, hash checked; a cancel fails it;
//!   a sender without BYOB readers, a receiver without workers, a corrupted chunk and a
//!   piece frame cut short each end as they should.
//!
//! Screenshots land in the test's output dir.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Tern, TernOpts};

const RELAY_MIN: u16 = 29200;

/// Whether the browser tooling is here; in CI its absence is a failure, not a skip.
fn tooling_present() -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = root
        .join("tests/browser/node_modules/playwright-core")
        .exists()
        && Path::new("/usr/bin/chromium").exists()
        && Command::new("node").arg("--version").output().is_ok();
    if !ok && std::env::var_os("CI").is_some() {
        panic!("browser test tooling missing in CI (run `npm ci` in tests/browser)");
    }
    if !ok {
        eprintln!("\n!!! SKIPPING the web page browser test: chromium, node or playwright-core missing.\n");
    }
    ok
}

fn start() -> Tern {
    let mut opts = TernOpts::new(RELAY_MIN);
    opts.api = Some(String::new());
    opts.metrics = true;
    Tern::start(opts)
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase(),
        raw[split + 4..].to_vec(),
    )
}

#[test]
fn page_and_library_are_served_from_the_binary() {
    let tern = start();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (path, file, ctype) in [
        ("/", "web/index.html", "text/html"),
        ("/tern.js", "web/tern.js", "text/javascript"),
        ("/tern-sw.js", "web/tern-sw.js", "text/javascript"),
        ("/app.js", "web/app.js", "text/javascript"),
        ("/style.css", "web/style.css", "text/css"),
    ] {
        let (head, body) = http_get(tern.api_addr(), path);
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {ctype}")),
            "{path}: {head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(
            head.contains("content-security-policy: default-src 'self'"),
            "{head}"
        );
        assert_eq!(body, std::fs::read(root.join(file)).unwrap(), "{path} body");
    }
    let (head, _) = http_get(tern.api_addr(), "/nope.js");
    assert!(head.starts_with("http/1.1 404"), "{head}");
    tern.terminate();
}

/// Runs `tests/browser/<script>` against `tern` with `--url`, `--out` (a fresh dir named
/// after the script) and `args`; fails the test with its output unless it prints PASS.
/// Returns the output dir (screenshots stay there).
fn run_script(tern: &Tern, script: &str, args: &[String]) -> std::path::PathBuf {
    let stem = script.trim_end_matches(".mjs");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(stem);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    let res = Command::new("node")
        .arg(&path)
        .arg("--url")
        .arg(format!("http://{}", tern.api_addr()))
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success() && stdout.contains("PASS"),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\ntern log:\n{}",
        res.status,
        &stderr[stderr.len().saturating_sub(20_000)..],
        tern.log()
    );
    eprintln!("{script}: {}", stdout.trim());
    let _ = std::fs::remove_dir_all(out.join("in"));
    out
}

fn assert_shot(out: &Path, shot: &str) {
    let len = std::fs::metadata(out.join(shot)).map_or(0, |m| m.len());
    assert!(len > 1000, "{shot} missing or empty");
}

#[test]
fn two_browsers_send_files_and_text_on_every_path() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    let metrics = format!("http://127.0.0.1:{}", tern.metrics_port);
    let out = run_script(&tern, "web_page.mjs", &["--metrics".into(), metrics]);
    assert_shot(&out, "web-desktop.png");
    assert_shot(&out, "web-phone.png");
    tern.terminate();
}

#[test]
fn three_pages_in_one_room_chat_send_to_everyone_and_rejoin_after_reload() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    let out = run_script(&tern, "web_group.mjs", &[]);
    assert_shot(&out, "web-three-peers.png");
    tern.terminate();
}

/// Each tab's renderer resident memory bound for the big transfer (MiB; web_big.mjs holds the
/// receiving and the sending renderer to it): an idle page's renderer is ~160 MiB here; the
/// receiver holds at most the sender's 16 MiB window plus 1 MiB pieces (in its piece worker,
/// a thread of the same renderer), the sender two 1 MiB pieces and its 4 MiB send queue,
/// never the file.
const BIG_BOUND_MIB: u32 = 320;

#[test]
fn one_gib_direct_with_bounded_receiver_memory_and_cancels_leave_nothing_stored() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    // TERN_WEB_BIG_BYTES shrinks the file on a slow machine (the test still checks all).
    let bytes = std::env::var("TERN_WEB_BIG_BYTES").unwrap_or_else(|_| (1u64 << 30).to_string());
    let out = run_script(
        &tern,
        "web_big.mjs",
        &[
            "--bytes".into(),
            bytes,
            "--bound-mib".into(),
            BIG_BOUND_MIB.to_string(),
        ],
    );
    assert_shot(&out, "web-large-transfer.png");
    tern.terminate();
}

#[test]
fn ice_failure_names_each_step_before_the_relay_carries_the_file() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    run_script(&tern, "web_steps.mjs", &[]);
    tern.terminate();
}

#[test]
fn without_opfs_writable_streams_files_stream_to_downloads_through_the_service_worker() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    run_script(&tern, "web_save.mjs", &[]);
    tern.terminate();
}
