//! TURN over TLS (RFC 8656 §3.1) with the real `tern` binary: coturn's `turnutils_uclient`
//! over TLS with channels and with Send indications, the one-port sniffing listener carrying
//! TCP and TLS, HTTPS on the API listener, and TLS bad input (plain text on the TLS port, a
//! truncated handshake, slowloris clients) dropped within the handshake timeout while others
//! keep being served. The certificate is self-signed, made by the openssl CLI.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A self-signed certificate for "localhost" in `dir`: (cert.pem, cert.key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    common::tls::self_signed(dir, "cert", "localhost")
}

const UCLIENT_LIMIT: Duration = Duration::from_secs(60);
/// The handshake timeout the bad-input tests configure.
const HANDSHAKE_SECS: u64 = 2;

fn have_tools() -> bool {
    have_tool("openssl") && have_tool("turnutils_uclient") && have_tool("turnutils_peer")
}

/// A daemon with a TLS listener on its own port (and `sniff_tls` on the TURN port if asked).
struct TlsTern {
    tern: Tern,
    tls_port: u16,
    certs: tempfile::TempDir,
}

fn start(relay_min: u16, sniff: bool, extra: &str) -> TlsTern {
    start_with(relay_min, sniff, extra, false)
}

fn start_with(relay_min: u16, sniff: bool, extra: &str, metrics: bool) -> TlsTern {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let tls_port = free_port();
    let mut opts = TernOpts::new(relay_min);
    opts.metrics = metrics;
    opts.extra_turn += &format!(
        "sniff_tls = {sniff}\n{extra}\n\
         [tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
         listen = [\"127.0.0.1:{tls_port}\"]\nhandshake_timeout_secs = {HANDSHAKE_SECS}\n"
    );
    TlsTern {
        tern: Tern::start(opts),
        tls_port,
        certs,
    }
}

/// uclient against `port` with REST credentials from the daemon's secret.
fn uclient_port(t: &Tern, port: u16, peer: u16, args: &[&str]) -> UclientReport {
    common::uclient_port(t, port, peer, args, UCLIENT_LIMIT)
}

fn assert_all_echoed(r: &UclientReport, expect_sent: u64) {
    assert!(
        r.sent >= expect_sent && r.received == r.sent && r.lost == Some(0),
        "expected {expect_sent}+ messages echoed with 0 lost, got sent={} received={} lost={:?}\n{}",
        r.sent,
        r.received,
        r.lost,
        r.output
    );
}

fn tls_allocations(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains("transport=Tls"))
        .count()
}

fn tls_case(relay_min: u16, extra_args: &[&str]) {
    if !have_tools() {
        eprintln!("openssl or coturn's client tools missing: skipping");
        return;
    }
    let mut t = start_with(relay_min, false, "", true);
    let peer = EchoPeer::start();
    let mut args = vec![
        "-t", "-S", "-m", "10", "-n", "30", "-z", "20", "-l", "200", "-c",
    ];
    args.extend_from_slice(extra_args);
    let r = uclient_port(&t.tern, t.tls_port, peer.port, &args);
    eprintln!(
        "uclient {args:?}: sent={} received={} lost={:?} rtt={:?} ms",
        r.sent, r.received, r.lost, r.rtt_ms
    );
    assert_all_echoed(&r, 10 * 30);
    assert!(t.tern.alive());
    let log = t.tern.log();
    assert!(
        tls_allocations(&log) >= 10,
        "allocations were not made over TLS:\n{log}"
    );
    // The relayed packets are counted under transport="tls", not folded into "tcp".
    let packets = |s: &str, dir: &str, tr: &str| {
        common::scrape::value(
            s,
            "tern_relay_packets_total",
            &[("direction", dir), ("transport", tr)],
        )
    };
    let scrape = common::scrape::scrape_until(t.tern.metrics_port, "TLS relay packets", |s| {
        packets(s, "client_to_peer", "tls") >= r.sent as f64
            && packets(s, "peer_to_client", "tls") >= r.received as f64
    });
    assert_eq!(packets(&scrape, "client_to_peer", "tcp"), 0.0, "{scrape}");
    assert_eq!(packets(&scrape, "peer_to_client", "tcp"), 0.0, "{scrape}");
}

#[test]
fn uclient_over_tls_with_channels() {
    tls_case(28000, &[]);
}

#[test]
fn uclient_over_tls_with_send_indications() {
    tls_case(28400, &["-s"]);
}

#[test]
fn one_sniffing_port_carries_plain_tcp_and_tls() {
    if !have_tools() {
        return;
    }
    let mut t = start(28800, true, "");
    let peer = EchoPeer::start();
    let port = t.tern.port;
    let tls = uclient_port(
        &t.tern,
        port,
        peer.port,
        &["-t", "-S", "-m", "10", "-n", "20", "-z", "20", "-c"],
    );
    assert_all_echoed(&tls, 200);
    let after_tls = tls_allocations(&t.tern.log());
    assert!(after_tls >= 10, "TLS was not sniffed:\n{}", t.tern.log());
    let tcp = uclient_port(
        &t.tern,
        port,
        peer.port,
        &["-t", "-m", "10", "-n", "20", "-z", "20", "-c", "-s"],
    );
    assert_all_echoed(&tcp, 200);
    let log = t.tern.log();
    assert_eq!(
        tls_allocations(&log),
        after_tls,
        "plain TCP clients were taken for TLS"
    );
    assert!(log
        .lines()
        .any(|l| l.contains("allocation created") && l.contains("transport=Tcp")));
    // UDP on the same port is untouched by sniffing.
    let udp = uclient_port(
        &t.tern,
        port,
        peer.port,
        &["-m", "5", "-n", "20", "-z", "20", "-c"],
    );
    assert_all_echoed(&udp, 100);
    assert!(t.tern.alive());
}

/// Reads until the server closes the connection; the time it took, or `None` if it was
/// still open after `limit`.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

/// The first bytes of a TLS 1.2 ClientHello record that announces 512 bytes it never sends.
fn truncated_client_hello() -> Vec<u8> {
    let mut v = vec![0x16, 0x03, 0x01, 0x02, 0x00]; // handshake record, 512 bytes
    v.extend_from_slice(&[0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]); // ClientHello, TLS 1.2
    v.extend_from_slice(&[0x42; 20]); // part of client_random
    v
}

#[test]
fn tls_bad_input_is_dropped_within_the_handshake_timeout() {
    if !have_tools() {
        return;
    }
    let mut t = start(29200, false, "tcp_max_per_ip = 200\n");
    let addr = SocketAddr::from(([127, 0, 0, 1], t.tls_port));
    let limit = Duration::from_secs(HANDSHAKE_SECS + 10);

    // Plain text on the TLS port: refused as soon as it arrives.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let took = wait_closed(&mut plain, limit).expect("plain-text client still connected");
    eprintln!("plain text on the TLS port closed after {took:?}");

    // Slowloris: 40 connections, each trickling a ClientHello one byte at a time, and 40
    // that stop half-way through one. All go once the handshake timeout has passed.
    let hello = truncated_client_hello();
    let mut trickle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut truncated: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&hello).unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    let mut sent = 0;
    let mut closed_at = vec![None; trickle.len()];
    while t0.elapsed() < limit && closed_at.iter().any(Option::is_none) {
        for (i, s) in trickle.iter_mut().enumerate() {
            if closed_at[i].is_some() {
                continue;
            }
            let byte = hello[sent % hello.len()];
            if s.write_all(&[byte]).is_err() {
                closed_at[i] = Some(t0.elapsed());
                continue;
            }
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => closed_at[i] = Some(t0.elapsed()),
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    closed_at[i] = Some(t0.elapsed())
                }
                _ => {}
            }
            s.set_nonblocking(false).unwrap();
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        closed_at.iter().all(Option::is_some),
        "slowloris connections still open after {limit:?}: {closed_at:?}"
    );
    let first = closed_at.iter().flatten().min().unwrap();
    assert!(
        *first >= Duration::from_secs(HANDSHAKE_SECS) - Duration::from_millis(600),
        "trickling clients were closed before the handshake timeout ({first:?})"
    );
    for s in &mut truncated {
        wait_closed(s, limit).expect("truncated handshake still connected");
    }

    // Meanwhile and afterwards a real TLS client is served.
    let peer = EchoPeer::start();
    let r = uclient_port(
        &t.tern,
        t.tls_port,
        peer.port,
        &["-t", "-S", "-m", "5", "-n", "20", "-z", "20", "-c"],
    );
    assert_all_echoed(&r, 100);
    assert!(t.tern.alive());
    let log = t.tern.log();
    let timeouts = log.matches("reason=HandshakeTimeout").count();
    assert!(
        timeouts >= 80,
        "expected 80 handshake timeouts logged, saw {timeouts}"
    );
    assert!(log.contains("TLS error"), "plain text was not a TLS error");
}

#[test]
fn https_api_with_the_same_certificate() {
    if !have_tool("openssl") || !have_tool("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let api_port = free_port();
    let turn_port = free_port();
    let tls_port = free_port();
    let cfg = dir.path().join("tern.toml");
    std::fs::write(
        &cfg,
        format!(
            "[turn]\nlisten = [\"127.0.0.1:{turn_port}\"]\nrelay_ip = [\"127.0.0.1\"]\n\
             min_port = 29600\nmax_port = 29700\nauth_secrets = [\"{}\"]\nworkers = 1\n\
             [tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nlisten = [\"127.0.0.1:{tls_port}\"]\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\ntls = true\ntokens = [\"tok-0123456789abcdef\"]\n\
             [metrics]\nenabled = false\n",
            random_secret()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("TERN_USAGE__PATH", dir.path().join("usage.db"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{api_port}/api/ice");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = None;
    while Instant::now() < deadline {
        let o = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&cert)
            .args(["--resolve", &format!("localhost:{api_port}:127.0.0.1")])
            .args(["-H", "Authorization: Bearer tok-0123456789abcdef"])
            .arg(url.replace("127.0.0.1", "localhost"))
            .output()
            .unwrap();
        if o.status.success() {
            out = Some(String::from_utf8_lossy(&o.stdout).to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Plain HTTP on the HTTPS port gets nothing useful.
    let plain = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            &format!("http://127.0.0.1:{api_port}/api/ice"),
        ])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let body = out.unwrap_or_else(|| {
        panic!(
            "no HTTPS answer; log:\n{}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        )
    });
    assert!(body.contains("iceServers"), "unexpected body: {body}");
    assert!(
        body.contains(&format!(":{tls_port}?transport=tcp\"")) && body.contains("\"turns:"),
        "no turns: URL for the TLS listener: {body}"
    );
    assert!(
        !plain.status.success(),
        "plain HTTP answered on the HTTPS port"
    );
}

#[test]
fn check_config_names_bad_tls_files() {
    if !have_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = self_signed(other.path());
    let cases = [
        (
            format!("cert_file = {cert:?}\nkey_file = {other_key:?}"),
            "tls.key_file",
        ),
        (
            format!("cert_file = {key:?}\nkey_file = {key:?}"),
            "tls.cert_file",
        ),
        (
            format!("cert_file = \"/nonexistent/c.pem\"\nkey_file = {key:?}"),
            "tls.cert_file",
        ),
        (format!("cert_file = {cert:?}"), "tls.key_file"),
    ];
    for (tls, want) in cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, format!("[tls]\n{tls}\n")).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["check-config", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err =
            String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{tls} accepted");
        assert!(
            err.contains(want),
            "{tls}: error does not name {want}: {err}"
        );
    }
    std::fs::write(dir.path().join("sniff.toml"), "[turn]\nsniff_tls = true\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["check-config", "--config"])
        .arg(dir.path().join("sniff.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The SHA-256 fingerprint of the certificate a TLS server at `port` presents now.
fn presented_fingerprint(port: u16) -> Option<String> {
    let chain = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    x509.stdin.take()?.write_all(&chain.stdout).ok()?;
    let out = x509.wait_with_output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn file_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sighup_swaps_the_certificate_for_new_handshakes_and_keeps_sessions() {
    if !have_tools() {
        return;
    }
    let t = start(30400, false, "");
    let cert = t.certs.path().join("cert.pem");
    let before = file_fingerprint(&cert);
    assert_eq!(presented_fingerprint(t.tls_port).as_deref(), Some(&*before));

    // A TLS session that stays open across the reload.
    let peer = EchoPeer::start();
    let secret = t.tern.secret.clone();
    let tls_port = t.tls_port;
    let peer_port = peer.port;
    let long = std::thread::spawn(move || {
        let mut cmd = Command::new("turnutils_uclient");
        cmd.args(["-W", &secret, "-u", "tester", "-p", &tls_port.to_string()])
            .args(["-e", "127.0.0.1", "-r", &peer_port.to_string()])
            .args([
                "-t",
                "-S",
                "-m",
                "2",
                "-n",
                "60",
                "-z",
                "50",
                "-c",
                "127.0.0.1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_with_limit(&mut cmd, UCLIENT_LIMIT);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let mut r = parse_uclient(&text);
        r.output = text;
        r
    });
    std::thread::sleep(Duration::from_millis(1500));

    // Renewal: new files in place (written beside and renamed), then SIGHUP.
    let fresh = tempfile::tempdir().unwrap();
    let (c2, k2) = self_signed(fresh.path());
    std::fs::copy(&k2, t.certs.path().join("key.new")).unwrap();
    std::fs::copy(&c2, t.certs.path().join("cert.new")).unwrap();
    std::fs::rename(
        t.certs.path().join("key.new"),
        t.certs.path().join("cert.key"),
    )
    .unwrap();
    std::fs::rename(t.certs.path().join("cert.new"), &cert).unwrap();
    let after = file_fingerprint(&cert);
    assert_ne!(before, after);
    // SAFETY: kill(2) on the PID of the daemon this test started.
    unsafe { libc::kill(t.tern.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while presented_fingerprint(t.tls_port).as_deref() != Some(&*after) {
        assert!(
            Instant::now() < deadline,
            "new handshakes still get the old certificate:\n{}",
            t.tern.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = long.join().unwrap();
    assert_all_echoed(&r, 2 * 60);
}
