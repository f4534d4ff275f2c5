//! Bad input from the network against the real `tern` binary: malformed STUN, failed
//! integrity checks, unbound channels, TCP garbage, floods and idle connections. After each
//! abuse the daemon is still alive and a normal client is still served.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Protocol, Socket, Type};
use stun_types::message::{Message, MessageWrite, MessageWriteExt, MessageWriteVec, BINDING};

/// A fresh client from `src_ip` gets a Binding answered over UDP and TCP.
fn assert_still_serving(tern: &mut Tern, src_ip: &str) {
    assert!(tern.alive(), "tern died:\n{}", tern.log());
    let sock = UdpSocket::bind((src_ip, 0)).unwrap();
    let resp = udp_transaction(&sock, tern.addr(), &binding_request());
    let resp = resp.expect("Binding over UDP answered after the abuse");
    assert_eq!(error_code(&resp), None);

    let mut c = tcp_from(src_ip, tern.addr());
    let req = binding_request();
    c.write_all(&req).unwrap();
    let mut hdr = [0u8; 20];
    c.read_exact(&mut hdr).expect("Binding over TCP answered");
    assert_eq!(hdr[8..20], req[8..20]);
}

/// A TCP connection to `to` from a chosen loopback source address.
fn tcp_from(src_ip: &str, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    let src: SocketAddr = format!("{src_ip}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let t: TcpStream = s.into();
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    t
}

/// Reads until the server closes the connection (EOF or reset); false on timeout.
fn closed_by_server(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A Binding request with FINGERPRINT (RFC 8489 §14.7).
fn binding_with_fingerprint() -> Vec<u8> {
    let mut m = Message::builder_request(BINDING, MessageWriteVec::new());
    m.add_fingerprint().unwrap();
    m.finish()
}

#[test]
fn malformed_udp_messages_are_dropped_and_serving_continues() {
    let mut tern = Tern::start(TernOpts::new(24400));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let good = binding_request();
    // Truncated header, truncated body (length says 100), length not a multiple of 4,
    // a length longer than the datagram, a zero-length datagram, pure garbage.
    let mut long_len = good.clone();
    long_len[2..4].copy_from_slice(&100u16.to_be_bytes());
    let mut odd_len = good.clone();
    odd_len[2..4].copy_from_slice(&3u16.to_be_bytes());
    odd_len.extend_from_slice(&[0, 0, 0]);
    let mut short_len = binding_with_fingerprint();
    short_len[2..4].copy_from_slice(&0u16.to_be_bytes());
    let mut bad_cookie = good.clone();
    bad_cookie[4] ^= 0xff;
    let mut bad_attr = good.clone();
    // An attribute header whose length runs past the message end.
    bad_attr[2..4].copy_from_slice(&8u16.to_be_bytes());
    bad_attr.extend_from_slice(&[0x00, 0x06, 0x00, 0x40, 1, 2, 3, 4]);
    let inputs: Vec<Vec<u8>> = vec![
        good[..10].to_vec(),
        long_len,
        odd_len,
        short_len,
        bad_cookie,
        bad_attr,
        vec![],
        vec![0xde; 1200],
        vec![0x40, 0x00, 0xff, 0xff, 1, 2, 3],
    ];
    for m in &inputs {
        sock.send_to(m, tern.addr()).unwrap();
    }
    // None of them earns a success response.
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let code = error_code(&buf[..n]);
        assert!(code.is_some(), "a malformed message got a success answer");
    }
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn bad_fingerprint_and_bad_message_integrity() {
    let mut tern = Tern::start(TernOpts::new(24800));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();

    // A correct FINGERPRINT is answered...
    let ok = binding_with_fingerprint();
    assert!(udp_transaction(&sock, tern.addr(), &ok).is_some());
    // ...a corrupted one is not treated as STUN: never a success response.
    let mut bad = binding_with_fingerprint();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    sock.send_to(&bad, tern.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    if let Ok((n, _)) = sock.recv_from(&mut buf) {
        assert!(
            buf[8..20] != bad[8..20] || error_code(&buf[..n]).is_some(),
            "bad FINGERPRINT answered with success"
        );
    }

    // MESSAGE-INTEGRITY that does not verify: 401 (RFC 8489 §9.2.4).
    let first = udp_transaction(&sock, tern.addr(), &allocate_unauthenticated()).unwrap();
    let (realm, nonce) = realm_and_nonce(&first).unwrap();
    let user = format!("{}:mallory", unix_now() + 600);
    let pw = rest_password(&tern.secret, &user);
    let mut req = allocate_authenticated(&user, &pw, &realm, &nonce);
    // Flip a byte of the HMAC (the last 20 bytes of the message: MI is last).
    let n = req.len();
    req[n - 5] ^= 0x01;
    let resp = udp_transaction(&sock, tern.addr(), &req).expect("answer");
    assert_eq!(error_code(&resp), Some(401));
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn channel_data_on_unbound_channel_is_dropped() {
    let mut tern = Tern::start(TernOpts::new(25200));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for ch in [0x4000u16, 0x4fff, 0x7fff] {
        let mut m = ch.to_be_bytes().to_vec();
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(b"data");
        sock.send_to(&m, tern.addr()).unwrap();
    }
    // ChannelData never gets an answer.
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv_from(&mut buf).is_err());
    // Over TCP too: unbound ChannelData is dropped, the stream stays usable.
    let mut c = tcp_from("127.0.0.1", tern.addr());
    c.write_all(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]).unwrap();
    let req = binding_request();
    c.write_all(&req).unwrap();
    let mut hdr = [0u8; 20];
    c.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[8..20], req[8..20]);
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn allocated_client_channel_data_needs_a_bound_channel() {
    let mut tern = Tern::start(TernOpts::new(27200));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (mut client, relayed) = TurnClient::allocate(&tern);
    assert_eq!(client.create_permission(peer_addr), None);

    // Channel 0x4001 is not bound: dropped. Then 0x4002 is bound and carries data.
    client.channel_data(0x4001, b"unbound");
    assert_eq!(client.channel_bind(0x4002, peer_addr), None);
    client.channel_data(0x4002, b"bound");
    let mut buf = [0u8; 2048];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    // Datagrams from one socket over loopback keep their order: the unbound one never left.
    assert_eq!((&buf[..n], from), (&b"bound"[..], relayed));

    // Back from the peer: framed as ChannelData on the bound channel.
    peer.send_to(b"reply", relayed).unwrap();
    client
        .sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (n, _) = client.sock.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &[0x40, 0x02, 0x00, 0x05, b'r', b'e', b'p', b'l', b'y'][..]
    );

    // A peer without a permission is not relayed to the client.
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    stranger.send_to(b"intruder", relayed).unwrap();
    peer.send_to(b"after", relayed).unwrap();
    let (n, _) = client.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[4..n], b"after");
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn tcp_garbage_and_oversized_frames_close_the_connection() {
    let mut tern = Tern::start(TernOpts::new(25600));
    // Not STUN, not ChannelData (first two bits 11).
    let mut c = tcp_from("127.0.0.1", tern.addr());
    c.write_all(&[0xff; 64]).unwrap();
    assert!(
        closed_by_server(&mut c),
        "garbage did not close the connection"
    );

    // A STUN header whose length is not a multiple of 4 (RFC 8489 §5) followed by junk.
    let mut c = tcp_from("127.0.0.1", tern.addr());
    let mut m = binding_request();
    m[2..4].copy_from_slice(&0xffffu16.to_be_bytes());
    m.extend_from_slice(&vec![0xab; 70_000]);
    let _ = c.write_all(&m);
    assert!(
        closed_by_server(&mut c),
        "oversized frame did not close the connection"
    );

    // A good message after garbage on the same stream does not resurrect it.
    let mut c = tcp_from("127.0.0.1", tern.addr());
    let mut m = vec![0xc0; 8];
    m.extend_from_slice(&binding_request());
    c.write_all(&m).unwrap();
    assert!(closed_by_server(&mut c));
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn unauthenticated_allocate_flood_keeps_memory_flat() {
    // Default per-source limits, as on a public server.
    let mut tern = Tern::start(TernOpts {
        extra_turn: String::new(),
        ..TernOpts::new(26000)
    });
    let flooder = UdpSocket::bind("127.0.0.2:0").unwrap();
    flooder.set_nonblocking(true).unwrap();
    let before = tern.rss_kib();
    let mut answers = 0u64;
    let mut buf = [0u8; 2048];
    const FLOOD: usize = 50_000;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..FLOOD {
        let _ = flooder.send_to(&allocate_unauthenticated(), tern.addr());
        if i % 64 == 0 {
            // Pace a little so the kernel queue does not just drop everything.
            std::thread::sleep(Duration::from_millis(1));
            while flooder.recv_from(&mut buf).is_ok() {
                answers += 1;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    while flooder.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    let after = tern.rss_kib();
    eprintln!("flood: {FLOOD} Allocates, {answers} answers, RSS {before} KiB -> {after} KiB");
    assert!(
        after < before + 20 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Per-source rate limiting: the flooder got far fewer answers than requests.
    assert!(
        answers < FLOOD as u64 / 2,
        "{answers} answers to {FLOOD} unauthenticated requests"
    );
    // Another source is served normally.
    assert_still_serving(&mut tern, "127.0.0.1");
}

#[test]
fn silent_tcp_connections_time_out_and_are_bounded_per_source() {
    let mut tern = Tern::start(TernOpts {
        extra_turn: "tcp_idle_timeout_secs = 3\ntcp_max_per_ip = 3\n".into(),
        ..TernOpts::new(26400)
    });
    let src = "127.0.0.3";
    // Five connections from one source: exactly three are accepted (they answer a Binding),
    // the others are closed at once.
    let mut conns: Vec<TcpStream> = (0..5).map(|_| tcp_from(src, tern.addr())).collect();
    let mut served = Vec::new();
    let mut refused = 0;
    for mut c in conns.drain(..) {
        let req = binding_request();
        let _ = c.write_all(&req);
        let mut hdr = [0u8; 20];
        match c.read_exact(&mut hdr) {
            Ok(()) => {
                assert_eq!(hdr[8..20], req[8..20]);
                served.push(c);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!((served.len(), refused), (3, 2), "tcp_max_per_ip = 3");

    // Silent from now on: each is closed by the idle timeout.
    for c in &mut served {
        assert!(closed_by_server(c), "idle connection was not closed");
    }
    // A connection that never completes a message (half a header) is closed too.
    let mut half = tcp_from(src, tern.addr());
    half.write_all(&binding_request()[..10]).unwrap();
    assert!(
        closed_by_server(&mut half),
        "incomplete message kept the connection"
    );

    // The slots were released: the same source is served again.
    assert_still_serving(&mut tern, src);
}

#[test]
fn relay_still_works_after_abuse() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let tern = Tern::start(TernOpts::new(26800));
    // Garbage over both transports first.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..500u32 {
        let junk: Vec<u8> = (0..(i % 97 + 1)).map(|j| (i ^ j) as u8).collect();
        sock.send_to(&junk, tern.addr()).unwrap();
    }
    let mut c = tcp_from("127.0.0.1", tern.addr());
    let _ = c.write_all(&[0x99; 300]);
    let peer = EchoPeer::start();
    let r = uclient(
        &tern,
        peer.port,
        &["-m", "5", "-n", "20", "-z", "20", "-c"],
        Duration::from_secs(60),
    );
    assert!(
        r.sent >= 100 && r.received == r.sent && r.lost == Some(0),
        "{}",
        r.output
    );
}
