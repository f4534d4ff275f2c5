//! RFC 6062 TCP relay allocations with the real `tern` binary: coturn's
//! `turnutils_uclient -T` (two clients whose TCP allocations connect to each other, over
//! TURN/TCP and over TLS), and a hand-built client for the paths uclient cannot aim at:
//! Connect with its CONNECTION-ID, ConnectionBind, ConnectionAttempt for an incoming peer,
//! megabytes both ways with their digests checked, and the error codes (400, 403, 446, 447).
//! All peers are loopback sockets this test opens itself.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stun_types::attribute::{Nonce, RawAttribute, Realm, Username};
use stun_types::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageWrite, MessageWriteExt,
    MessageWriteVec, Method,
};
use turn_types::attribute::{XorPeerAddress, XorRelayedAddress};
use turn_types::message::{ALLOCATE, CONNECT, CONNECTION_BIND, CREATE_PERMISSION, REFRESH};

use common::*;

const UCLIENT_LIMIT: Duration = Duration::from_secs(90);
const IO_LIMIT: Duration = Duration::from_secs(20);
/// CONNECTION-ID (RFC 6062 §6.2.1).
const CONNECTION_ID: u16 = 0x002A;
/// ConnectionAttempt indication (RFC 6062 §6.1): method 0x00C, class indication.
const CONNECTION_ATTEMPT_INDICATION: u16 = 0x001C;

fn have_uclient() -> bool {
    have_tool("turnutils_uclient")
}

/// REQUESTED-TRANSPORT = TCP (RFC 6062 §6.2).
fn requested_tcp() -> RawAttribute<'static> {
    RawAttribute::new(0x0019.into(), &[6, 0, 0, 0])
}

fn connection_id_attr(id: u32) -> RawAttribute<'static> {
    RawAttribute::new(CONNECTION_ID.into(), &id.to_be_bytes()).into_owned()
}

fn connection_id(msg: &[u8]) -> Option<u32> {
    let m = Message::from_bytes(msg).ok()?;
    let (_, a) = m.raw_attribute_and_offset(CONNECTION_ID.into())?;
    Some(u32::from_be_bytes(a.value.as_ref().try_into().ok()?))
}

/// Reads one STUN message from a TURN TCP stream (RFC 8656 §3.1 framing: the STUN length).
fn read_stun(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut msg = head.to_vec();
    msg.resize(20 + len, 0);
    s.read_exact(&mut msg[20..])?;
    Ok(msg)
}

fn msg_type(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// A hand-built TURN client on one TCP connection, with REST credentials.
struct TcpTurn {
    sock: TcpStream,
    user: String,
    password: String,
    realm: String,
    nonce: String,
}

impl TcpTurn {
    fn connect(tern: &Tern, user: &str, password: &str) -> TcpTurn {
        let sock = TcpStream::connect(tern.addr()).unwrap();
        sock.set_read_timeout(Some(IO_LIMIT)).unwrap();
        sock.set_nodelay(true).unwrap();
        TcpTurn {
            sock,
            user: user.into(),
            password: password.into(),
            realm: String::new(),
            nonce: String::new(),
        }
    }

    fn rest(tern: &Tern, name: &str) -> TcpTurn {
        let user = format!("{}:{name}", unix_now() + 3600);
        let password = rest_password(&tern.secret, &user);
        TcpTurn::connect(tern, &user, &password)
    }

    /// A second connection with the same credentials (a client data connection).
    fn sibling(&self, tern: &Tern) -> TcpTurn {
        let mut c = TcpTurn::connect(tern, &self.user, &self.password);
        c.realm.clone_from(&self.realm);
        c.nonce.clone_from(&self.nonce);
        c
    }

    /// Sends an authenticated request (learning REALM/NONCE from a 401 or 438 first) and
    /// returns its response; indications arriving meanwhile are kept in `early`.
    fn request_keep(
        &mut self,
        method: Method,
        add: impl Fn(&mut MessageWriteVec),
        early: &mut Vec<Vec<u8>>,
    ) -> Vec<u8> {
        for _ in 0..3 {
            let mut m = Message::builder_request(method, MessageWriteVec::new());
            add(&mut m);
            if !self.nonce.is_empty() {
                m.add_attribute(&Username::new(&self.user).unwrap())
                    .unwrap();
                m.add_attribute(&Realm::new(&self.realm).unwrap()).unwrap();
                m.add_attribute(&Nonce::new(&self.nonce).unwrap()).unwrap();
                let key = LongTermCredentials::new(self.user.clone(), self.password.clone())
                    .to_key(self.realm.clone());
                m.add_message_integrity(&key.into(), IntegrityAlgorithm::Sha1)
                    .unwrap();
            }
            let req = m.finish();
            self.sock.write_all(&req).unwrap();
            let resp = loop {
                let r = read_stun(&mut self.sock).expect("a response");
                if r[8..20] == req[8..20] {
                    break r;
                }
                early.push(r);
            };
            if matches!(error_code(&resp), Some(401) | Some(438))
                && realm_and_nonce(&resp).is_some()
            {
                let (realm, nonce) = realm_and_nonce(&resp).unwrap();
                let retry = self.nonce.is_empty() || error_code(&resp) == Some(438);
                self.realm = realm;
                self.nonce = nonce;
                if retry {
                    continue;
                }
            }
            return resp;
        }
        panic!("no answer past the authentication challenges");
    }

    fn request(&mut self, method: Method, add: impl Fn(&mut MessageWriteVec)) -> Vec<u8> {
        let mut early = Vec::new();
        let r = self.request_keep(method, add, &mut early);
        assert!(early.is_empty(), "unexpected messages: {early:?}");
        r
    }

    /// Allocates a TCP relay (RFC 6062 §5.1); returns the relayed address.
    fn allocate_tcp(&mut self) -> SocketAddr {
        let resp = self.request(ALLOCATE, |m| m.add_attribute(&requested_tcp()).unwrap());
        assert_eq!(error_code(&resp), None, "TCP Allocate refused");
        let msg = Message::from_bytes(&resp).unwrap();
        msg.attribute::<XorRelayedAddress>()
            .expect("XOR-RELAYED-ADDRESS")
            .addr(msg.transaction_id())
    }

    fn with_peer(peer: SocketAddr) -> impl Fn(&mut MessageWriteVec) {
        move |m| {
            let tid = m.transaction_id();
            m.add_attribute(&XorPeerAddress::new(peer, tid)).unwrap();
        }
    }

    /// Connect (RFC 6062 §5.2): `Ok(CONNECTION-ID)` or `Err(error code)`.
    fn connect_peer(&mut self, peer: SocketAddr) -> Result<u32, u16> {
        let resp = self.request(CONNECT, Self::with_peer(peer));
        match error_code(&resp) {
            Some(c) => Err(c),
            None => Ok(connection_id(&resp).expect("CONNECTION-ID in the Connect response")),
        }
    }

    fn create_permission(&mut self, peer: SocketAddr) {
        let resp = self.request(CREATE_PERMISSION, Self::with_peer(peer));
        assert_eq!(error_code(&resp), None, "CreatePermission refused");
    }

    /// ConnectionBind (RFC 6062 §5.4) on this connection: `None` on success.
    fn bind(&mut self, id: u32) -> Option<u16> {
        let resp = self.request(CONNECTION_BIND, |m| {
            m.add_attribute(&connection_id_attr(id)).unwrap()
        });
        error_code(&resp)
    }
}

/// Sends `bytes` on `w` from a thread while `r` is read to the end or `bytes.len()`;
/// returns what `r` got.
fn pump(mut w: TcpStream, r: &mut TcpStream, bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len();
    let writer = std::thread::spawn(move || {
        w.write_all(&bytes).unwrap();
        w
    });
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    got
}

/// `len` bytes client → peer, then `len` other bytes peer → client, SHA-256 compared.
fn both_ways(client: &mut TcpStream, peer: &mut TcpStream, len: usize, seed: u8) {
    let up = pattern(len, seed);
    let got = pump(client.try_clone().unwrap(), peer, up.clone());
    assert_eq!(digest(&got), digest(&up), "client → peer bytes differ");
    let down = pattern(len, seed.wrapping_add(1));
    let got = pump(peer.try_clone().unwrap(), client, down.clone());
    assert_eq!(digest(&got), digest(&down), "peer → client bytes differ");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn digest(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// Whether the other end closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn connect_and_connection_bind_carry_megabytes_both_ways() {
    let tern = Tern::start(TernOpts::new(17000));
    let mut ctl = TcpTurn::rest(&tern, "outbound");
    let relayed = ctl.allocate_tcp();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");

    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer_listener.local_addr().unwrap();
    let id = ctl.connect_peer(peer_addr).expect("Connect succeeds");
    let (mut peer, from) = peer_listener.accept().unwrap();
    peer.set_read_timeout(Some(IO_LIMIT)).unwrap();
    // RFC 6062 §5.2: the server connects from the allocation's relayed address.
    assert_eq!(
        from, relayed,
        "peer connection must come from the relayed address"
    );

    // A second Connect to the same peer while the first is alive: 446.
    assert_eq!(ctl.connect_peer(peer_addr), Err(446));

    let mut data = ctl.sibling(&tern);
    assert_eq!(data.bind(id), None, "ConnectionBind refused");
    // The same CONNECTION-ID cannot be bound twice.
    let mut again = ctl.sibling(&tern);
    assert_eq!(again.bind(id), Some(400));

    both_ways(&mut data.sock, &mut peer, 3 << 20, 1);

    // The peer hangs up: the client data connection ends too.
    drop(peer);
    assert!(
        closed_within(&mut data.sock, IO_LIMIT),
        "client data connection still open after the peer closed"
    );
    // The control connection still works and the peer address is free again.
    let id2 = ctl.connect_peer(peer_addr).expect("Connect again");
    assert_ne!(id2, id);
    let (_peer2, _) = peer_listener.accept().unwrap();
    assert!(tern.log().contains("allocation created"));
}

#[test]
fn an_incoming_peer_with_permission_gets_a_connection_attempt() {
    let tern = Tern::start(TernOpts::new(17400));
    let mut ctl = TcpTurn::rest(&tern, "inbound");
    let relayed = ctl.allocate_tcp();

    // No permission for 127.0.0.1 yet: the peer's connection is closed, no indication.
    let mut stranger = TcpStream::connect_timeout(&relayed, IO_LIMIT).expect("the relay listens");
    assert!(
        closed_within(&mut stranger, IO_LIMIT),
        "a peer without permission must be closed"
    );

    ctl.create_permission(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut peer = TcpStream::connect_timeout(&relayed, IO_LIMIT).unwrap();
    peer.set_read_timeout(Some(IO_LIMIT)).unwrap();
    let peer_local = peer.local_addr().unwrap();
    let ind = read_stun(&mut ctl.sock).expect("ConnectionAttempt indication");
    assert_eq!(msg_type(&ind), CONNECTION_ATTEMPT_INDICATION, "{ind:?}");
    let m = Message::from_bytes(&ind).unwrap();
    let said = m
        .attribute::<XorPeerAddress>()
        .expect("XOR-PEER-ADDRESS")
        .addr(m.transaction_id());
    assert_eq!(said, peer_local);
    let id = connection_id(&ind).expect("CONNECTION-ID");

    // The peer may talk before the bind; nothing is lost.
    peer.write_all(b"early bytes from the peer").unwrap();
    let mut data = ctl.sibling(&tern);
    assert_eq!(data.bind(id), None);
    let mut early = [0u8; 25];
    data.sock.read_exact(&mut early).unwrap();
    assert_eq!(&early, b"early bytes from the peer");

    both_ways(&mut data.sock, &mut peer, 2 << 20, 3);

    // Deleting the allocation (Refresh lifetime 0) ends its data connections.
    let resp = ctl.request(REFRESH, |m| {
        m.add_attribute(&RawAttribute::new(0x000D.into(), &0u32.to_be_bytes()))
            .unwrap()
    });
    assert_eq!(error_code(&resp), None);
    assert!(closed_within(&mut peer, IO_LIMIT), "peer still connected");
    assert!(
        closed_within(&mut data.sock, IO_LIMIT),
        "data connection open"
    );
}

#[test]
fn tcp_relay_errors_are_precise() {
    // Default peer policy for 10/8 (denied) while loopback is allowed for the test peers.
    let tern = Tern::start(TernOpts::new(17800));

    // Over UDP a TCP allocation is a bad request (RFC 6062 §5.1).
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = udp_transaction(&udp, tern.addr(), &allocate_unauthenticated()).unwrap();
    let (realm, nonce) = realm_and_nonce(&first).unwrap();
    let user = format!("{}:udp", unix_now() + 3600);
    let pass = rest_password(&tern.secret, &user);
    let mut m = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    m.add_attribute(&requested_tcp()).unwrap();
    m.add_attribute(&Username::new(&user).unwrap()).unwrap();
    m.add_attribute(&Realm::new(&realm).unwrap()).unwrap();
    m.add_attribute(&Nonce::new(&nonce).unwrap()).unwrap();
    let key = LongTermCredentials::new(user, pass).to_key(realm);
    m.add_message_integrity(&key.into(), IntegrityAlgorithm::Sha1)
        .unwrap();
    let resp = udp_transaction(&udp, tern.addr(), &m.finish()).unwrap();
    assert_eq!(error_code(&resp), Some(400));

    let mut ctl = TcpTurn::rest(&tern, "errors");
    // Connect before any allocation: 437.
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    assert_eq!(ctl.connect_peer(nowhere), Err(437));
    ctl.allocate_tcp();
    // A private peer is refused by policy before any packet leaves (403).
    assert_eq!(
        ctl.connect_peer(SocketAddr::from(([10, 1, 2, 3], 80))),
        Err(403)
    );
    // Nobody listens there: 447 Connection Timeout or Failure.
    assert_eq!(ctl.connect_peer(nowhere), Err(447));
    // ConnectionBind with an id nobody handed out: 400.
    let mut data = ctl.sibling(&tern);
    assert_eq!(data.bind(0x0012_3456), Some(400));
    // ChannelBind is not for TCP allocations: 400.
    let resp = ctl.request(turn_types::message::CHANNEL_BIND, |m| {
        let tid = m.transaction_id();
        m.add_attribute(&turn_types::attribute::ChannelNumber::new(0x4001))
            .unwrap();
        m.add_attribute(&XorPeerAddress::new(nowhere, tid)).unwrap();
    });
    assert_eq!(error_code(&resp), Some(400));

    // A UDP allocation over TCP refuses Connect with 400.
    let mut udp_over_tcp = TcpTurn::rest(&tern, "udp-alloc");
    let resp = udp_over_tcp.request(ALLOCATE, |m| {
        m.add_attribute(&requested_transport_udp()).unwrap()
    });
    assert_eq!(error_code(&resp), None);
    assert_eq!(udp_over_tcp.connect_peer(nowhere), Err(400));
    assert!(tern.log().contains("allocation created"));
}

/// Runs `turnutils_uclient -T` (RFC 6062 client-to-client: each client's TCP allocation
/// connects to the other's) against `port`.
fn uclient_tcp_relay(tern: &Tern, port: u16, extra: &[&str]) -> UclientReport {
    // -T makes uclient client-to-client: no echo peer is involved (port 9 is never used).
    let mut args = vec!["-T", "-m", "10", "-n", "30", "-l", "200", "-z", "20"];
    args.extend_from_slice(extra);
    uclient_port(tern, port, 9, &args, UCLIENT_LIMIT)
}

fn assert_all_relayed(r: &UclientReport, tern: &Tern) {
    eprintln!(
        "uclient -T: sent={} received={} lost={:?} rtt={:?} ms",
        r.sent, r.received, r.lost, r.rtt_ms
    );
    assert!(
        r.success && r.sent >= 300 && r.received == r.sent && r.lost == Some(0),
        "expected 300 messages both ways with 0 lost, got sent={} received={} lost={:?}\n{}\n--- tern log ---\n{}",
        r.sent,
        r.received,
        r.lost,
        r.output,
        tern.log()
    );
}

#[test]
fn uclient_tcp_relay_over_tcp() {
    if !have_uclient() {
        eprintln!("coturn's client tools missing: skipping");
        return;
    }
    let mut opts = TernOpts::new(18200);
    opts.metrics = true;
    let tern = Tern::start(opts);
    let r = uclient_tcp_relay(&tern, tern.port, &[]);
    assert_all_relayed(&r, &tern);
    let log = tern.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("allocation created"))
            .count()
            >= 10,
        "uclient -T pairs its 10 clients, each with a TCP allocation:\n{log}"
    );
}

#[test]
fn uclient_tcp_relay_over_tls() {
    if !have_uclient() || !have_tool("openssl") {
        eprintln!("coturn's client tools or openssl missing: skipping");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = common::tls::self_signed(certs.path(), "cert", "localhost");
    let tls_port = free_port();
    let mut opts = TernOpts::new(18600);
    opts.extra_turn += &format!(
        "[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nlisten = [\"127.0.0.1:{tls_port}\"]\n"
    );
    let tern = Tern::start(opts);
    let r = uclient_tcp_relay(&tern, tls_port, &["-S"]);
    assert_all_relayed(&r, &tern);
    assert!(tern.log().contains("transport=Tls"));
}

/// `turn.max_bytes_per_sec` on an RFC 6062 relay: the splice slows down instead of dropping,
/// so every byte arrives (SHA-256 checked) while the cap held it back (the throttle counter).
#[test]
fn a_bandwidth_capped_tcp_relay_loses_no_byte() {
    let mut opts = TernOpts::new(18600);
    opts.extra_turn.push_str("max_bytes_per_sec = 262144\n");
    opts.metrics = true;
    let tern = Tern::start(opts);
    let mut ctl = TcpTurn::rest(&tern, "capped");
    ctl.allocate_tcp();
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let id = ctl
        .connect_peer(peer_listener.local_addr().unwrap())
        .expect("Connect succeeds");
    let (mut peer, _) = peer_listener.accept().unwrap();
    peer.set_read_timeout(Some(IO_LIMIT)).unwrap();
    let mut data = ctl.sibling(&tern);
    assert_eq!(data.bind(id), None, "ConnectionBind refused");

    // Four times the one-second burst each way.
    both_ways(&mut data.sock, &mut peer, 1 << 20, 3);

    let s = scrape::scrape_until(tern.metrics_port, "the spliced bytes", |s| {
        scrape::value(
            s,
            "tern_turn_tcp_relay_bytes_total",
            &[("direction", "peer_to_client")],
        ) >= (1 << 20) as f64
    });
    assert!(
        scrape::value(&s, "tern_turn_tcp_relay_throttled_total", &[]) > 0.0,
        "the cap never held the splice back"
    );
    assert_eq!(
        scrape::value(
            &s,
            "tern_relay_dropped_packets_total",
            &[("reason", "bandwidth")]
        ),
        0.0,
        "a TCP relay must not drop stream bytes"
    );
}
