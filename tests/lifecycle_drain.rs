//! Graceful drain on SIGTERM against the real daemon (issue 4): live relays keep flowing,
//! new Allocate requests get 300 Try Alternate with ALTERNATE-SERVER (RFC 8489 §10,
//! §14.15) or 508 when no alternate is configured, and the process exits 0 within the
//! drain timeout (or at once on a second SIGTERM).

use crate::common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use stun_types::message::Message;

/// An authenticated Allocate from `sock` (a fresh 5-tuple): the response bytes.
fn allocate(tern: &Tern, sock: &UdpSocket) -> Vec<u8> {
    let first = udp_transaction(sock, tern.addr(), &allocate_unauthenticated()).expect("401");
    let (realm, nonce) = realm_and_nonce(&first).expect("REALM and NONCE");
    let user = format!("{}:drain", unix_now() + 600);
    let pw = rest_password(&tern.secret, &user);
    udp_transaction(
        sock,
        tern.addr(),
        &allocate_authenticated(&user, &pw, &realm, &nonce),
    )
    .expect("an answer to the authenticated Allocate")
}

/// ALTERNATE-SERVER (0x8023, plain MAPPED-ADDRESS format) of a response.
fn alternate_server(resp: &[u8]) -> Option<SocketAddr> {
    let msg = Message::from_bytes(resp).ok()?;
    let raw = msg.raw_attribute(0x8023.into())?;
    let v = raw.value.as_ref();
    (v.len() == 8 && v[1] == 1)
        .then(|| SocketAddr::from(([v[4], v[5], v[6], v[7]], u16::from_be_bytes([v[2], v[3]]))))
}

#[test]
fn sigterm_drains_live_relays_redirects_new_allocations_and_exits_0() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let mut opts = TernOpts::new(32000);
    opts.relay_ports = 100;
    opts.drain_timeout_secs = 25;
    opts.extra_turn += "alternate_udp = [\"192.0.2.7:3478\", \"192.0.2.8:3479\"]\n";
    let mut tern = Tern::start(opts);
    let peer = EchoPeer::start();
    // A relay that runs well past the SIGTERM: 2 clients x 250 messages, 20 ms apart.
    let relay = std::thread::scope(|s| {
        let running = s.spawn(|| {
            uclient(
                &tern,
                peer.port,
                &["-m", "2", "-n", "250", "-l", "120", "-c"],
                Duration::from_secs(90),
            )
        });
        // Wait until both allocations exist, then SIGTERM mid-run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tern.log().matches("allocation created").count() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        tern.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tern.log().contains("draining") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // New allocations while draining: 300 with the alternates, round-robin.
        let mut seen = Vec::new();
        for _ in 0..2 {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let resp = allocate(&tern, &sock);
            assert_eq!(error_code(&resp), Some(300), "{}", tern.log());
            seen.push(
                alternate_server(&resp)
                    .expect("ALTERNATE-SERVER")
                    .to_string(),
            );
        }
        seen.sort();
        assert_eq!(seen, ["192.0.2.7:3478", "192.0.2.8:3479"]);
        running.join().unwrap()
    });
    assert!(
        relay.sent >= 500 && relay.received == relay.sent && relay.lost == Some(0),
        "the live relay lost packets during the drain: sent={} received={} lost={:?}\n{}",
        relay.sent,
        relay.received,
        relay.lost,
        relay.output
    );
    eprintln!(
        "relay across SIGTERM: sent={} received={} lost={:?}",
        relay.sent, relay.received, relay.lost
    );
    // uclient leaves its allocations to expire: the drain ends at its 25 s timeout.
    let status = tern
        .wait_exit(Duration::from_secs(40))
        .expect("tern still running 40 s after SIGTERM with a 25 s drain timeout");
    assert!(status.success(), "exit status {status}\n{}", tern.log());
    let log = tern.log();
    assert!(log.contains("SIGTERM received: draining"), "{log}");
    assert!(
        log.contains("drain timeout reached") || log.contains("drain complete"),
        "{log}"
    );
}

#[test]
fn draining_without_alternates_answers_508_and_a_second_sigterm_exits_at_once() {
    let mut opts = TernOpts::new(32100);
    opts.relay_ports = 100;
    opts.drain_timeout_secs = 600;
    let mut tern = Tern::start(opts);
    let live = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(error_code(&allocate(&tern, &live)), None, "{}", tern.log());
    tern.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tern.log().contains("draining") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp = allocate(&tern, &sock);
    assert_eq!(error_code(&resp), Some(508), "{}", tern.log());
    assert_eq!(alternate_server(&resp), None);
    // Binding still answers: only new allocations are refused.
    assert!(udp_transaction(&sock, tern.addr(), &binding_request()).is_some());
    assert!(tern.alive(), "exited although an allocation was live");
    tern.signal(libc::SIGTERM);
    let status = tern
        .wait_exit(Duration::from_secs(10))
        .expect("a second SIGTERM ends the drain");
    assert!(status.success(), "exit status {status}");
    assert!(tern.log().contains("second SIGTERM"), "{}", tern.log());
}

#[test]
fn sigterm_with_nothing_to_drain_exits_at_once() {
    let mut opts = TernOpts::new(32200);
    opts.relay_ports = 100;
    opts.drain_timeout_secs = 600;
    let mut tern = Tern::start(opts);
    tern.signal(libc::SIGTERM);
    let status = tern
        .wait_exit(Duration::from_secs(10))
        .expect("nothing to drain: exits at once");
    assert!(status.success());
    assert!(!tern.pid_file().exists(), "pid file removed at exit");
}

/// The status line of a WebSocket upgrade request to `path` on the HTTP listener.
fn ws_upgrade_status(api_port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{api_port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn draining_refuses_new_signaling_connections() {
    let mut opts = TernOpts::new(32300);
    opts.relay_ports = 100;
    opts.drain_timeout_secs = 600;
    opts.api = Some(String::new());
    let mut tern = Tern::start(opts);
    assert!(
        ws_upgrade_status(tern.api_port, "/ws").contains(" 101 "),
        "signaling is not served before the drain"
    );
    // A live allocation keeps the daemon draining.
    let live = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(error_code(&allocate(&tern, &live)), None, "{}", tern.log());
    tern.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tern.log().contains("draining") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in ["/ws", "/peerjs/peerjs?key=peerjs&id=abc&token=t"] {
        let status = ws_upgrade_status(tern.api_port, path);
        assert!(status.contains(" 503 "), "{path}: {status}");
    }
    tern.signal(libc::SIGTERM);
    let status = tern.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
}
