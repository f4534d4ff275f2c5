//! RFC 6062 TCP relays in the event loop, driven by a fake shard: peer connects and
//! accepts, ConnectionBind with bytes behind it, splicing several MiB through a slow reader
//! with backpressure, half-close, close by the core, and the handover of a data connection
//! to the worker owning its CONNECTION-ID.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::stun::{attr, class, message_type, method, ChannelNumber, HEADER_LEN};
use crate::turn::{ConnId, FiveTuple, Now, Output, PeerRoute, RelayId, RelayIo};

/// Test-only attribute carrying a port (the fake's stand-in for XOR-PEER-ADDRESS and
/// XOR-RELAYED-ADDRESS).
const PORT_ATTR: u16 = 0x8050;

/// What the fakes report to the test.
#[derive(Default)]
struct Seen {
    /// CONNECTION-IDs the driver reported closed (`Shard::tcp_conn_closed`).
    closed: Mutex<Vec<ConnId>>,
    /// Clients `has_allocation` was asked about: made for a ConnectionBind only on a
    /// worker that does not own the CONNECTION-ID (and for idle connections).
    asked: Mutex<Vec<SocketAddr>>,
}

/// One TCP allocation per shard: Allocate opens a TCP relay listener and answers its port;
/// Connect (with PORT_ATTR) connects to 127.0.0.1:port; accepted peers get a
/// ConnectionAttempt; ConnectionBind binds a waiting peer connection.
struct Fake {
    index: u8,
    alloc: Option<(RelayId, FiveTuple)>,
    next: u32,
    /// Connect requests in progress: the client to answer.
    connecting: Vec<(ConnId, FiveTuple)>,
    waiting: HashSet<ConnId>,
    live: HashSet<ConnId>,
    /// What the worker takes from `poll_output`.
    outbox: std::collections::VecDeque<Output>,
    seen: Arc<Seen>,
}

fn msg(ty: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    crate::stun::test_message(ty, [5; 12], attrs)
}

/// The value of attribute `ty` in message `m`.
fn attr_of(m: &[u8], ty: u16) -> Option<&[u8]> {
    crate::stun::find_attr(m, ty)
}

fn conn_id_of(m: &[u8]) -> ConnId {
    ConnId::from_wire(u32::from_be_bytes(
        attr_of(m, attr::CONNECTION_ID).unwrap().try_into().unwrap(),
    ))
}

fn ty(m: u16, c: u16) -> u16 {
    message_type(m, c)
}

impl Fake {
    fn reply(out: &mut [u8; OUT_LEN], m: &[u8]) -> usize {
        out[..m.len()].copy_from_slice(m);
        m.len()
    }

    /// The answer to STUN message `m` from `from`, written into `out`.
    fn answer(
        &mut self,
        from: FiveTuple,
        m: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    ) -> Option<Output> {
        let t = u16::from_be_bytes([m[0], m[1]]);
        if t == ty(method::ALLOCATE, class::REQUEST) {
            let (relay, port) = loop {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                if let Ok(r) = io.open_tcp_relay(SocketAddr::from(([127, 0, 0, 1], port))) {
                    break (r, port);
                }
            };
            self.alloc = Some((relay, from));
            let r = msg(
                ty(method::ALLOCATE, class::SUCCESS),
                &[(PORT_ATTR, &port.to_be_bytes())],
            );
            return Some(Output::Reply {
                len: Self::reply(out, &r),
            });
        }
        if t == ty(method::CONNECT, class::REQUEST) {
            let (relay, _) = self.alloc.unwrap();
            let port = u16::from_be_bytes(attr_of(m, PORT_ATTR).unwrap().try_into().unwrap());
            let id = ConnId::from_wire((u32::from(self.index) << 24) | self.next);
            self.next += 1;
            let peer = SocketAddr::from(([127, 0, 0, 1], port));
            return match io.tcp_connect(relay, peer, id) {
                Ok(()) => {
                    self.connecting.push((id, from));
                    None
                }
                Err(_) => Some(Output::Reply {
                    len: Self::reply(out, &msg(ty(method::CONNECT, class::ERROR), &[])),
                }),
            };
        }
        if t == ty(method::CONNECTION_BIND, class::REQUEST) {
            let id = conn_id_of(m);
            if self.waiting.remove(&id) {
                let r = msg(ty(method::CONNECTION_BIND, class::SUCCESS), &[]);
                return Some(Output::BindData {
                    conn: id,
                    len: Self::reply(out, &r),
                });
            }
            let r = msg(ty(method::CONNECTION_BIND, class::ERROR), &[]);
            return Some(Output::Reply {
                len: Self::reply(out, &r),
            });
        }
        None
    }
}

impl Shard for Fake {
    fn handle_stun(
        &mut self,
        _now: Now,
        from: FiveTuple,
        m: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    ) {
        if let Some(answer) = self.answer(from, m, out, io) {
            self.outbox.push_back(answer);
        }
    }
    fn channel_to_peer(
        &mut self,
        _: &FiveTuple,
        _: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)> {
        None
    }
    fn peer_to_client(&mut self, _: RelayId, _: SocketAddr) -> Option<PeerRoute> {
        None
    }
    fn handle_timeout(&mut self, _now: Now, _io: &mut impl RelayIo) {}
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn client_closed(&mut self, client: &FiveTuple, _now: Now, _io: &mut impl RelayIo) {
        if let Some((relay, t)) = self.alloc {
            if t == *client {
                for id in self.live.drain() {
                    self.outbox.push_back(Output::ClosePeerConn(id));
                }
                self.outbox.push_back(Output::CloseRelay(relay));
                self.alloc = None;
            }
        }
    }
    fn set_shard_index(&mut self, index: u8) {
        self.index = index;
    }
    fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.seen.asked.lock().unwrap().push(tuple.client);
        self.alloc.is_some_and(|(_, t)| t == *tuple)
    }
    fn tcp_connect_done(&mut self, _now: Now, conn: ConnId, ok: bool) -> bool {
        let Some(i) = self.connecting.iter().position(|&(id, _)| id == conn) else {
            return false;
        };
        let (_, client) = self.connecting.swap_remove(i);
        let r = if ok {
            self.waiting.insert(conn);
            self.live.insert(conn);
            msg(
                ty(method::CONNECT, class::SUCCESS),
                &[(attr::CONNECTION_ID, &conn.to_wire().to_be_bytes())],
            )
        } else {
            msg(ty(method::CONNECT, class::ERROR), &[])
        };
        self.outbox.push_back(Output::Send { to: client, msg: r });
        ok
    }
    fn tcp_peer_accepted(
        &mut self,
        _now: Now,
        relay: RelayId,
        _peer: SocketAddr,
    ) -> Option<ConnId> {
        let (r, client) = self.alloc?;
        if r != relay {
            return None;
        }
        let id = ConnId::from_wire((u32::from(self.index) << 24) | self.next);
        self.next += 1;
        self.waiting.insert(id);
        self.live.insert(id);
        let m = msg(
            ty(method::CONNECTION_ATTEMPT, class::INDICATION),
            &[(attr::CONNECTION_ID, &id.to_wire().to_be_bytes())],
        );
        self.outbox.push_back(Output::Send { to: client, msg: m });
        Some(id)
    }
    fn tcp_conn_closed(&mut self, conn: ConnId) {
        self.live.remove(&conn);
        self.waiting.remove(&conn);
        self.seen.closed.lock().unwrap().push(conn);
    }
    fn poll_output(&mut self) -> Option<Output> {
        self.outbox.pop_front()
    }
}

fn service(workers: usize, seen: &Arc<Seen>) -> TurnService {
    service_with(workers, seen, |_| {})
}

fn service_with(
    workers: usize,
    seen: &Arc<Seen>,
    tweak: impl FnOnce(&mut TurnConfig),
) -> TurnService {
    let mut t = TurnConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers,
        socket_buffer_bytes: 1 << 16,
        ..TurnConfig::default()
    };
    tweak(&mut t);
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let seen = Arc::clone(seen);
    TurnService::start_with(
        &t,
        vec![RelayAddr {
            local: ip,
            advertised: ip,
        }],
        move || Fake {
            index: 0,
            alloc: None,
            next: 1,
            connecting: Vec::new(),
            waiting: HashSet::new(),
            live: HashSet::new(),
            outbox: Default::default(),
            seen: Arc::clone(&seen),
        },
    )
    .unwrap()
}

fn read_msg(c: &mut TcpStream) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_LEN];
    c.read_exact(&mut m).unwrap();
    let len = u16::from_be_bytes([m[2], m[3]]) as usize;
    m.resize(HEADER_LEN + len, 0);
    c.read_exact(&mut m[HEADER_LEN..]).unwrap();
    m
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
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

/// Allocates on a new control connection: (control connection, relay address).
fn allocate(server: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut ctl = connect(server);
    ctl.write_all(&msg(ty(method::ALLOCATE, class::REQUEST), &[]))
        .unwrap();
    let r = read_msg(&mut ctl);
    let port = u16::from_be_bytes(attr_of(&r, PORT_ATTR).unwrap().try_into().unwrap());
    (ctl, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A ConnectionBind for `id` on a new data connection, with `early` bytes in the same write.
fn bind(server: SocketAddr, id: ConnId, early: &[u8], small: bool) -> TcpStream {
    let mut d = if small {
        connect_small(server)
    } else {
        connect(server)
    };
    let mut w = msg(
        ty(method::CONNECTION_BIND, class::REQUEST),
        &[(attr::CONNECTION_ID, &id.to_wire().to_be_bytes())],
    );
    w.extend_from_slice(early);
    d.write_all(&w).unwrap();
    let r = read_msg(&mut d);
    assert_eq!(
        u16::from_be_bytes([r[0], r[1]]),
        ty(method::CONNECTION_BIND, class::SUCCESS)
    );
    d
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(i: u64) -> u8 {
    (i ^ (i >> 11) ^ (i >> 19)) as u8
}

#[test]
fn accepted_peer_binds_with_early_bytes_then_half_closes_both_ways() {
    let seen = Arc::new(Seen::default());
    let svc = service(1, &seen);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);

    let mut peer = connect(relay);
    let attempt = read_msg(&mut ctl);
    assert_eq!(
        u16::from_be_bytes([attempt[0], attempt[1]]),
        ty(method::CONNECTION_ATTEMPT, class::INDICATION)
    );
    let id = conn_id_of(&attempt);
    // The peer talks before the bind: nothing is lost, it arrives once bound.
    peer.write_all(b"peer spoke first;").unwrap();

    let mut data = bind(server, id, b"early client bytes;", false);
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
    assert!(seen.closed.lock().unwrap().is_empty(), "half open is open");

    // Then the peer closes too: the client sees EOF, the pair is gone, reported once.
    drop(peer);
    let mut rest = Vec::new();
    data.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    wait_for("tcp_conn_closed", || {
        !seen.closed.lock().unwrap().is_empty()
    });
    let st = wait_stats(&svc, |s| {
        s.tcp_relay_peer_sockets == 0 && s.tcp_relay_client_to_peer_bytes > 0
    });
    assert_eq!(*seen.closed.lock().unwrap(), vec![id]);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    assert_eq!(st.tcp_relay_client_to_peer_bytes, 29);
    assert_eq!(st.tcp_relay_peer_to_client_bytes, 37);
    // The control connection still works.
    ctl.write_all(&msg(ty(method::ALLOCATE, class::REQUEST), &[]))
        .unwrap();
    read_msg(&mut ctl);
    svc.shutdown();
}

fn wait_stats(s: &TurnService, ok: impl Fn(&NetStats) -> bool) -> NetStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = s.stats();
        if ok(&st) || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connect_failure_then_megabytes_through_a_slow_reader_with_backpressure() {
    let seen = Arc::new(Seen::default());
    let svc = service(1, &seen);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);

    // Nobody listens on this port: the connect fails and the client hears so.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let connect_to = |port: u16| {
        msg(
            ty(method::CONNECT, class::REQUEST),
            &[(PORT_ATTR, &port.to_be_bytes())],
        )
    };
    ctl.write_all(&connect_to(closed_port)).unwrap();
    let r = read_msg(&mut ctl);
    assert_eq!(
        u16::from_be_bytes([r[0], r[1]]),
        ty(method::CONNECT, class::ERROR)
    );

    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    ctl.write_all(&connect_to(target.local_addr().unwrap().port()))
        .unwrap();
    let (peer, from) = target.accept().unwrap();
    assert_eq!(
        from, relay,
        "the peer sees the relayed address (RFC 6062 §5.2)"
    );
    let r = read_msg(&mut ctl);
    assert_eq!(
        u16::from_be_bytes([r[0], r[1]]),
        ty(method::CONNECT, class::SUCCESS)
    );
    let id = conn_id_of(&r);
    let sock = socket2::Socket::from(peer);
    sock.set_send_buffer_size(1 << 16).unwrap();
    sock.set_recv_buffer_size(1 << 16).unwrap();
    let mut peer: TcpStream = sock.into();
    let mut data = bind(server, id, b"", true);

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
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = 0u64;
    while got < TOTAL {
        let n = data.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        for &b in &buf[..n] {
            assert_eq!(b, pattern(got), "byte {got}");
            got += 1;
        }
        if got % (1 << 20) < n as u64 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
    let mut got = 0u64;
    while got < BACK {
        let n = peer.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        for &b in &buf[..n] {
            assert_eq!(b, pattern(got), "byte {got}");
            got += 1;
        }
        if got % (1 << 20) < n as u64 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
    let mut rest = Vec::new();
    assert_eq!(
        data.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0),
        0
    );
    let mut rest = Vec::new();
    assert_eq!(
        peer.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0),
        0
    );
    let st = wait_stats(&svc, |s| s.tcp_relay_peer_sockets == 0);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    assert!(
        seen.closed.lock().unwrap().is_empty(),
        "a connection the core closed is not reported back"
    );
    svc.shutdown();
}

#[test]
fn connection_bind_on_another_worker_is_handed_to_the_owner() {
    let seen = Arc::new(Seen::default());
    let svc = service(2, &seen);
    let server = svc.local_addrs()[0];
    let (ctl, relay) = allocate(server);
    let mut ctl = ctl;
    // SO_REUSEPORT spreads new connections over both workers: bind until one lands on
    // the worker without the allocation (each try has an even chance).
    let mut pairs = Vec::new();
    for round in 0..64u32 {
        let mut peer = connect(relay);
        let id = conn_id_of(&read_msg(&mut ctl));
        let early = format!("early {round};");
        let mut data = bind(server, id, early.as_bytes(), false);
        let mut got = vec![0u8; early.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, early.as_bytes());
        peer.write_all(b"pong").unwrap();
        let mut got = [0u8; 4];
        data.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        let moved = seen
            .asked
            .lock()
            .unwrap()
            .contains(&data.local_addr().unwrap());
        pairs.push((peer, data));
        if moved {
            break;
        }
    }
    assert_eq!(
        seen.asked.lock().unwrap().len(),
        1,
        "one data connection moved"
    );
    let st = wait_stats(&svc, |s| s.tcp_handovers >= 1);
    assert_eq!(st.tcp_handovers, 1);
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
        let mut rest = Vec::new();
        assert_eq!(
            data.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0),
            0
        );
        let mut rest = Vec::new();
        assert_eq!(
            peer.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0),
            0
        );
    }
    let st = wait_stats(&svc, |s| s.tcp_relay_peer_sockets == 0);
    assert_eq!(st.tcp_relay_peer_sockets, 0);
    svc.shutdown();
}

#[test]
fn connection_bind_for_an_unknown_id_gets_the_cores_answer_and_raw_bytes_never_leak() {
    let seen = Arc::new(Seen::default());
    let svc = service(1, &seen);
    let server = svc.local_addrs()[0];
    let (_ctl, _relay) = allocate(server);
    let mut d = connect(server);
    d.write_all(&msg(
        ty(method::CONNECTION_BIND, class::REQUEST),
        &[(attr::CONNECTION_ID, &0x0000_7777u32.to_be_bytes())],
    ))
    .unwrap();
    let r = read_msg(&mut d);
    assert_eq!(
        u16::from_be_bytes([r[0], r[1]]),
        ty(method::CONNECTION_BIND, class::ERROR)
    );
    // A CONNECTION-ID naming a worker that does not exist is answered locally too.
    d.write_all(&msg(
        ty(method::CONNECTION_BIND, class::REQUEST),
        &[(attr::CONNECTION_ID, &0x0900_0001u32.to_be_bytes())],
    ))
    .unwrap();
    let r = read_msg(&mut d);
    assert_eq!(
        u16::from_be_bytes([r[0], r[1]]),
        ty(method::CONNECTION_BIND, class::ERROR)
    );
    let st = wait_stats(&svc, |_| true);
    assert_eq!(st.tcp_handovers, 0);
    svc.shutdown();
}

#[test]
fn idle_timeout_spares_allocations_and_bound_data_connections() {
    let seen = Arc::new(Seen::default());
    let svc = service_with(1, &seen, |t| t.tcp_idle_timeout_secs = 1);
    let server = svc.local_addrs()[0];
    let (mut ctl, relay) = allocate(server);
    let mut peer = connect(relay);
    let id = conn_id_of(&read_msg(&mut ctl));
    let mut data = bind(server, id, b"", false);
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
    ctl.write_all(&msg(ty(method::ALLOCATE, class::REQUEST), &[]))
        .unwrap();
    read_msg(&mut ctl);
    data.write_all(b"tock").unwrap();
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"tock");

    // A bound data connection stays however long nothing moves: it ends with its peer or
    // its allocation, not with turn.tcp_idle_timeout_secs.
    std::thread::sleep(Duration::from_millis(2500));
    peer.write_all(b"late").unwrap();
    data.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"late");
    assert!(seen.closed.lock().unwrap().is_empty());
    let st = wait_stats(&svc, |s| s.tcp_closed_idle == 1);
    assert_eq!(st.tcp_closed_idle, 1, "only the stranger was idle-closed");
    // The allocation's control connection is still there.
    ctl.write_all(&msg(ty(method::ALLOCATE, class::REQUEST), &[]))
        .unwrap();
    read_msg(&mut ctl);
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
    let seen = Arc::new(Seen::default());
    let t = TurnConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers: 1,
        socket_buffer_bytes: 1 << 16,
        ..TurnConfig::default()
    };
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let fake_seen = Arc::clone(&seen);
    let svc = TurnService::start_with_tls(
        &t,
        Some((tls_cfg, ctx)),
        vec![RelayAddr {
            local: ip,
            advertised: ip,
        }],
        move || Fake {
            index: 0,
            alloc: None,
            next: 1,
            connecting: Vec::new(),
            waiting: HashSet::new(),
            live: HashSet::new(),
            outbox: Default::default(),
            seen: Arc::clone(&fake_seen),
        },
    )
    .unwrap();
    let (mut ctl, relay) = allocate(svc.local_addrs()[0]);
    let mut peer = connect(relay);
    let id = conn_id_of(&read_msg(&mut ctl));

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
    let mut w = msg(
        ty(method::CONNECTION_BIND, class::REQUEST),
        &[(attr::CONNECTION_ID, &id.to_wire().to_be_bytes())],
    );
    w.extend_from_slice(b"early over tls;");
    tls.write_all(&w).unwrap();
    let mut head = [0u8; HEADER_LEN];
    tls.read_exact(&mut head).unwrap();
    assert_eq!(
        u16::from_be_bytes([head[0], head[1]]),
        ty(method::CONNECTION_BIND, class::SUCCESS)
    );
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
    wait_for("tcp_conn_closed", || {
        !seen.closed.lock().unwrap().is_empty()
    });
    svc.shutdown();
}

#[test]
fn a_connection_moves_between_workers_at_most_once() {
    let seen = Arc::new(Seen::default());
    let svc = service(2, &seen);
    let server = svc.local_addrs()[0];
    let bind_for = |shard: u32| {
        msg(
            ty(method::CONNECTION_BIND, class::REQUEST),
            &[(attr::CONNECTION_ID, &((shard << 24) | 999).to_be_bytes())],
        )
    };
    // Forged CONNECTION-IDs naming each worker in turn: whichever worker a connection
    // lands on, one of the two binds moves it, and the other is answered where it is.
    for _ in 0..8 {
        let mut c = connect(server);
        for shard in [0, 1, 0, 1] {
            c.write_all(&bind_for(shard)).unwrap();
            let r = read_msg(&mut c);
            assert_eq!(
                u16::from_be_bytes([r[0], r[1]]),
                ty(method::CONNECTION_BIND, class::ERROR)
            );
        }
    }
    wait_stats(&svc, |s| s.tcp_handovers >= 8);
    // Every answer is in, so every move happened; one more publish interval shows all.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(svc.stats().tcp_handovers, 8);
    svc.shutdown();
}
