//! The built-in page and /tern.js: served from the binary (status, types, headers), and
//! driven end to end in two headless Chromium instances against the real daemon
//! (tests/browser/web_page.mjs: LAN room, 50 MiB + a small file + text, forced TURN and
//! WebSocket-relay paths checked against the metrics, the share-link room, the sender
//! closed mid-transfer). Screenshots land in the test's output dir.

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

#[test]
fn two_browsers_send_files_and_text_on_every_path() {
    if !tooling_present() {
        return;
    }
    let _one = common::browser_lock();
    let tern = start();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web_page");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/web_page.mjs");
    let res = Command::new("node")
        .arg(&script)
        .arg("--url")
        .arg(format!("http://{}", tern.api_addr()))
        .arg("--metrics")
        .arg(format!("http://127.0.0.1:{}", tern.metrics_port))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success() && stdout.contains("PASS"),
        "web_page.mjs failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\ntern log:\n{}",
        res.status,
        &stderr[stderr.len().saturating_sub(20_000)..],
        tern.log()
    );
    eprintln!("{}", stdout.trim());
    for shot in ["web-desktop.png", "web-phone.png"] {
        let len = std::fs::metadata(out.join(shot)).map_or(0, |m| m.len());
        assert!(len > 1000, "{shot} missing or empty");
    }
    let _ = std::fs::remove_dir_all(out.join("in"));
    tern.terminate();
}
