//! A real browser relays through Tern (issue 2, "A real browser"): headless Debian Chromium,
//! driven by `tests/browser/turn_relay.mjs`, opens two relay-only RTCPeerConnections with the
//! real `tern` binary as the only ICE server, over UDP and over TCP, moves 20 MiB over a data
//! channel with a SHA-256 check, and getStats must show a relay/relay pair with the expected
//! relayProtocol. Credentials minted for another secret must yield no relay candidate.
//!
//! Needs /usr/bin/chromium, node and `tests/browser/node_modules` (`npm ci` there). When they
//! are missing the tests fail if `CI` is set and are skipped loudly otherwise.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One Chromium at a time: two would fight over the machine's two cores.
static BROWSER: Mutex<()> = Mutex::new(());

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

/// A port free on 127.0.0.1 for both UDP and TCP at the time of the call.
fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// A STUN Binding request (RFC 8489 §5): header only, random transaction id.
fn binding_request() -> [u8; 20] {
    let mut m = [0u8; 20];
    m[1] = 0x01; // type 0x0001 Binding request, length 0
    m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    m[8..].copy_from_slice(&rand::random::<[u8; 12]>());
    m
}

/// The real `tern serve` on loopback, killed (by its PID) when dropped.
struct Tern {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
    _dir: tempfile::TempDir,
}

impl Tern {
    fn start(secret: &str) -> Tern {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        let port = free_port();
        // A random 200-port relay window, so parallel test runs rarely meet.
        let min_port = 20_000 + 200 * rand::random_range(0..50u16);
        let sets = [
            format!("turn.listen=[\"127.0.0.1:{port}\"]"),
            "turn.relay_ip=[\"127.0.0.1\"]".to_string(),
            format!("turn.min_port={min_port}"),
            format!("turn.max_port={}", min_port + 199),
            format!("turn.secret_file=[{:?}]", secret_file.display().to_string()),
            "turn.allowed_peer_ranges=[\"127.0.0.0/8\"]".to_string(),
            "turn.workers=1".to_string(),
            "api.enabled=false".to_string(),
            "metrics.enabled=false".to_string(),
            "log.level=info".to_string(),
        ];
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("serve");
        for s in &sets {
            cmd.arg("--set").arg(s);
        }
        let child = cmd
            .env_remove("TERN_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start tern");
        let mut tern = Tern {
            child,
            port,
            log,
            _dir: dir,
        };
        tern.wait_ready();
        tern
    }

    /// Waits until a STUN Binding over UDP is answered, or fails with the daemon's log.
    fn wait_ready(&mut self) {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tern exited early ({status}); log:\n{}", self.log_text());
            }
            let req = binding_request();
            let _ = sock.send_to(&req, to);
            // A Binding success response (0x0101) echoing our transaction id.
            if let Ok(n) = sock.recv(&mut buf) {
                if n >= 20 && buf[0..2] == [0x01, 0x01] && buf[8..20] == req[8..20] {
                    return;
                }
            }
        }
        panic!(
            "tern did not answer a STUN Binding on 127.0.0.1:{} within 30 s; log:\n{}",
            self.port,
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.log.path()).and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `node tests/browser/turn_relay.mjs` and returns its JSON result line.
fn run_page(port: u16, transport: &str, secret_file: &Path) -> serde_json::Value {
    let mut child = Command::new("node")
        .current_dir(manifest_dir())
        .arg("tests/browser/turn_relay.mjs")
        .args(["--port", &port.to_string(), "--transport", transport])
        .arg("--secret-file")
        .arg(secret_file)
        .args(["--timeout", "240"])
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

fn secret_file_with(dir: &tempfile::TempDir, secret: &str) -> PathBuf {
    let p = dir.path().join("client-secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

fn relay_20_mib(transport: &str) {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let secret = format!("{:032x}", rand::random::<u128>());
    let tern = Tern::start(&secret);
    let dir = tempfile::tempdir().unwrap();
    let r = run_page(tern.port, transport, &secret_file_with(&dir, &secret));
    assert_eq!(
        r["ok"],
        true,
        "browser relay over {transport} failed: {r}\ntern log:\n{}",
        tern.log_text()
    );
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
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let tern = Tern::start(&format!("{:032x}", rand::random::<u128>()));
    let dir = tempfile::tempdir().unwrap();
    let wrong = secret_file_with(&dir, "not-the-servers-secret");
    let r = run_page(tern.port, "udp", &wrong);
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("no relay candidate"),
        "unexpected failure: {r}"
    );
}
