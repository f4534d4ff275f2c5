//! The sans-IO TURN core (RFC 8656, RFC 6062) driven like `net::worker` drives it, with a
//! fake `RelayIo` and a simulated clock, by a sequence of operations the fuzzer chooses:
//! raw datagrams and TCP/TLS byte streams, requests it builds from structured input and
//! signs with a valid REST or static credential (so it gets past authentication into
//! Allocate, Refresh, CreatePermission, ChannelBind, Send, Connect and ConnectionBind),
//! peer traffic, TCP relay events, client closes, reloads, drains and time passing.
//!
//! Checked besides "no panic": every answer fits the output buffer and is a valid STUN
//! message, forwards point inside the request, the fake driver's rules hold (no relay
//! closed twice, no peer connection closed twice or after its listener, none closed that
//! the driver already reported closed), the gauges match the tables after every
//! operation, and once every lifetime has run out nothing is left: no allocation, relay
//! socket, peer connection, quota or gauge (a leak is a bug).

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use stun_types::message::Message;
use tern::config::{Config, StaticUser};
use tern::stun::{
    attr, attributes, class, classify, message_type, method, pad4, tcp_frame_len, ChannelNumber,
    Kind, MessageWriter, CHANNEL_DATA_HEADER,
};
use tern::turn::auth::{mint_rest_credential, Key};
use tern::turn::{
    ConnId, FiveTuple, Now, Output, RelayAddr, RelayId, RelayIo, Server, ServerConfig, Shared,
    Transport,
};

const SECRET: &str = "fuzz-secret";
const OLD_SECRET: &str = "rotated-away";
const REALM: &str = "tern";
const STATIC_USER: &str = "carol";
const STATIC_PASSWORD: &str = "carol-password";
const T0_UNIX: u64 = 1_800_000_000;
const OUT_LEN: usize = 2048;

const CLIENT_IPS: [&str; 3] = ["203.0.113.5", "203.0.113.6", "2001:db8::5"];
/// Public peers of both families, a second port on one IP (permissions are per IP,
/// channels per address), and addresses the default policy denies.
const PEERS: [&str; 8] = [
    "8.8.8.8:5000",
    "8.8.8.8:5001",
    "1.1.1.1:6000",
    "[2606:4700::1111]:7000",
    "127.0.0.1:9",
    "10.0.0.1:80",
    "0.0.0.0:0",
    "[::1]:9",
];

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Setup {
    strict_expiry: bool,
    tcp_relay: bool,
    dual_stack: bool,
    /// Eight relay ports only: exhaustion and EVEN-PORT pairs.
    small_ports: bool,
    /// A small unauthenticated budget: the rate limiter.
    small_rate: bool,
    user_quota: u8,
    total_quota: u8,
    max_tcp_conns: u8,
    shard: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tr {
    Udp,
    Tcp,
    Tls,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Raw bytes as one UDP datagram.
    Datagram {
        client: u8,
        bytes: Vec<u8>,
    },
    /// Raw bytes on a TCP or TLS connection, framed as the driver frames them.
    Stream {
        client: u8,
        tls: bool,
        bytes: Vec<u8>,
    },
    /// A request or indication built from structured input.
    Request(Request),
    /// Shortcuts to well-formed signed requests, so that short inputs reach deep states.
    Allocate {
        client: u8,
        tr: Tr,
        tcp: bool,
        dual: bool,
        even: bool,
    },
    /// These pick the client among those holding an allocation.
    Permit {
        alloc: u8,
        peer: u8,
    },
    Bind {
        alloc: u8,
        peer: u8,
        channel: u8,
    },
    SendTo {
        alloc: u8,
        peer: u8,
        data: Vec<u8>,
    },
    Refresh {
        alloc: u8,
        lifetime: u8,
    },
    Connect {
        alloc: u8,
        peer: u8,
    },
    ConnectionBind {
        client: u8,
        tls: bool,
        conn: u8,
    },
    /// ChannelData from a client.
    ChannelData {
        client: u8,
        tr: Tr,
        channel: u8,
        len: u8,
    },
    /// A datagram from a peer on a relay socket.
    PeerDatagram {
        relay: u8,
        peer: u8,
    },
    /// The driver's connect for a peer connection finished.
    ConnectDone {
        conn: u8,
        ok: bool,
    },
    /// A peer connected to a TCP relay listener.
    PeerAccepted {
        relay: u8,
        peer: u8,
    },
    /// The driver closed a peer connection (its peer or data connection hung up).
    ConnClosed {
        conn: u8,
    },
    /// A TCP/TLS client connection closed.
    ClientClosed {
        client: u8,
        tls: bool,
    },
    Advance {
        secs: u16,
    },
    Draining(bool),
    /// Relay sockets or connects fail to open (EMFILE, unreachable).
    IoFaults {
        fail_open: bool,
        fail_connect: bool,
    },
    /// SIGHUP with other settings; the REST secret may rotate away.
    Reload {
        strict_expiry: bool,
        rotate: bool,
        tcp_relay: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Request {
    client: u8,
    tr: Tr,
    method: Method,
    indication: bool,
    auth: Auth,
    /// Reuse this client's previous transaction id (a retransmission).
    retransmit: bool,
    attrs: Vec<A>,
    /// Flip one byte of the encoded message (after signing): integrity and parser paths.
    corrupt: Option<(u16, u8)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Method {
    Binding,
    Allocate,
    Refresh,
    CreatePermission,
    ChannelBind,
    Send,
    Connect,
    ConnectionBind,
    Other(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Auth {
    None,
    /// A REST credential for one of two users; expired or not.
    Rest {
        bob: bool,
        expired: bool,
        old_secret: bool,
    },
    /// The static user, by USERNAME or USERHASH, MD5/SHA-1 or SHA-256 integrity.
    Static {
        userhash: bool,
        sha256: bool,
    },
    /// A valid user signed with the wrong key.
    WrongKey,
}

#[derive(Arbitrary, Debug)]
enum A {
    Transport(u8),
    Udp,
    Tcp,
    Lifetime(u32),
    ShortLifetime(u8),
    Peer(u8),
    Channel(u16),
    /// A channel number from a small set, so binds and data meet.
    ChannelIdx(u8),
    EvenPort(bool),
    /// A RESERVATION-TOKEN an earlier answer handed out.
    Token(u8),
    RawToken([u8; 8]),
    Family(u8),
    AdditionalFamily(u8),
    DontFragment,
    /// A CONNECTION-ID the core handed out.
    ConnId(u8),
    RawConnId(u32),
    Data(Vec<u8>),
    Raw(u16, Vec<u8>),
}

/// The fake driver: relay sockets and peer connections, with the driver's rules asserted.
#[derive(Default)]
struct FakeIo {
    next: u32,
    /// Relay sockets by `RelayId::index` (ordered, so the fuzzer's indices are stable).
    open: BTreeMap<u32, SocketAddr>,
    tcp_listeners: BTreeSet<u32>,
    /// Peer connections the driver holds: connecting ones with their relay.
    conns: BTreeMap<ConnId, Option<u32>>,
    closed_by_core: BTreeSet<ConnId>,
    closed_by_driver: BTreeSet<ConnId>,
    fail_open: bool,
    fail_connect: bool,
}

impl RelayIo for FakeIo {
    fn open_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId> {
        if self.fail_open {
            return Err(std::io::Error::other("no sockets"));
        }
        if self.open.values().any(|a| *a == addr) {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        self.next += 1;
        let id = RelayId::from_index(self.next as usize);
        self.open.insert(id.index() as u32, addr);
        Ok(id)
    }
    fn open_tcp_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId> {
        let id = self.open_relay(addr)?;
        self.tcp_listeners.insert(id.index() as u32);
        Ok(id)
    }
    fn tcp_connect(
        &mut self,
        relay: RelayId,
        _peer: SocketAddr,
        conn: ConnId,
    ) -> std::io::Result<()> {
        assert!(
            self.tcp_listeners.contains(&(relay.index() as u32)),
            "connect from a non-TCP relay"
        );
        if self.fail_connect {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        assert!(
            !self.conns.contains_key(&conn),
            "conn {conn:?} handed out twice"
        );
        self.conns.insert(conn, Some(relay.index() as u32));
        Ok(())
    }
}

/// What the driver does for `Output::CloseRelay` and `Output::ClosePeerConn`, with its
/// rules asserted (the queue's order is the order the driver closes things in).
impl FakeIo {
    fn close_relay(&mut self, relay: RelayId) {
        assert!(
            self.open.remove(&(relay.index() as u32)).is_some(),
            "closing unknown relay"
        );
        self.tcp_listeners.remove(&(relay.index() as u32));
    }

    fn close_tcp_conn(&mut self, conn: ConnId) {
        assert!(
            !self.closed_by_driver.contains(&conn),
            "core closed conn {conn:?} the driver had reported closed"
        );
        assert!(
            self.closed_by_core.insert(conn),
            "conn {conn:?} closed twice"
        );
        if let Some(Some(relay)) = self.conns.get(&conn) {
            assert!(
                self.open.contains_key(relay),
                "conn {conn:?} closed after its listener"
            );
        }
        self.conns.remove(&conn);
    }
}

struct Harness {
    server: Server,
    shared: Arc<Shared>,
    io: FakeIo,
    t0: Instant,
    elapsed: Duration,
    /// Latest NONCE per client IP (the core binds nonces to the IP).
    nonces: BTreeMap<IpAddr, Vec<u8>>,
    last_txid: HashMap<FiveTuple, [u8; 12]>,
    txid_counter: u64,
    tokens: Vec<[u8; 8]>,
    conn_ids: Vec<ConnId>,
    /// TCP/TLS client connections that became data connections (raw bytes from then on).
    bound: HashMap<FiveTuple, ConnId>,
    /// Clients that got an Allocate success (some may have lost it since).
    allocated: Vec<FiveTuple>,
    out: Vec<u8>,
    relays: Vec<RelayAddr>,
    tweak: Setup,
}

fn config(s: &Setup, strict: bool, rotate: bool, tcp_relay: bool) -> Config {
    let mut cfg = Config::default();
    cfg.turn.auth_secrets = if rotate {
        vec![SECRET.into()]
    } else {
        vec![SECRET.into(), OLD_SECRET.into()]
    };
    cfg.turn.users = vec![StaticUser {
        name: STATIC_USER.into(),
        password: Some(STATIC_PASSWORD.into()),
        key: None,
    }];
    cfg.turn.realm = REALM.into();
    cfg.turn.min_port = 50000;
    cfg.turn.max_port = if s.small_ports { 50007 } else { 50099 };
    cfg.turn.unauth_burst = if s.small_rate { 3 } else { 100_000 };
    cfg.turn.unauth_rate_per_sec = if s.small_rate { 1 } else { 100_000 };
    cfg.turn.workers = 1;
    cfg.turn.strict_expiry = strict;
    cfg.turn.tcp_relay = tcp_relay;
    cfg.turn.user_quota = u32::from(s.user_quota % 8) + 1;
    cfg.turn.total_quota = u32::from(s.total_quota % 16) + 1;
    cfg.turn.tcp_relay_max_connections = u32::from(s.max_tcp_conns % 6) + 1;
    cfg
}

fn tuple(client: u8, tr: Tr) -> FiveTuple {
    let ip: IpAddr = CLIENT_IPS[usize::from(client) % CLIENT_IPS.len()]
        .parse()
        .unwrap();
    let port = 40000 + u16::from(client / 3 % 6);
    let server: SocketAddr = if ip.is_ipv4() {
        "192.0.2.1:3478".parse().unwrap()
    } else {
        "[2001:db8::1]:3478".parse().unwrap()
    };
    FiveTuple {
        transport: match tr {
            Tr::Udp => Transport::Udp,
            Tr::Tcp => Transport::Tcp,
            Tr::Tls => Transport::Tls,
        },
        client: SocketAddr::new(ip, port),
        server,
    }
}

fn peer(i: u8) -> SocketAddr {
    PEERS[usize::from(i) % PEERS.len()].parse().unwrap()
}

/// Values of attribute `t` in a message we trust to be well formed (our own answers).
fn attrs(msg: &[u8], t: u16) -> Vec<&[u8]> {
    attributes(msg)
        .filter(|a| a.ty == t)
        .filter_map(|a| a.value)
        .collect()
}

impl Harness {
    fn new(s: Setup) -> Harness {
        let mut relays = vec![RelayAddr {
            local: "192.0.2.10".parse().unwrap(),
            advertised: "198.51.100.10".parse().unwrap(),
        }];
        if s.dual_stack {
            relays.push(RelayAddr {
                local: "2001:db8::10".parse().unwrap(),
                advertised: "2001:db8::10".parse().unwrap(),
            });
        }
        let cfg = config(&s, s.strict_expiry, false, s.tcp_relay);
        let sc = Arc::new(ServerConfig::from_config(&cfg, relays.clone()).expect("valid config"));
        let shared = Arc::new(Shared::new(&sc));
        let mut server = Server::new(sc, shared.clone());
        server.set_shard_index(s.shard);
        Harness {
            server,
            shared,
            io: FakeIo::default(),
            t0: Instant::now(),
            elapsed: Duration::ZERO,
            nonces: BTreeMap::new(),
            last_txid: HashMap::new(),
            txid_counter: 0,
            tokens: Vec::new(),
            conn_ids: Vec::new(),
            bound: HashMap::new(),
            allocated: Vec::new(),
            out: vec![0; OUT_LEN],
            relays,
            tweak: s,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.t0 + self.elapsed,
            unix_secs: T0_UNIX + self.elapsed.as_secs(),
        }
    }

    /// Moves the clock on, running timers as they fall due (as the driver's poll loop).
    fn advance(&mut self, secs: u64) {
        let end = self.elapsed + Duration::from_secs(secs);
        let mut rounds = 0u32;
        while let Some(t) = self.server.poll_timeout() {
            if t > self.t0 + end {
                break;
            }
            rounds += 1;
            assert!(rounds < 1_000_000, "timers never settle");
            self.elapsed = self.elapsed.max(t.saturating_duration_since(self.t0));
            let now = self.now();
            self.server.handle_timeout(now, &mut self.io);
            self.drain();
        }
        self.elapsed = end;
    }

    /// Carries out what the core queued outside a request (timers, RFC 6062 events,
    /// closes): messages for clients must be valid STUN (ids are remembered); an answer
    /// (`Reply`, `Forward`, `BindData`) only ever follows `handle_stun`.
    fn drain(&mut self) {
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::Send { msg, .. } => self.learn(&msg),
                Output::CloseRelay(r) => self.io.close_relay(r),
                Output::ClosePeerConn(c) => self.io.close_tcp_conn(c),
                o @ (Output::Reply { .. } | Output::Forward { .. } | Output::BindData { .. }) => {
                    panic!("an answer outside a request: {o:?}")
                }
            }
        }
    }

    fn learn(&mut self, m: &[u8]) {
        assert_eq!(classify(m), Kind::Stun, "the core wrote a non-STUN message");
        Message::from_bytes(m).expect("the core's message parses, FINGERPRINT ok");
        for t in attrs(m, attr::RESERVATION_TOKEN) {
            if let Ok(b) = <[u8; 8]>::try_from(t) {
                if self.tokens.len() < 16 {
                    self.tokens.push(b);
                }
            }
        }
        for c in attrs(m, attr::CONNECTION_ID) {
            if let Ok(b) = <[u8; 4]>::try_from(c) {
                let id = ConnId::from_wire(u32::from_be_bytes(b));
                if self.conn_ids.len() < 32 && !self.conn_ids.contains(&id) {
                    self.conn_ids.push(id);
                }
            }
        }
    }

    /// One STUN message from a client, as the driver hands it to the core.
    fn stun(&mut self, from: FiveTuple, msg: &[u8]) -> Option<Vec<u8>> {
        if self.bound.contains_key(&from) {
            return None;
        }
        let now = self.now();
        self.server
            .handle_stun(now, from, msg, &mut self.out, &mut self.io);
        // The answer, if any, comes last and alone (the module contract).
        let mut reply = None;
        let mut answered = false;
        while let Some(o) = self.server.poll_output() {
            assert!(!answered, "output after the answer: {o:?}");
            match o {
                Output::Send { msg, .. } => self.learn(&msg),
                Output::CloseRelay(r) => self.io.close_relay(r),
                Output::ClosePeerConn(c) => self.io.close_tcp_conn(c),
                Output::Reply { len } => {
                    answered = true;
                    assert!(len <= OUT_LEN);
                    reply = Some(self.out[..len].to_vec());
                }
                Output::Forward {
                    relay,
                    peer,
                    payload,
                } => {
                    answered = true;
                    assert!(payload.end <= msg.len() && payload.start <= payload.end);
                    assert!(
                        self.io.open.contains_key(&(relay.index() as u32)),
                        "forward on a closed relay"
                    );
                    assert_eq!(
                        self.io.open[&(relay.index() as u32)].is_ipv4(),
                        peer.is_ipv4(),
                        "forward to a peer of the other family"
                    );
                }
                Output::BindData { conn, len } => {
                    answered = true;
                    assert!(len <= OUT_LEN);
                    assert_ne!(from.transport, Transport::Udp, "BindData over UDP");
                    self.bound.insert(from, conn);
                    reply = Some(self.out[..len].to_vec());
                }
            }
        }
        if let Some(r) = &reply {
            self.learn(r);
            let allocate_ok = message_type(method::ALLOCATE, class::SUCCESS);
            if r[..2] == allocate_ok.to_be_bytes() && !self.allocated.contains(&from) {
                self.allocated.push(from);
            }
            if let Some(n) = attrs(r, attr::NONCE).first() {
                self.nonces.insert(from.client.ip(), n.to_vec());
            }
        }
        reply
    }

    fn datagram(&mut self, from: FiveTuple, d: &[u8]) {
        match classify(d) {
            Kind::Stun => {
                self.stun(from, d);
            }
            Kind::ChannelData { channel, .. } => self.channel_data(from, channel),
            Kind::Invalid => {}
        }
    }

    fn stream(&mut self, from: FiveTuple, mut rest: &[u8]) {
        // A bound data connection carries raw bytes: nothing for the core.
        while !self.bound.contains_key(&from) {
            let n = match tcp_frame_len(rest) {
                Ok(Some(n)) => n,
                Ok(None) => return,
                // The driver closes the connection: its allocation goes.
                Err(_) => {
                    self.client_closed(from);
                    return;
                }
            };
            let frame = &rest[..n];
            match classify(frame) {
                Kind::Stun => {
                    self.stun(from, frame);
                }
                Kind::ChannelData { channel, .. } => self.channel_data(from, channel),
                Kind::Invalid => panic!("a whole TCP frame does not classify"),
            }
            rest = &rest[n..];
        }
    }

    fn channel_data(&mut self, from: FiveTuple, channel: ChannelNumber) {
        if let Some((relay, peer)) = self.server.channel_to_peer(&from, channel) {
            assert!(
                self.io.open.contains_key(&(relay.index() as u32)),
                "channel on a closed relay"
            );
            assert_eq!(
                self.io.open[&(relay.index() as u32)].is_ipv4(),
                peer.is_ipv4()
            );
        }
    }

    fn client_closed(&mut self, from: FiveTuple) {
        if from.transport == Transport::Udp {
            return;
        }
        let now = self.now();
        match self.bound.remove(&from) {
            // A data connection takes its peer connection along.
            Some(conn) => {
                if self.io.conns.contains_key(&conn) {
                    self.io.conns.remove(&conn);
                    self.io.closed_by_driver.insert(conn);
                    self.server.tcp_conn_closed(conn);
                }
            }
            None => self.server.client_closed(&from, now, &mut self.io),
        }
        self.drain();
    }

    fn nonce_for(&mut self, from: FiveTuple) -> Vec<u8> {
        if let Some(n) = self.nonces.get(&from.client.ip()) {
            return n.clone();
        }
        // Fetch one as a client does: an unauthenticated request answered 401.
        let mut buf = [0u8; 64];
        let mut w = MessageWriter::new(
            &mut buf,
            message_type(method::REFRESH, class::REQUEST),
            self.fresh_txid(),
        )
        .unwrap();
        w.attr_u32(attr::LIFETIME, 600).unwrap();
        let n = w.finish_with_fingerprint().unwrap();
        let msg = buf[..n].to_vec();
        self.stun(from, &msg);
        self.nonces
            .get(&from.client.ip())
            .cloned()
            .unwrap_or_default()
    }

    fn fresh_txid(&mut self) -> [u8; 12] {
        self.txid_counter += 1;
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.txid_counter.to_be_bytes());
        t
    }

    fn request(&mut self, r: &Request) {
        self.request_from(tuple(r.client, r.tr), r)
    }

    fn request_from(&mut self, from: FiveTuple, r: &Request) {
        let txid = match (r.retransmit, self.last_txid.get(&from)) {
            (true, Some(t)) => *t,
            _ => self.fresh_txid(),
        };
        self.last_txid.insert(from, txid);
        let meth = match r.method {
            Method::Binding => method::BINDING,
            Method::Allocate => method::ALLOCATE,
            Method::Refresh => method::REFRESH,
            Method::CreatePermission => method::CREATE_PERMISSION,
            Method::ChannelBind => method::CHANNEL_BIND,
            Method::Send => method::SEND,
            Method::Connect => method::CONNECT,
            Method::ConnectionBind => method::CONNECTION_BIND,
            Method::Other(m) => m & 0x0FFF,
        };
        let cls = if r.indication {
            class::INDICATION
        } else {
            class::REQUEST
        };
        let nonce = match r.auth {
            Auth::None => Vec::new(),
            _ => self.nonce_for(from),
        };
        let msg = self.encode(r, meth, cls, txid, &nonce);
        let mut msg = msg;
        if let Some((at, x)) = r.corrupt {
            let i = usize::from(at) % msg.len();
            msg[i] ^= x;
        }
        let reply = self.stun(from, &msg);
        // Stale nonce: retry once with the fresh one, as clients do (RFC 8489 §9.2.5).
        let stale = reply.as_deref().is_some_and(|b| error_code(b) == Some(438));
        if stale && r.corrupt.is_none() && !matches!(r.auth, Auth::None) {
            let nonce = self
                .nonces
                .get(&from.client.ip())
                .cloned()
                .unwrap_or_default();
            let msg = self.encode(r, meth, cls, txid, &nonce);
            self.stun(from, &msg);
        }
    }

    fn encode(&self, r: &Request, meth: u16, cls: u16, txid: [u8; 12], nonce: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(&mut buf, message_type(meth, cls), txid).unwrap();
        for a in r.attrs.iter().take(24) {
            let _ = match a {
                A::Transport(p) => w.attr(attr::REQUESTED_TRANSPORT, &[*p, 0, 0, 0]),
                A::Udp => w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
                A::Tcp => w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]),
                A::Lifetime(l) => w.attr_u32(attr::LIFETIME, *l),
                A::ShortLifetime(l) => w.attr_u32(attr::LIFETIME, u32::from(*l)),
                A::Peer(p) => w.xor_addr(attr::XOR_PEER_ADDRESS, peer(*p)),
                A::Channel(c) => {
                    let b = c.to_be_bytes();
                    w.attr(attr::CHANNEL_NUMBER, &[b[0], b[1], 0, 0])
                }
                A::ChannelIdx(i) => {
                    let b = (0x4000 + u16::from(*i % 4)).to_be_bytes();
                    w.attr(attr::CHANNEL_NUMBER, &[b[0], b[1], 0, 0])
                }
                A::EvenPort(r) => w.attr(attr::EVEN_PORT, &[if *r { 0x80 } else { 0 }, 0, 0, 0]),
                A::Token(i) => match self.tokens.get(usize::from(*i) % self.tokens.len().max(1)) {
                    Some(t) => w.attr(attr::RESERVATION_TOKEN, t),
                    None => Ok(()),
                },
                A::RawToken(t) => w.attr(attr::RESERVATION_TOKEN, t),
                A::Family(f) => w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f % 3, 0, 0, 0]),
                A::AdditionalFamily(f) => {
                    w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[*f % 3, 0, 0, 0])
                }
                A::DontFragment => w.attr(attr::DONT_FRAGMENT, &[]),
                A::ConnId(i) => match self
                    .conn_ids
                    .get(usize::from(*i) % self.conn_ids.len().max(1))
                {
                    Some(c) => w.attr_u32(attr::CONNECTION_ID, c.to_wire()),
                    None => Ok(()),
                },
                A::RawConnId(c) => w.attr_u32(attr::CONNECTION_ID, *c),
                A::Data(d) => w.attr(attr::DATA, d),
                A::Raw(t, v) => match *t {
                    // Our own integrity and fingerprint go last, below.
                    attr::MESSAGE_INTEGRITY
                    | attr::MESSAGE_INTEGRITY_SHA256
                    | attr::FINGERPRINT => Ok(()),
                    t => w.attr(t, v),
                },
            };
        }
        let rest = |bob: bool, expired: bool| {
            let user = if bob { "bob" } else { "alice" };
            // Expired: minted long ago with a short ttl.
            let (ttl, minted) = if expired {
                (60, T0_UNIX - 3600)
            } else {
                (86400 * 30, T0_UNIX)
            };
            mint_rest_credential(SECRET, user, ttl, minted, ":")
        };
        let signed = match r.auth {
            Auth::None => None,
            Auth::Rest {
                bob,
                expired,
                old_secret,
            } => {
                let mut c = rest(bob, expired);
                if old_secret {
                    c.password = tern::turn::auth::rest_password(OLD_SECRET, &c.username);
                }
                let key = Key::md5(&c.username, REALM, &c.password);
                Some((Some(c.username), key, false))
            }
            Auth::Static { userhash, sha256 } => {
                let key = if sha256 {
                    Key::sha256(STATIC_USER, REALM, STATIC_PASSWORD)
                } else {
                    Key::md5(STATIC_USER, REALM, STATIC_PASSWORD)
                };
                if userhash {
                    let h: [u8; 32] = Sha256::new()
                        .chain_update(STATIC_USER)
                        .chain_update(":")
                        .chain_update(REALM)
                        .finalize()
                        .into();
                    let _ = w.attr(attr::USERHASH, &h);
                    Some((None, key, sha256))
                } else {
                    Some((Some(STATIC_USER.to_string()), key, sha256))
                }
            }
            Auth::WrongKey => {
                let c = rest(false, false);
                Some((Some(c.username), Key::md5("x", REALM, "y"), false))
            }
        };
        if let Some((user, key, sha256)) = signed {
            if let Some(u) = user {
                let _ = w.attr(attr::USERNAME, u.as_bytes());
            }
            let _ = w.attr(attr::REALM, REALM.as_bytes());
            let _ = w.attr(attr::NONCE, nonce);
            let _ = if sha256 {
                w.integrity_sha256(key.as_bytes())
            } else {
                w.integrity_sha1(key.as_bytes())
            };
        }
        let n = match w.finish_with_fingerprint() {
            Ok(n) => n,
            Err(_) => return buf[..20].to_vec(),
        };
        buf.truncate(n);
        buf
    }

    /// A signed request (a Send indication for `Method::Send`) from a client that got an
    /// allocation.
    fn on_allocation(&mut self, alloc: u8, method: Method, attrs: Vec<A>) {
        let from = self.allocated[usize::from(alloc) % self.allocated.len().max(1)..]
            .first()
            .copied();
        let Some(from) = from else {
            return;
        };
        let mut r = signed(0, Tr::Udp, method, attrs);
        if matches!(method, Method::Send) {
            r.auth = Auth::None;
            r.indication = true;
        }
        self.request_from(from, &r);
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::Datagram { client, bytes } => self.datagram(tuple(*client, Tr::Udp), bytes),
            Op::Stream { client, tls, bytes } => {
                let tr = if *tls { Tr::Tls } else { Tr::Tcp };
                self.stream(tuple(*client, tr), bytes)
            }
            Op::Request(r) => self.request(r),
            Op::Allocate {
                client,
                tr,
                tcp,
                dual,
                even,
            } => {
                let mut attrs = vec![if *tcp { A::Tcp } else { A::Udp }];
                if *dual {
                    attrs.push(A::AdditionalFamily(2));
                }
                if *even {
                    attrs.push(A::EvenPort(true));
                }
                self.request(&signed(*client, *tr, Method::Allocate, attrs))
            }
            Op::Permit { alloc, peer } => {
                self.on_allocation(*alloc, Method::CreatePermission, vec![A::Peer(*peer)])
            }
            Op::Bind {
                alloc,
                peer,
                channel,
            } => self.on_allocation(
                *alloc,
                Method::ChannelBind,
                vec![A::Peer(*peer), A::ChannelIdx(*channel)],
            ),
            Op::SendTo { alloc, peer, data } => self.on_allocation(
                *alloc,
                Method::Send,
                vec![A::Peer(*peer), A::Data(data.clone())],
            ),
            Op::Refresh { alloc, lifetime } => {
                let l = if *lifetime == 0 {
                    0
                } else {
                    u32::from(*lifetime) * 16
                };
                self.on_allocation(*alloc, Method::Refresh, vec![A::Lifetime(l)])
            }
            Op::Connect { alloc, peer } => {
                self.on_allocation(*alloc, Method::Connect, vec![A::Peer(*peer)])
            }
            Op::ConnectionBind { client, tls, conn } => {
                let tr = if *tls { Tr::Tls } else { Tr::Tcp };
                self.request(&signed(
                    *client,
                    tr,
                    Method::ConnectionBind,
                    vec![A::ConnId(*conn)],
                ))
            }
            Op::ChannelData {
                client,
                tr,
                channel,
                len,
            } => {
                let ch = 0x4000 + u16::from(*channel % 4);
                let mut d = vec![0u8; CHANNEL_DATA_HEADER + usize::from(*len)];
                d[..2].copy_from_slice(&ch.to_be_bytes());
                d[2..4].copy_from_slice(&u16::from(*len).to_be_bytes());
                let from = tuple(*client, *tr);
                match tr {
                    Tr::Udp => self.datagram(from, &d),
                    _ => {
                        d.resize(pad4(d.len()), 0);
                        self.stream(from, &d)
                    }
                }
            }
            Op::PeerDatagram { relay, peer: p } => {
                let Some(relay) = nth_relay(self.io.open.keys(), *relay) else {
                    return;
                };
                if let Some(route) = self.server.peer_to_client(relay, peer(*p)) {
                    assert!(
                        self.server.has_allocation(&route.client),
                        "peer data routed to a client without an allocation"
                    );
                    if let Some(c) = route.channel {
                        // The channel goes both ways.
                        assert_eq!(
                            self.server.channel_to_peer(&route.client, c),
                            Some((relay, peer(*p)))
                        );
                    }
                }
            }
            Op::ConnectDone { conn, ok } => {
                let connecting: Vec<ConnId> = self
                    .io
                    .conns
                    .iter()
                    .filter(|(_, r)| r.is_some())
                    .map(|(c, _)| *c)
                    .collect();
                let Some(&c) = connecting.get(usize::from(*conn) % connecting.len().max(1)) else {
                    return;
                };
                let now = self.now();
                let keep = self.server.tcp_connect_done(now, c, *ok);
                if keep {
                    // Connected: no longer connecting, now waiting for its bind.
                    self.io.conns.insert(c, None);
                } else {
                    // The driver closes the socket itself.
                    self.io.conns.remove(&c);
                    self.io.closed_by_driver.insert(c);
                }
                self.drain();
            }
            Op::PeerAccepted { relay, peer: p } => {
                let Some(relay) = nth_relay(self.io.tcp_listeners.iter(), *relay) else {
                    return;
                };
                let now = self.now();
                if let Some(c) = self.server.tcp_peer_accepted(now, relay, peer(*p)) {
                    assert!(
                        !self.io.conns.contains_key(&c),
                        "conn {c:?} handed out twice"
                    );
                    self.io.closed_by_core.remove(&c);
                    self.io.closed_by_driver.remove(&c);
                    self.io.conns.insert(c, None);
                }
                self.drain();
            }
            Op::ConnClosed { conn } => {
                let live: Vec<ConnId> = self.io.conns.keys().copied().collect();
                let Some(&c) = live.get(usize::from(*conn) % live.len().max(1)) else {
                    return;
                };
                self.io.conns.remove(&c);
                self.io.closed_by_driver.insert(c);
                self.bound.retain(|_, b| *b != c);
                self.server.tcp_conn_closed(c);
                self.drain();
            }
            Op::ClientClosed { client, tls } => {
                let tr = if *tls { Tr::Tls } else { Tr::Tcp };
                self.client_closed(tuple(*client, tr));
            }
            Op::Advance { secs } => self.advance(u64::from(*secs)),
            Op::Draining(on) => self.shared.set_draining(*on),
            Op::IoFaults {
                fail_open,
                fail_connect,
            } => {
                self.io.fail_open = *fail_open;
                self.io.fail_connect = *fail_connect;
            }
            Op::Reload {
                strict_expiry,
                rotate,
                tcp_relay,
            } => {
                let cfg = config(&self.tweak, *strict_expiry, *rotate, *tcp_relay);
                let sc = ServerConfig::from_config(&cfg, self.relays.clone()).expect("valid");
                self.server.set_config(Arc::new(sc));
            }
        }
    }

    /// The gauges agree with the tables.
    fn check(&self) {
        let s = self.server.stats();
        assert_eq!(s.allocations_active, self.server.allocation_count() as u64);
        let by: u64 = s.allocations_by.iter().flatten().sum();
        assert_eq!(by, s.allocations_active, "allocations_by disagrees");
        let perms: u64 = s.permissions_by.iter().flatten().sum();
        assert_eq!(perms, s.permissions_active, "permissions_by disagrees");
        let chans: u64 = s.channels_by.iter().flatten().sum();
        assert_eq!(chans, s.channels_active, "channels_by disagrees");
        assert!(s.tcp_allocations <= s.allocations_active);
        // Every peer connection the driver holds is one the core counts.
        let conns: u64 = s.tcp_conns_by_state.iter().sum();
        assert_eq!(
            self.io.conns.len() as u64,
            conns,
            "driver holds {} peer connections, core counts {conns}",
            self.io.conns.len()
        );
        assert!(self.shared.total_allocations() as usize >= self.server.allocation_count());
    }

    /// After every lifetime has run out, nothing may be left.
    fn check_empty(&mut self) {
        // TCP/TLS control connections that stay open keep nothing alive past its lifetime.
        self.advance(7 * 86400);
        assert_eq!(
            self.server.allocation_count(),
            0,
            "allocations outlived their lifetime"
        );
        let s = self.server.stats();
        assert_eq!(s.allocations_active, 0);
        assert_eq!(s.permissions_active, 0, "permission gauge leaked");
        assert_eq!(s.channels_active, 0, "channel gauge leaked");
        assert_eq!(s.tcp_allocations, 0, "TCP allocation gauge leaked");
        assert_eq!(s.tcp_conns_by_state, [0; 3], "peer connection gauge leaked");
        assert!(
            self.io.open.is_empty(),
            "relay sockets leaked: {:?}",
            self.io.open
        );
        assert!(
            self.io.conns.is_empty(),
            "peer connections leaked: {:?}",
            self.io.conns
        );
        assert_eq!(self.shared.total_allocations(), 0, "quota leaked");
    }
}

/// The relay the fuzzer's index `i` names among `ids` (the driver's relay table slots).
fn nth_relay<'a>(ids: impl ExactSizeIterator<Item = &'a u32>, i: u8) -> Option<RelayId> {
    let n = ids.len().max(1);
    ids.copied()
        .nth(usize::from(i) % n)
        .map(|r| RelayId::from_index(r as usize))
}

/// A request signed as alice with a valid REST credential.
fn signed(client: u8, tr: Tr, method: Method, attrs: Vec<A>) -> Request {
    Request {
        client,
        tr,
        method,
        indication: false,
        auth: Auth::Rest {
            bob: false,
            expired: false,
            old_secret: false,
        },
        retransmit: false,
        attrs,
        corrupt: None,
    }
}

fn error_code(msg: &[u8]) -> Option<u16> {
    let v = *attrs(msg, attr::ERROR_CODE).first()?;
    (v.len() >= 4).then(|| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(input.setup);
    for op in input.ops.iter().take(256) {
        h.op(op);
        // The driver closes the data connection of a peer connection the core closed.
        let conns = &h.io.conns;
        h.bound.retain(|_, c| conns.contains_key(c));
        h.check();
    }
    if std::env::var_os("TURN_CORE_STATS").is_some() {
        // How deep an input got (for judging the corpus): `TURN_CORE_STATS=1 <binary> corpus/turn_core -runs=0`.
        let s = h.server.stats();
        eprintln!(
            "allocs {} perms {} chans {} sends {} tcp_allocs_ok {} connects {:?} incoming {:?} binds {:?} reservations {}",
            s.allocations_created,
            s.permissions_created,
            s.channels_created,
            s.sends_forwarded,
            s.tcp_connects[0] + s.tcp_connects[1] + s.tcp_connects[2],
            s.tcp_connects,
            s.tcp_peer_incoming,
            s.tcp_binds,
            s.reservations_created
        );
    }
    h.check_empty();
});
