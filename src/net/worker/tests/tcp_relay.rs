//! RFC 6062 TCP relays in the event loop: peer connects and accepts, ConnectionBind with
//! bytes behind it, splicing several MiB through a slow reader with backpressure,
//! half-close, close by the core, and the handover of a data connection to the worker
//! owning its CONNECTION-ID.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{self, conn_id, type_of, Client, TCP};
use super::{start, wait_for, wait_stats};
use crate::config::{Config, TlsConfig};
use crate::net::TurnService;
use crate::stun::{attr, class, message_type, method};
use crate::tls::TlsContext;

fn ty(m: u16, c: u16) -> u16 {
    message_type(m, c)
}

fn service(workers: usize) -> TurnService {
    start(&client::config(workers))
}

/// Peer connections the core holds, in any state (`TurnStats::tcp_conns_by_state`).
fn core_conns(svc: &TurnService) -> u64 {
    svc.turn_stats().tcp_conns_by_state.iter().sum()
}

fn read_msg(c: &mut TcpStream) -> Vec<u8> {
    client::read_msg(c)
}

fn connect(addr: SocketAddr) -> TcpStream {
    client::tcp(addr)
}

/// A TCP connection with small kernel buffers, so backpressure shows up quickly.
fn connect_small(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(1 << 16).unwrap();
    s.set_send_buffer_size(1 << 16).unwrap();
    s.connect(&addr.into()).unwrap();
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// A TCP allocation on a new control connection, with a permission for loopback peers:
/// (control client, relayed address).
fn allocate(server: SocketAddr) -> (Client, SocketAddr) {
    let mut ctl = Client::tcp(server);
    let relay = ctl.allocate(TCP);
    ctl.create_permission("127.0.0.1:1".parse().unwrap());
    (ctl, relay)
}

/// A ConnectionBind for `id` (signed with `ctl`'s nonce) on a new data connection, with
/// `early` bytes in the same write.
fn bind(ctl: &Client, server: SocketAddr, id: u32, early: &[u8], small: bool) -> TcpStream {
    let mut d = if small {
        connect_small(server)
    } else {
        connect(server)
    };
    let mut w = ctl.signed(
        method::CONNECTION_BIND,
        &[(attr::CONNECTION_ID, &id.to_be_bytes())],
        None,
    );
    w.extend_from_slice(early);
    d.write_all(&w).unwrap();
    let r = read_msg(&mut d);
    assert_eq!(type_of(&r), ty(method::CONNECTION_BIND, class::SUCCESS));
    d
}

fn pattern(i: u64) -> u8 {
    (i ^ (i >> 11) ^ (i >> 19)) as u8
}

/// Asserts `c` ends (EOF or a reset) with no more bytes.
fn assert_closed(c: &mut TcpStream) {
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0), 0);
}

/// Reads `total` bytes of [`pattern`] from `from` as a slow reader would (a pause every
/// MiB), checking every byte.
fn read_pattern(from: &mut TcpStream, total: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = from.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        for &b in &buf[..n] {
            assert_eq!(b, pattern(got), "byte {got}");
            got += 1;
        }
        if got % (1 << 20) < n as u64 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn accepted_peer_binds_with_early_bytes_then_half_closes_both_ways() {
    let svc = service(1);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);

    let mut peer = connect(relay);
    let attempt = ctl.wire.recv();
    assert_eq!(
        type_of(&attempt),
        ty(method::CONNECTION_ATTEMPT, class::INDICATION)
    );
    let id = conn_id(&attempt);
    // The peer talks before the bind: nothing is lost, it arrives once bound.
    peer.write_all(b"peer spoke first;").unwrap();

    let mut data = bind(&ctl, server, id, b"early client bytes;", false);
    let mut got = [0u8; 19];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early client bytes;");
    let mut got = [0u8; 17];
    data.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"peer spoke first;");

    // Client half-closes: the peer sees EOF and can still answer.
    data.write_all(b"last words").unwrap();
    data.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last words");
    peer.write_all(b"reply after your FIN").unwrap();
    let mut got = [0u8; 20];
    data.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply after your FIN");
    // Half open is open: the core still holds the connection (its counters are published
    // twice a second, so wait for them).
    wait_for("the core to hold the half-open pair", || {
        core_conns(&svc) == 1
    });

    // Then the peer closes too: the client sees EOF, the pair is gone, reported once.
    drop(peer);
    let mut rest = Vec::new();
    data.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let st = wait_stats(&svc, |s| {
        s.tcp_relay_peer_sockets == 0 && s.tcp_relay_client_to_peer_bytes > 0
    });
    // The core heard of the close (`Server::tcp_conn_closed`).
    wait_for("the core to drop the connection", || core_conns(&svc) == 0);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    assert_eq!(st.tcp_relay_client_to_peer_bytes, 29);
    assert_eq!(st.tcp_relay_peer_to_client_bytes, 37);
    // The control connection still works.
    ctl.create_permission("127.0.0.2:1".parse().unwrap());
    svc.shutdown();
}

#[test]
fn connect_failure_then_megabytes_through_a_slow_reader_with_backpressure() {
    let svc = service(1);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);

    // Nobody listens on this port: the connect fails and the client hears so.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = |port: u16| Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let r = ctl.request(method::CONNECT, &[], to(closed_port));
    assert_eq!(type_of(&r), ty(method::CONNECT, class::ERROR));

    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let r = ctl.request(
        method::CONNECT,
        &[],
        to(target.local_addr().unwrap().port()),
    );
    let (peer, from) = target.accept().unwrap();
    assert_eq!(
        from, relay,
        "the peer sees the relayed address (RFC 6062 §5.2)"
    );
    assert_eq!(type_of(&r), ty(method::CONNECT, class::SUCCESS));
    let id = conn_id(&r);
    let sock = socket2::Socket::from(peer);
    sock.set_send_buffer_size(1 << 16).unwrap();
    sock.set_recv_buffer_size(1 << 16).unwrap();
    let mut peer: TcpStream = sock.into();
    let mut data = bind(&ctl, server, id, b"", true);

    // Peer → client: 8 MiB while the client does not read at first.
    const TOTAL: u64 = 8 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let mut writer = peer.try_clone().unwrap();
    let w = Arc::clone(&written);
    let sender = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 32 * 1024];
        let mut i = 0u64;
        while i < TOTAL {
            for b in chunk.iter_mut() {
                *b = pattern(i);
                i += 1;
            }
            writer.write_all(&chunk).unwrap();
            w.store(i, Ordering::Relaxed);
        }
    });
    // The writer stalls: what it got out is bounded by kernel buffers and Tern's queue.
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let stalled_at = written.load(Ordering::Relaxed);
    eprintln!("peer held back after {stalled_at} bytes");
    assert!(
        stalled_at < 2 << 20,
        "the peer must be held back, not buffered for: {stalled_at} bytes written"
    );
    // A slow reader gets every byte in order.
    read_pattern(&mut data, TOTAL);
    sender.join().unwrap();

    // Client → peer: 4 MiB, the peer reading slowly.
    const BACK: u64 = 4 << 20;
    let mut writer = data.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 48 * 1024];
        let mut i = 0u64;
        while i < BACK {
            let n = chunk.len().min((BACK - i) as usize);
            for b in chunk[..n].iter_mut() {
                *b = pattern(i);
                i += 1;
            }
            writer.write_all(&chunk[..n]).unwrap();
        }
    });
    read_pattern(&mut peer, BACK);
    sender.join().unwrap();
    let st = wait_stats(&svc, |s| {
        s.tcp_relay_client_to_peer_bytes == BACK && s.tcp_relay_peer_to_client_bytes == TOTAL
    });
    assert_eq!(st.tcp_relay_peer_to_client_bytes, TOTAL);
    assert_eq!(st.tcp_relay_client_to_peer_bytes, BACK);
    assert_eq!(st.tcp_relay_connect_failures, 1);
    assert_eq!(st.tcp_relay_peer_sockets, 1);
    assert_eq!(st.drop_tcp_queue_full, 0);

    // The control connection goes: the core closes the peer, the data connection follows.
    drop(ctl);
    assert_closed(&mut data);
    assert_closed(&mut peer);
    let st = wait_stats(&svc, |s| s.tcp_relay_peer_sockets == 0);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    wait_for("the allocation to go", || svc.allocations() == 0);
    wait_for("the core to drop the connection", || core_conns(&svc) == 0);
    svc.shutdown();
}

#[test]
fn connection_bind_on_another_worker_is_handed_to_the_owner() {
    let svc = service(2);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);
    // SO_REUSEPORT spreads new connections over both workers: bind until one lands on
    // the worker without the allocation (each try has an even chance) and is moved.
    let mut pairs = Vec::new();
    for round in 0..64u32 {
        let mut peer = connect(relay);
        let id = conn_id(&ctl.wire.recv());
        let early = format!("early {round};");
        let mut data = bind(&ctl, server, id, early.as_bytes(), false);
        let mut got = vec![0u8; early.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, early.as_bytes());
        peer.write_all(b"pong").unwrap();
        let mut got = [0u8; 4];
        data.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        pairs.push((peer, data));
        // The move came before the answer just read; the counter shows it within one
        // publish interval (500 ms).
        let t = Instant::now();
        let mut moved = false;
        while !moved && t.elapsed() < Duration::from_millis(1500) {
            moved = svc.stats().tcp_handovers >= 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        if moved {
            break;
        }
    }
    let st = wait_stats(&svc, |s| {
        s.tcp_handovers >= 1 && s.tcp_relay_peer_sockets == pairs.len() as u64
    });
    assert!(st.tcp_handovers >= 1, "a data connection moved");
    assert_eq!(st.tcp_relay_peer_sockets, pairs.len() as u64);
    // Every pair, handed over or not, carries data both ways.
    for (peer, data) in &mut pairs {
        data.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
    // The allocation goes: every pair closes, on whichever worker.
    drop(ctl);
    for (mut peer, mut data) in pairs {
        assert_closed(&mut data);
        assert_closed(&mut peer);
    }
    let st = wait_stats(&svc, |s| s.tcp_relay_peer_sockets == 0);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    svc.shutdown();
}

#[test]
fn connection_bind_for_an_unknown_id_gets_the_cores_answer_and_raw_bytes_never_leak() {
    let svc = service(1);
    let server = svc.local_addrs()[0];
    let (ctl, _relay) = allocate(server);
    let bind_to = |id: u32| {
        ctl.signed(
            method::CONNECTION_BIND,
            &[(attr::CONNECTION_ID, &id.to_be_bytes())],
            None,
        )
    };
    let mut d = connect(server);
    d.write_all(&bind_to(0x0000_7777)).unwrap();
    let r = read_msg(&mut d);
    assert_eq!(type_of(&r), ty(method::CONNECTION_BIND, class::ERROR));
    // A CONNECTION-ID naming a worker that does not exist is answered locally too.
    d.write_all(&bind_to(0x0900_0001)).unwrap();
    let r = read_msg(&mut d);
    assert_eq!(type_of(&r), ty(method::CONNECTION_BIND, class::ERROR));
    let st = wait_stats(&svc, |_| true);
    assert_eq!(st.tcp_handovers, 0);
    svc.shutdown();
}

#[test]
fn idle_timeout_spares_allocations_and_bound_data_connections() {
    let mut cfg = client::config(1);
    cfg.turn.tcp_idle_timeout_secs = 1;
    let svc = start(&cfg);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);
    let mut peer = connect(relay);
    let id = conn_id(&ctl.wire.recv());
    let mut data = bind(&ctl, server, id, b"", false);
    let mut stranger = connect(server);

    // Three seconds of peer→client bytes only; the control connection sends nothing.
    for _ in 0..10 {
        peer.write_all(b"tick").unwrap();
        let mut got = [0u8; 4];
        data.read_exact(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut b = [0u8; 4];
    assert_eq!(
        stranger.read(&mut b).unwrap_or(0),
        0,
        "an idle stranger is cut"
    );
    ctl.create_permission("127.0.0.2:1".parse().unwrap());
    data.write_all(b"tock").unwrap();
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"tock");

    // A bound data connection stays however long nothing moves: it ends with its peer or
    // its allocation, not with turn.tcp_idle_timeout_secs.
    std::thread::sleep(Duration::from_millis(2500));
    peer.write_all(b"late").unwrap();
    data.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"late");
    wait_for("the core to hold the pair", || core_conns(&svc) == 1);
    let st = wait_stats(&svc, |s| s.tcp_closed_idle == 1);
    assert_eq!(st.tcp_closed_idle, 1, "only the stranger was idle-closed");
    // The allocation's control connection is still there.
    ctl.create_permission("127.0.0.2:1".parse().unwrap());
    svc.shutdown();
}

/// Accepts any server certificate (the test's own self-signed one).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP stream counting the bytes read from the wire (TLS records included).
struct Counting(TcpStream, u64);

impl Read for Counting {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(b)?;
        self.1 += n as u64;
        Ok(n)
    }
}

impl Write for Counting {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn tls_data_connection_carries_raw_bytes_in_full_records_and_ends_with_close_notify() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        eprintln!("openssl not installed: skipping");
        return;
    }
    let tls_cfg = TlsConfig {
        cert_file: Some(cert),
        key_file: Some(key),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..TlsConfig::default()
    };
    let ctx = TlsContext::from_config(&tls_cfg).unwrap().unwrap();
    let cfg = Config {
        tls: tls_cfg,
        ..client::config(1)
    };
    let svc = TurnService::start_tls(&cfg, Some(ctx)).unwrap();
    let (mut ctl, relay) = allocate(svc.local_addrs()[0]);
    let mut peer = connect(relay);
    let id = conn_id(&ctl.wire.recv());

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let sock = connect(svc.local_tls_addrs()[0]);
    let mut tls = rustls::StreamOwned::new(conn, Counting(sock, 0));
    let mut w = ctl.signed(
        method::CONNECTION_BIND,
        &[(attr::CONNECTION_ID, &id.to_be_bytes())],
        None,
    );
    w.extend_from_slice(b"early over tls;");
    tls.write_all(&w).unwrap();
    let head = client::read_msg(&mut tls);
    assert_eq!(type_of(&head), ty(method::CONNECTION_BIND, class::SUCCESS));
    let mut got = [0u8; 15];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early over tls;");

    // 1 MiB that parses as 4-byte ChannelData frames: raw bytes must not be cut there
    // (one TLS record per 4 bytes would be 5x the bytes on the wire).
    const TOTAL: usize = 1 << 20;
    let chunk: Vec<u8> = [0x40u8, 0, 0, 0].repeat(16 * 1024);
    let mut writer = peer.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..TOTAL / chunk.len() {
            writer.write_all(&chunk).unwrap();
        }
    });
    let wire_before = tls.sock.1;
    let mut buf = vec![0u8; TOTAL];
    tls.read_exact(&mut buf).unwrap();
    sender.join().unwrap();
    assert!(buf.chunks(4).all(|c| c == [0x40, 0, 0, 0]));
    let wire = tls.sock.1 - wire_before;
    assert!(
        wire < (TOTAL as u64) * 11 / 10,
        "{wire} bytes on the wire for {TOTAL} bytes of data"
    );

    tls.write_all(b"up the tls side").unwrap();
    let mut got = [0u8; 15];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"up the tls side");

    // The peer hangs up: the client gets close_notify (a clean end, not a truncation).
    drop(peer);
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .expect("close_notify before the TCP close");
    assert!(rest.is_empty());
    wait_for("the core to drop the connection", || core_conns(&svc) == 0);
    svc.shutdown();
}

#[test]
fn a_connection_moves_between_workers_at_most_once() {
    let svc = service(2);
    let server = svc.local_addrs()[0];
    let bind_for = |shard: u32| {
        client::message(
            ty(method::CONNECTION_BIND, class::REQUEST),
            &[(attr::CONNECTION_ID, &((shard << 24) | 999).to_be_bytes())],
            None,
            None,
        )
    };
    // Forged CONNECTION-IDs naming each worker in turn: whichever worker a connection
    // lands on, one of the two binds moves it, and the other is answered where it is.
    for _ in 0..8 {
        let mut c = connect(server);
        for shard in [0, 1, 0, 1] {
            c.write_all(&bind_for(shard)).unwrap();
            let r = read_msg(&mut c);
            assert_eq!(type_of(&r), ty(method::CONNECTION_BIND, class::ERROR));
        }
    }
    wait_stats(&svc, |s| s.tcp_handovers >= 8);
    // Every answer is in, so every move happened; one more publish interval shows all.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(svc.stats().tcp_handovers, 8);
    svc.shutdown();
}
