//! Certificate reload against the real daemon (issue 4): while coturn's uclient relays over
//! TLS, the certificate files are replaced and SIGHUP sent: the running TLS relay loses
//! nothing, and new handshakes (openssl s_client) present the new certificate.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// SHA-256 fingerprint of a PEM certificate file.
fn file_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// SHA-256 fingerprint of the certificate a new TLS handshake with `port` presents.
fn served_fingerprint(port: u16) -> String {
    let mut s_client = Command::new("openssl");
    s_client
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let out = run_with_limit(&mut s_client, Duration::from_secs(20));
    let pem = String::from_utf8_lossy(&out.stdout).to_string();
    let begin = pem
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = pem
        .find("-----END CERTIFICATE-----")
        .expect("a certificate")
        + 25;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("served.pem");
    std::fs::write(&p, &pem[begin..end]).unwrap();
    file_fingerprint(&p)
}

fn wait_log(tern: &Tern, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tern.log().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            tern.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_swaps_the_certificate_for_new_handshakes_only() {
    if !(have_tool("openssl") && have_tool("turnutils_uclient")) {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = common::tls::self_signed(certs.path(), "live", "localhost");
    let (cert2, key2) = common::tls::self_signed(certs.path(), "next", "localhost");
    let (fp1, fp2) = (file_fingerprint(&cert), file_fingerprint(&cert2));
    assert_ne!(fp1, fp2);
    let tls_port = free_port();
    let mut opts = TernOpts::new(32650);
    opts.relay_ports = 50;
    opts.extra_turn += &format!(
        "\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nlisten = [\"127.0.0.1:{tls_port}\"]\n"
    );
    let tern = Tern::start(opts);
    let peer = EchoPeer::start();
    assert_eq!(served_fingerprint(tls_port), fp1);
    let running = std::thread::scope(|s| {
        // uclient over TLS (-S) with channels, across the swap.
        let run = s.spawn(|| {
            let mut cmd = Command::new("turnutils_uclient");
            cmd.args(["-W", &tern.secret, "-u", "tester", "-t", "-S"])
                .args(["-p", &tls_port.to_string(), "-e", "127.0.0.1"])
                .args(["-r", &peer.port.to_string()])
                .args(["-m", "2", "-n", "250", "-c", "127.0.0.1"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = run_with_limit(&mut cmd, LIMIT);
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            let mut r = parse_uclient(&text);
            r.output = text;
            r
        });
        wait_log(&tern, "allocation created", 2);
        std::thread::sleep(Duration::from_millis(500));
        std::fs::copy(&cert2, &cert).unwrap();
        std::fs::copy(&key2, &key).unwrap();
        tern.signal(libc::SIGHUP);
        wait_log(&tern, "configuration reloaded", 1);
        run.join().unwrap()
    });
    assert!(
        running.sent >= 500 && running.received == running.sent && running.lost == Some(0),
        "the TLS relay running across the certificate swap lost packets: sent={} received={} lost={:?}\n{}",
        running.sent,
        running.received,
        running.lost,
        running.output
    );
    eprintln!(
        "TLS relay across the swap: sent={} received={} lost={:?}",
        running.sent, running.received, running.lost
    );
    assert_eq!(
        served_fingerprint(tls_port),
        fp2,
        "new handshakes get the new certificate"
    );
}
