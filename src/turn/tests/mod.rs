//! The TURN core driven with a simulated clock and a fake RelayIo: every lifetime, refresh,
//! rebind, reservation, quota, nonce, strict-expiry and policy case, and each error code.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun_types::message::Message;

use super::auth::{mint_rest_credential, Key};
use super::stats::{AuthFailure, MethodLabel};
use super::*;
use crate::config::{Config, StaticUser};
use crate::stun::{attr, class, message_type, method, MessageWriter, MAGIC_COOKIE};

/// Channel number `n` (valid in every test that uses it).
pub(super) fn ch(n: u16) -> ChannelNumber {
    ChannelNumber::new(n).unwrap()
}

mod tcp;
mod usage;

pub(super) const SECRET: &str = "test-secret";
pub(super) const REALM: &str = "tern";
pub(super) const RELAY_V4: &str = "192.0.2.10";
pub(super) const ADV_V4: &str = "198.51.100.10";
pub(super) const RELAY_V6: &str = "2001:db8::10";
pub(super) const PEER: &str = "8.8.8.8:5000";
pub(super) const PEER2: &str = "1.1.1.1:6000";
pub(super) const T0_UNIX: u64 = 1_800_000_000;

#[derive(Default)]
pub(super) struct FakeIo {
    pub(super) next: u32,
    pub(super) open: HashMap<RelayId, SocketAddr>,
    pub(super) busy: HashSet<SocketAddr>,
    pub(super) fail_all: bool,
    /// RFC 6062: which open relays are TCP listeners, the connects started (relay, peer,
    /// conn), and the peer connections closed by the core.
    pub(super) tcp_listeners: HashSet<RelayId>,
    pub(super) connects: Vec<(RelayId, SocketAddr, ConnId)>,
    pub(super) closed_conns: Vec<ConnId>,
    /// `tcp_connect` fails to start.
    pub(super) fail_connect: bool,
    /// A driver without TCP relays: `open_tcp_relay` is unsupported.
    pub(super) no_tcp: bool,
    /// What each relay carried, as `RelayIo::usage` reports it (usage accounting tests).
    pub(super) usage: HashMap<RelayId, RelayUsage>,
}

impl RelayIo for FakeIo {
    fn open_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId> {
        if self.fail_all {
            return Err(std::io::Error::other("no sockets"));
        }
        if self.busy.contains(&addr) || self.open.values().any(|a| *a == addr) {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        self.next += 1;
        let id = RelayId::from_index(self.next as usize);
        self.open.insert(id, addr);
        Ok(id)
    }
    fn open_tcp_relay(&mut self, addr: SocketAddr) -> std::io::Result<RelayId> {
        if self.no_tcp {
            return Err(std::io::ErrorKind::Unsupported.into());
        }
        let id = self.open_relay(addr)?;
        self.tcp_listeners.insert(id);
        Ok(id)
    }
    fn tcp_connect(
        &mut self,
        relay: RelayId,
        peer: SocketAddr,
        conn: ConnId,
    ) -> std::io::Result<()> {
        assert!(
            self.tcp_listeners.contains(&relay),
            "connect from a non-TCP relay"
        );
        if self.fail_connect {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        self.connects.push((relay, peer, conn));
        Ok(())
    }
    fn usage(&self, relay: RelayId) -> RelayUsage {
        self.usage.get(&relay).copied().unwrap_or_default()
    }
}

/// What the driver does with `Output::CloseRelay` and `Output::ClosePeerConn`.
impl FakeIo {
    fn close_relay(&mut self, relay: RelayId) {
        assert!(self.open.remove(&relay).is_some(), "closing unknown relay");
        self.tcp_listeners.remove(&relay);
    }
    fn close_tcp_conn(&mut self, conn: ConnId) {
        if let Some((relay, _, _)) = self.connects.iter().find(|c| c.2 == conn) {
            assert!(
                self.open.contains_key(relay),
                "conn {conn:?} closed after its listener"
            );
        }
        assert!(
            !self.closed_conns.contains(&conn),
            "conn {conn:?} closed twice"
        );
        self.closed_conns.push(conn);
    }
}

/// A parsed response.
pub(super) struct Resp {
    pub(super) bytes: Vec<u8>,
}

impl Resp {
    pub(super) fn msg(&self) -> Message<'_> {
        Message::from_bytes(&self.bytes).expect("response parses, FINGERPRINT ok")
    }
    /// 0 for success, else the ERROR-CODE.
    pub(super) fn code(&self) -> u16 {
        let t = u16::from_be_bytes([self.bytes[0], self.bytes[1]]);
        if t & 0x0110 == class::SUCCESS {
            return 0;
        }
        assert_eq!(t & 0x0110, class::ERROR);
        let v = self.attr(attr::ERROR_CODE).expect("ERROR-CODE");
        v[2] as u16 * 100 + v[3] as u16
    }
    pub(super) fn attrs(&self, t: u16) -> Vec<Vec<u8>> {
        crate::stun::attributes(&self.bytes)
            .filter(|a| a.ty == t)
            .map(|a| a.value.expect("attribute fits").to_vec())
            .collect()
    }
    pub(super) fn attr(&self, t: u16) -> Option<Vec<u8>> {
        self.attrs(t).into_iter().next()
    }
    pub(super) fn has(&self, t: u16) -> bool {
        self.attr(t).is_some()
    }
    pub(super) fn xor_addrs(&self, t: u16) -> Vec<SocketAddr> {
        self.attrs(t)
            .iter()
            .map(|v| unxor(v, &self.bytes[8..20]))
            .collect()
    }
    pub(super) fn lifetime(&self) -> u32 {
        u32::from_be_bytes(self.attr(attr::LIFETIME).unwrap().try_into().unwrap())
    }
    pub(super) fn nonce(&self) -> Vec<u8> {
        self.attr(attr::NONCE).expect("NONCE")
    }
    pub(super) fn verifies_with(&self, key: &Key) -> bool {
        crate::stun::verify_integrity(&self.bytes, key.as_bytes()).is_ok()
    }
}

pub(super) fn unxor(v: &[u8], txid: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(txid);
    let ip: IpAddr = if v[1] == 1 {
        let o: [u8; 4] = std::array::from_fn(|i| v[4 + i] ^ key[i]);
        o.into()
    } else {
        let o: [u8; 16] = std::array::from_fn(|i| v[4 + i] ^ key[i]);
        o.into()
    };
    SocketAddr::new(ip, port)
}

/// A request a test client sends.
#[derive(Clone)]
pub(super) struct Req {
    pub(super) method: u16,
    pub(super) class: u16,
    pub(super) txid: [u8; 12],
    pub(super) attrs: Vec<(u16, Vec<u8>)>,
    pub(super) peers: Vec<SocketAddr>,
    pub(super) data: Option<Vec<u8>>,
}

impl Req {
    pub(super) fn new(method: u16) -> Req {
        Req {
            method,
            class: class::REQUEST,
            txid: rand::random(),
            attrs: Vec::new(),
            peers: Vec::new(),
            data: None,
        }
    }
    pub(super) fn attr(mut self, t: u16, v: &[u8]) -> Req {
        self.attrs.push((t, v.to_vec()));
        self
    }
    pub(super) fn u32(self, t: u16, v: u32) -> Req {
        self.attr(t, &v.to_be_bytes())
    }
    pub(super) fn udp(self) -> Req {
        self.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
    }
    pub(super) fn peer(mut self, p: &str) -> Req {
        self.peers.push(p.parse().unwrap());
        self
    }
    pub(super) fn channel(self, n: u16) -> Req {
        let b = n.to_be_bytes();
        self.attr(attr::CHANNEL_NUMBER, &[b[0], b[1], 0, 0])
    }
    /// Encodes, signed when `auth` is given (username, key, nonce).
    pub(super) fn encode(&self, auth: Option<(&str, &Key, &[u8])>) -> Vec<u8> {
        match auth {
            None => self.write(&[], None),
            Some((user, key, nonce)) => {
                let creds: [(u16, &[u8]); 3] = [
                    (attr::USERNAME, user.as_bytes()),
                    (attr::REALM, REALM.as_bytes()),
                    (attr::NONCE, nonce),
                ];
                self.write(&creds, Some((key, false)))
            }
        }
    }

    /// Encodes with exactly the attributes given (no USERNAME, REALM or NONCE added),
    /// signed with `key`: MESSAGE-INTEGRITY-SHA256 when `sha256`, else MESSAGE-INTEGRITY.
    pub(super) fn signed(&self, key: &Key, sha256: bool) -> Vec<u8> {
        self.write(&[], Some((key, sha256)))
    }

    fn write(&self, extra: &[(u16, &[u8])], sign: Option<(&Key, bool)>) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w =
            MessageWriter::new(&mut buf, message_type(self.method, self.class), self.txid).unwrap();
        for (t, v) in &self.attrs {
            w.attr(*t, v).unwrap();
        }
        for p in &self.peers {
            w.xor_addr(attr::XOR_PEER_ADDRESS, *p).unwrap();
        }
        if let Some(d) = &self.data {
            w.attr(attr::DATA, d).unwrap();
        }
        for (t, v) in extra {
            w.attr(*t, v).unwrap();
        }
        match sign {
            Some((key, true)) => w.integrity_sha256(key.as_bytes()).unwrap(),
            Some((key, false)) => w.integrity_sha1(key.as_bytes()).unwrap(),
            None => {}
        }
        let n = w.finish_with_fingerprint().unwrap();
        buf.truncate(n);
        buf
    }
}

pub(super) struct H {
    pub(super) server: Server,
    pub(super) shared: Arc<Shared>,
    pub(super) io: FakeIo,
    pub(super) t0: Instant,
    pub(super) elapsed: Duration,
    pub(super) nonce: Vec<u8>,
    /// `Output::Send` messages the core made outside a request, oldest first.
    pub(super) sent: Vec<(FiveTuple, Vec<u8>)>,
}

pub(super) fn client(n: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::new("203.0.113.5".parse().unwrap(), 40000 + n),
        server: "192.0.2.1:3478".parse().unwrap(),
    }
}

pub(super) fn cred(user: &str, ttl: u64) -> (String, Key) {
    let c = mint_rest_credential(SECRET, user, ttl, T0_UNIX, ":");
    let key = Key::md5(&c.username, REALM, &c.password);
    (c.username, key)
}

impl H {
    pub(super) fn new(tweak: impl FnOnce(&mut Config)) -> H {
        Self::with_relays(tweak, vec![(RELAY_V4, ADV_V4)])
    }

    pub(super) fn with_relays(tweak: impl FnOnce(&mut Config), relays: Vec<(&str, &str)>) -> H {
        let mut cfg = Config::default();
        cfg.turn.auth_secrets = vec![SECRET.into()];
        cfg.turn.realm = REALM.into();
        cfg.turn.min_port = 50000;
        cfg.turn.max_port = 50099;
        cfg.turn.unauth_burst = 1000;
        cfg.turn.unauth_rate_per_sec = 1000;
        cfg.turn.workers = 1;
        tweak(&mut cfg);
        let relay = relays
            .iter()
            .map(|(l, a)| RelayAddr {
                local: l.parse().unwrap(),
                advertised: a.parse().unwrap(),
            })
            .collect();
        let sc = Arc::new(ServerConfig::from_config(&cfg, relay).unwrap());
        let shared = Arc::new(Shared::new(&sc));
        H {
            server: Server::new(sc, shared.clone()),
            shared,
            io: FakeIo::default(),
            t0: Instant::now(),
            elapsed: Duration::ZERO,
            nonce: Vec::new(),
            sent: Vec::new(),
        }
    }

    pub(super) fn now(&self) -> Now {
        Now {
            mono: self.t0 + self.elapsed,
            unix_secs: T0_UNIX + self.elapsed.as_secs(),
        }
    }

    /// Advances the clock, running timers that fall due.
    pub(super) fn advance(&mut self, secs: u64) {
        let end = self.elapsed + Duration::from_secs(secs);
        loop {
            match self.server.poll_timeout() {
                Some(t) if t <= self.t0 + end => {
                    self.elapsed = self.elapsed.max(t - self.t0);
                    let now = self.now();
                    self.server.handle_timeout(now, &mut self.io);
                    assert_eq!(self.drain(), None, "no answer without a request");
                }
                _ => break,
            }
        }
        self.elapsed = end;
    }

    /// Does what the core asked for, as the driver would (closing relays and peer
    /// connections in the fake, keeping `Send` messages in `sent`), and returns the answer
    /// to the message just handled, if any.
    pub(super) fn drain(&mut self) -> Option<Output> {
        let mut answer = None;
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::CloseRelay(r) => self.io.close_relay(r),
                Output::ClosePeerConn(c) => self.io.close_tcp_conn(c),
                Output::Send { to, msg } => self.sent.push((to, msg)),
                a => {
                    assert_eq!(answer, None, "one answer per message");
                    answer = Some(a);
                }
            }
        }
        answer
    }

    pub(super) fn raw(&mut self, from: FiveTuple, msg: &[u8]) -> (Option<Output>, Vec<u8>) {
        let mut out = vec![0u8; 2048];
        let now = self.now();
        self.server
            .handle_stun(now, from, msg, &mut out, &mut self.io);
        (self.drain(), out)
    }

    /// Sends and expects an answer.
    pub(super) fn send(&mut self, from: FiveTuple, msg: &[u8]) -> Resp {
        match self.raw(from, msg) {
            (Some(Output::Reply { len: n }), out) => Resp {
                bytes: out[..n].to_vec(),
            },
            (a, _) => panic!("expected a reply, got {a:?}"),
        }
    }

    /// Sends `req` signed with (user, key), fetching a nonce first when we have none.
    pub(super) fn auth(&mut self, from: FiveTuple, req: &Req, user: &str, key: &Key) -> Resp {
        if self.nonce.is_empty() {
            let r = self.send(from, &req.encode(None));
            assert_eq!(r.code(), 401);
            self.nonce = r.nonce();
        }
        let nonce = self.nonce.clone();
        let r = self.send(from, &req.encode(Some((user, key, &nonce))));
        if r.code() != 438 {
            return r;
        }
        // Stale nonce: retry once with the fresh one, as clients do (RFC 8489 §9.2.5).
        self.nonce = r.nonce();
        let nonce = self.nonce.clone();
        self.send(from, &req.encode(Some((user, key, &nonce))))
    }

    /// Like `auth` but without the 438 retry.
    pub(super) fn auth_once(&mut self, from: FiveTuple, req: &Req, user: &str, key: &Key) -> Resp {
        let nonce = self.nonce.clone();
        self.send(from, &req.encode(Some((user, key, &nonce))))
    }

    /// Allocates for `from` as user "alice" and returns the response.
    pub(super) fn allocate(&mut self, from: FiveTuple) -> Resp {
        let (u, k) = cred("alice", 86400);
        self.auth(from, &Req::new(method::ALLOCATE).udp(), &u, &k)
    }

    pub(super) fn alice(&self) -> (String, Key) {
        cred("alice", 86400)
    }
}

#[test]
fn binding_returns_mapped_address_without_auth() {
    let mut h = H::new(|_| {});
    let r = h.send(client(1), &Req::new(method::BINDING).encode(None));
    assert_eq!(r.code(), 0);
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec![client(1).client]
    );
    assert!(r.has(attr::SOFTWARE));
    assert!(r.has(attr::FINGERPRINT));
    r.msg();
    assert_eq!(h.server.stats().bindings, 1);
}

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let mut h = H::new(|_| {});
    let req = Req::new(method::BINDING)
        .attr(0x7777, b"x")
        .attr(0xC001, b"optional is fine");
    let r = h.send(client(1), &req.encode(None));
    assert_eq!(r.code(), 420);
    assert_eq!(r.attr(attr::UNKNOWN_ATTRIBUTES).unwrap(), vec![0x77, 0x77]);
    // On an authenticated request the 420 is signed.
    let (u, k) = h.alice();
    let r = h.auth(
        client(2),
        &Req::new(method::ALLOCATE).udp().attr(0x0055, &[1, 2, 3, 4]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 420);
    assert!(r.verifies_with(&k));
    assert_eq!(h.server.stats().unknown_attributes, 2);
}

#[test]
fn allocate_challenge_then_success() {
    let mut h = H::new(|_| {});
    let req = Req::new(method::ALLOCATE).udp();
    let r = h.send(client(1), &req.encode(None));
    assert_eq!(r.code(), 401);
    assert_eq!(r.attr(attr::REALM).unwrap(), REALM.as_bytes());
    assert!(!r.has(attr::MESSAGE_INTEGRITY));
    assert!(r.has(attr::FINGERPRINT));
    h.nonce = r.nonce();
    let (u, k) = h.alice();
    let r = h.auth(client(1), &req, &u, &k);
    assert_eq!(r.code(), 0);
    assert!(r.verifies_with(&k), "success is signed");
    assert!(r.has(attr::SOFTWARE));
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip(), ADV_V4.parse::<IpAddr>().unwrap());
    assert!((50000..=50099).contains(&relayed[0].port()));
    assert_eq!(r.lifetime(), 600);
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec![client(1).client]
    );
    // The socket is bound on the local relay address, same port.
    let bound: Vec<_> = h.io.open.values().copied().collect();
    assert_eq!(
        bound,
        vec![SocketAddr::new(
            RELAY_V4.parse().unwrap(),
            relayed[0].port()
        )]
    );
    let s = h.server.stats();
    assert_eq!(s.allocations_active, 1);
    assert_eq!(s.requests_with(MethodLabel::Allocate, 401), 1);
    assert_eq!(s.requests_with(MethodLabel::Allocate, 0), 1);
}

#[test]
fn unauthenticated_answers_stay_small() {
    let mut h = H::new(|_| {});
    // A minimal Allocate: header, REQUESTED-TRANSPORT, FINGERPRINT = 36 bytes.
    let req = Req::new(method::ALLOCATE).udp().encode(None);
    let r = h.send(client(1), &req);
    assert_eq!(r.code(), 401);
    assert!(
        r.bytes.len() <= 3 * req.len(),
        "401 of {} bytes for a {}-byte request",
        r.bytes.len(),
        req.len()
    );
    assert!(!r.has(attr::SOFTWARE));
}

#[test]
fn bad_credentials_get_401_by_reason() {
    let mut h = H::new(|_| {});
    let req = Req::new(method::ALLOCATE).udp();
    let (u, _) = h.alice();
    // Wrong key (e.g. another secret).
    let wrong = Key::md5(&u, REALM, "not-the-password");
    let r = h.auth(client(1), &req, &u, &wrong);
    assert_eq!(r.code(), 401);
    assert!(r.has(attr::NONCE));
    // Unknown (not a REST username, no such static user).
    let r = h.auth(client(1), &req, "mallory", &wrong);
    assert_eq!(r.code(), 401);
    // Expired REST username.
    let (old, old_key) = cred("alice", 0);
    h.advance(1);
    let r = h.auth(client(1), &req, &old, &old_key);
    assert_eq!(r.code(), 401);
    let s = h.server.stats();
    assert_eq!(s.auth_failures_for(AuthFailure::BadIntegrity), 1);
    assert_eq!(s.auth_failures_for(AuthFailure::UnknownUser), 1);
    assert_eq!(s.auth_failures_for(AuthFailure::Expired), 1);
    assert_eq!(s.allocations_active, 0);
}

#[test]
fn secret_rotation_accepts_every_configured_secret() {
    let mut h = H::new(|c| c.turn.auth_secrets = vec!["new".into(), SECRET.into()]);
    let r = h.allocate(client(1));
    assert_eq!(r.code(), 0);
}

#[test]
fn static_users_plain_and_precomputed_key() {
    let key_hex = {
        use md5::{Digest, Md5};
        let d = Md5::digest(format!("carol:{REALM}:pw2"));
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut h = H::new(|c| {
        c.turn.users = vec![
            StaticUser {
                name: "bob".into(),
                password: Some("pw1".into()),
                key: None,
            },
            StaticUser {
                name: "carol".into(),
                password: None,
                key: Some(key_hex),
            },
        ]
    });
    let req = Req::new(method::ALLOCATE).udp();
    let r = h.auth(client(1), &req, "bob", &Key::md5("bob", REALM, "pw1"));
    assert_eq!(r.code(), 0);
    let r = h.auth(client(2), &req, "carol", &Key::md5("carol", REALM, "pw2"));
    assert_eq!(r.code(), 0);
    let r = h.auth(client(3), &req, "carol", &Key::md5("carol", REALM, "nope"));
    assert_eq!(r.code(), 401);
}

#[test]
fn userhash_identifies_static_user() {
    use sha2::{Digest, Sha256};
    let mut h = H::new(|c| {
        c.turn.users = vec![StaticUser {
            name: "bob".into(),
            password: Some("pw".into()),
            key: None,
        }]
    });
    let r = h.send(client(1), &Req::new(method::ALLOCATE).udp().encode(None));
    let nonce = r.nonce();
    let hash: [u8; 32] = Sha256::digest(format!("bob:{REALM}")).into();
    let key = Key::md5("bob", REALM, "pw");
    let req = Req::new(method::ALLOCATE)
        .udp()
        .attr(attr::USERHASH, &hash)
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce);
    // Identified by USERHASH alone: no USERNAME.
    let r = h.send(client(1), &req.signed(&key, false));
    assert_eq!(r.code(), 0);
}

#[test]
fn message_integrity_sha256_is_verified_and_answered_in_kind() {
    let mut h = H::new(|_| {});
    let r = h.send(client(1), &Req::new(method::ALLOCATE).udp().encode(None));
    let nonce = r.nonce();
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE)
        .udp()
        .attr(attr::USERNAME, u.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce);
    let r = h.send(client(1), &req.signed(&k, true));
    assert_eq!(r.code(), 0);
    assert!(r.has(attr::MESSAGE_INTEGRITY_SHA256));
    assert!(r.verifies_with(&k));
}

#[test]
fn stale_nonce_gets_438_with_fresh_nonce() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 3600);
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 0);
    h.advance(600);
    let refresh = Req::new(method::REFRESH);
    assert_eq!(
        h.auth_once(client(1), &refresh, &u, &k).code(),
        0,
        "still fresh at 600 s"
    );
    h.advance(1);
    let r = h.auth_once(client(1), &refresh, &u, &k);
    assert_eq!(r.code(), 438);
    assert!(!r.has(attr::MESSAGE_INTEGRITY));
    let fresh = r.nonce();
    assert_ne!(fresh, h.nonce);
    h.nonce = fresh;
    let r = h.auth_once(client(1), &refresh, &u, &k);
    assert_eq!(r.code(), 0);
    // A nonce minted for another client IP is refused too.
    let mut other = client(1);
    other.client = "203.0.113.99:1".parse().unwrap();
    let r = h.auth_once(other, &Req::new(method::ALLOCATE).udp(), &u, &k);
    assert_eq!(r.code(), 438);
    assert_eq!(
        h.server.stats().auth_failures_for(AuthFailure::StaleNonce),
        2
    );
}

#[test]
fn missing_realm_or_nonce_with_integrity_is_400() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE)
        .udp()
        .attr(attr::USERNAME, u.as_bytes());
    assert_eq!(h.send(client(1), &req.signed(&k, false)).code(), 400);
}

#[test]
fn allocation_mismatch_and_retransmission() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE).udp();
    let first = h.auth(client(1), &req, &u, &k);
    assert_eq!(first.code(), 0);
    // Same transaction again: the same success.
    let again = h.auth(client(1), &req, &u, &k);
    assert_eq!(again.code(), 0);
    assert_eq!(
        again.xor_addrs(attr::XOR_RELAYED_ADDRESS),
        first.xor_addrs(attr::XOR_RELAYED_ADDRESS)
    );
    // A new transaction on the same 5-tuple: 437.
    let r = h.auth(client(1), &Req::new(method::ALLOCATE).udp(), &u, &k);
    assert_eq!(r.code(), 437);
    assert!(r.verifies_with(&k));
    assert_eq!(h.io.open.len(), 1);
}

#[test]
fn transport_and_family_errors() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let r = h.auth(client(1), &Req::new(method::ALLOCATE), &u, &k);
    assert_eq!(r.code(), 400, "REQUESTED-TRANSPORT missing");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE).attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 400, "TCP allocation over UDP (RFC 6062 §5.1)");
    let mut tcp = client(1);
    tcp.transport = Transport::Tcp;
    let r = h.auth(
        tcp,
        &Req::new(method::ALLOCATE).attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0, "TCP relay (RFC 6062)");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE).attr(attr::REQUESTED_TRANSPORT, &[1, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 442, "neither UDP nor TCP");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 440, "no IPv6 relay address");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::EVEN_PORT, &[0x80])
            .attr(attr::RESERVATION_TOKEN, &[1; 8]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 400, "EVEN-PORT with RESERVATION-TOKEN");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::RESERVATION_TOKEN, &[1; 8]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 508, "unknown token");
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::DONT_FRAGMENT, &[]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0, "DONT-FRAGMENT accepted");
}

#[test]
fn dual_stack_allocations() {
    let mut h = H::with_relays(|_| {}, vec![(RELAY_V4, ADV_V4), (RELAY_V6, RELAY_V6)]);
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    let r = h.auth(
        client(2),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].is_ipv6());
    // Both attributes at once: 400.
    let r = h.auth(
        client(3),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 400);
    // Peer family mismatch on the IPv6-only allocation: 443.
    let r = h.auth(
        client(2),
        &Req::new(method::CREATE_PERMISSION).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 443);
    let r = h.auth(
        client(2),
        &Req::new(method::CREATE_PERMISSION).peer("[2606:4700::1]:9"),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    // Gauges: UDP allocations by family [ipv4, ipv6, dual], permissions by peer family.
    assert_eq!(h.server.stats().allocations_by[0], [0, 1, 1]);
    assert_eq!(h.server.stats().permissions_by[0], [0, 1]);
}

#[test]
fn additional_family_without_ipv6_relay_reports_address_error() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert_eq!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS).len(), 1);
    let e = r.attr(attr::ADDRESS_ERROR_CODE).unwrap();
    assert_eq!((e[0], e[2], e[3]), (2, 4, 40));
}

#[test]
fn lifetimes_are_clamped_and_allocation_expires() {
    let mut h = H::new(|c| c.turn.max_lifetime_secs = 1200);
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 99999),
        &u,
        &k,
    );
    assert_eq!(r.lifetime(), 1200);
    let r = h.auth(
        client(2),
        &Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 30),
        &u,
        &k,
    );
    assert_eq!(r.lifetime(), 600, "below the default gets the default");
    assert_eq!(h.io.open.len(), 2);
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 2);
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.io.open.len(), 1, "relay socket closed on expiry");
    h.advance(600);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().allocations_expired, 2);
    assert_eq!(h.shared.total_allocations(), 0);
    assert_eq!(h.shared.ports.used(RELAY_V4.parse().unwrap()), 0);
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = H::new(|_| {});
    assert_eq!(h.allocate(client(1)).code(), 0);
    let (u, k) = h.alice();
    h.advance(500);
    let r = h.auth(
        client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert_eq!(r.lifetime(), 600);
    h.advance(500);
    assert_eq!(
        h.server.allocation_count(),
        1,
        "refreshed at 500 s, alive at 1000 s"
    );
    let r = h.auth(
        client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 0),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert_eq!(r.lifetime(), 0);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.io.open.is_empty());
    let r = h.auth(client(1), &Req::new(method::REFRESH), &u, &k);
    assert_eq!(r.code(), 437);
}

#[test]
fn wrong_credentials_on_existing_allocation_is_441() {
    let mut h = H::new(|_| {});
    assert_eq!(h.allocate(client(1)).code(), 0);
    let (u, k) = cred("bob", 86400);
    for req in [
        Req::new(method::REFRESH),
        Req::new(method::CREATE_PERMISSION).peer(PEER),
        Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER),
    ] {
        assert_eq!(h.auth(client(1), &req, &u, &k).code(), 441);
    }
}

#[test]
fn strict_expiry_clamps_and_refuses() {
    let mut h = H::new(|c| c.turn.strict_expiry = true);
    let (u, k) = cred("alice", 100);
    let r = h.auth(client(1), &Req::new(method::ALLOCATE).udp(), &u, &k);
    assert_eq!(r.code(), 0);
    assert_eq!(r.lifetime(), 100, "clamped to the credential's expiry");
    h.advance(50);
    let r = h.auth(
        client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.lifetime(), 50);
    h.advance(49);
    let r = h.auth(
        client(1),
        &Req::new(method::CREATE_PERMISSION).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    h.advance(1);
    assert_eq!(
        h.server.allocation_count(),
        0,
        "expired with the credential"
    );
    // Without strict_expiry an expired credential may still refresh its allocation.
    let mut h = H::new(|_| {});
    let (u, k) = cred("alice", 100);
    assert_eq!(
        h.auth(client(1), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        0
    );
    h.advance(300);
    let r = h.auth(client(1), &Req::new(method::REFRESH), &u, &k);
    assert_eq!(r.code(), 0);
    assert_eq!(r.lifetime(), 600);
    // But not allocate anew.
    let r = h.auth(client(2), &Req::new(method::ALLOCATE).udp(), &u, &k);
    assert_eq!(r.code(), 401);
}

#[test]
fn strict_expiry_refresh_after_expiry_is_401() {
    let mut h = H::new(|c| {
        c.turn.strict_expiry = true;
        c.turn.default_lifetime_secs = 600;
    });
    let (u, k) = cred("alice", 10);
    assert_eq!(
        h.auth(client(1), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        0
    );
    h.advance(9);
    // Nonce still valid; credential expires at T0+10, refresh at T0+11 is refused.
    h.elapsed += Duration::from_secs(2);
    let r = h.auth(client(1), &Req::new(method::REFRESH), &u, &k);
    assert_eq!(r.code(), 401);
}

#[test]
fn user_and_total_quotas() {
    let mut h = H::new(|c| {
        c.turn.user_quota = 2;
        c.turn.total_quota = 3;
    });
    assert_eq!(h.allocate(client(1)).code(), 0);
    assert_eq!(h.allocate(client(2)).code(), 0);
    assert_eq!(h.allocate(client(3)).code(), 486);
    // Another expiry of the same user id shares the quota.
    let (u, k) = cred("alice", 5000);
    assert_eq!(
        h.auth(client(3), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        486
    );
    let (u, k) = cred("bob", 86400);
    assert_eq!(
        h.auth(client(3), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        0
    );
    assert_eq!(
        h.auth(client(4), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        508
    );
    // Freeing one makes room.
    let (au, ak) = h.alice();
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::REFRESH).u32(attr::LIFETIME, 0),
            &au,
            &ak
        )
        .code(),
        0
    );
    assert_eq!(
        h.auth(client(4), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        0
    );
}

#[test]
fn port_exhaustion_and_busy_ports() {
    let mut h = H::new(|c| {
        c.turn.min_port = 50000;
        c.turn.max_port = 50003;
        c.turn.user_quota = 100;
    });
    // Two ports are held by another process.
    h.io.busy.insert("192.0.2.10:50001".parse().unwrap());
    h.io.busy.insert("192.0.2.10:50002".parse().unwrap());
    assert_eq!(h.allocate(client(1)).code(), 0);
    assert_eq!(h.allocate(client(2)).code(), 0);
    assert_eq!(h.allocate(client(3)).code(), 508);
    let mut ports: Vec<u16> = h.io.open.values().map(|a| a.port()).collect();
    ports.sort();
    assert_eq!(ports, vec![50000, 50003]);
    // A failing socket layer: 508, quota returned.
    h.io.fail_all = true;
    h.io.busy.clear();
    assert_eq!(h.allocate(client(4)).code(), 508);
    assert_eq!(h.shared.total_allocations(), 2);
}

#[test]
fn even_port_and_reservation_token() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::EVEN_PORT, &[0x80]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let rtp = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    assert_eq!(rtp.port() % 2, 0);
    let token = r.attr(attr::RESERVATION_TOKEN).expect("token");
    assert_eq!(token.len(), 8);
    // Another 5-tuple (and it could be another shard: the pool is shared) claims it.
    let mut other = Server::new(h.server.config().clone(), h.shared.clone());
    let nonce = h.nonce.clone();
    let req = Req::new(method::ALLOCATE)
        .udp()
        .attr(attr::RESERVATION_TOKEN, &token);
    let mut out = vec![0u8; 2048];
    other.handle_stun(
        h.now(),
        client(2),
        &req.encode(Some((&u, &k, &nonce))),
        &mut out,
        &mut h.io,
    );
    let a = other.poll_output();
    let Some(Output::Reply { len: n }) = a else {
        panic!("{a:?}")
    };
    let r = Resp {
        bytes: out[..n].to_vec(),
    };
    assert_eq!(r.code(), 0);
    assert_eq!(
        r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].port(),
        rtp.port() + 1
    );
    // Used once only.
    let r = h.auth(client(3), &req, &u, &k);
    assert_eq!(r.code(), 508);
    // EVEN-PORT without R: even, no token.
    let r = h.auth(
        client(4),
        &Req::new(method::ALLOCATE).udp().attr(attr::EVEN_PORT, &[0]),
        &u,
        &k,
    );
    assert_eq!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].port() % 2, 0);
    assert!(!r.has(attr::RESERVATION_TOKEN));
}

#[test]
fn unclaimed_reservation_expires_after_30_seconds() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::EVEN_PORT, &[0x80]),
        &u,
        &k,
    );
    let token = r.attr(attr::RESERVATION_TOKEN).unwrap();
    let ip: IpAddr = RELAY_V4.parse().unwrap();
    assert_eq!(h.shared.ports.used(ip), 2);
    h.advance(29);
    assert_eq!(h.shared.ports.used(ip), 2);
    h.advance(1);
    assert_eq!(h.shared.ports.used(ip), 1, "reserved port back in the pool");
    let req = Req::new(method::ALLOCATE)
        .udp()
        .attr(attr::RESERVATION_TOKEN, &token);
    assert_eq!(h.auth(client(2), &req, &u, &k).code(), 508);
}

#[test]
fn permissions_policy_and_expiry() {
    let mut h = H::new(|_| {});
    let r = h.allocate(client(1));
    let (u, k) = h.alice();
    let relay = RelayId::from_index(1);
    let _ = r;
    // Several peers at once.
    let r = h.auth(
        client(1),
        &Req::new(method::CREATE_PERMISSION).peer(PEER).peer(PEER2),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert!(h
        .server
        .peer_to_client(relay, PEER.parse().unwrap())
        .is_some());
    // Permission is per IP: any port of the peer passes.
    let route = h
        .server
        .peer_to_client(relay, "8.8.8.8:1".parse().unwrap())
        .unwrap();
    assert_eq!(route.client, client(1));
    assert_eq!(route.channel, None);
    // One denied peer: 403 and none installed.
    let r = h.auth(
        client(1),
        &Req::new(method::CREATE_PERMISSION)
            .peer("9.9.9.9:1")
            .peer("127.0.0.1:1"),
        &u,
        &k,
    );
    assert_eq!(r.code(), 403);
    assert!(h
        .server
        .peer_to_client(relay, "9.9.9.9:1".parse().unwrap())
        .is_none());
    assert_eq!(h.server.stats().peer_denied, 1);
    // No XOR-PEER-ADDRESS: 400.
    assert_eq!(
        h.auth(client(1), &Req::new(method::CREATE_PERMISSION), &u, &k)
            .code(),
        400
    );
    // Expiry at 300 s, refresh keeps it.
    h.advance(200);
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::CREATE_PERMISSION).peer(PEER),
            &u,
            &k
        )
        .code(),
        0
    );
    h.advance(100);
    assert!(h
        .server
        .peer_to_client(relay, PEER.parse().unwrap())
        .is_some());
    assert!(h
        .server
        .peer_to_client(relay, PEER2.parse().unwrap())
        .is_none());
    h.advance(200);
    assert!(h
        .server
        .peer_to_client(relay, PEER.parse().unwrap())
        .is_none());
    assert_eq!(h.server.stats().permissions_active, 0);
    // No allocation: 437.
    let r = h.auth(
        client(9),
        &Req::new(method::CREATE_PERMISSION).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 437);
}

#[test]
fn allowed_peer_ranges_open_loopback() {
    let mut h = H::new(|c| c.turn.allowed_peer_ranges = vec!["127.0.0.0/8".parse().unwrap()]);
    h.allocate(client(1));
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::CREATE_PERMISSION).peer("127.0.0.1:9"),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let mut h = H::new(|c| c.turn.denied_peer_ranges = vec!["8.8.8.0/24".parse().unwrap()]);
    h.allocate(client(1));
    let r = h.auth(
        client(1),
        &Req::new(method::CREATE_PERMISSION).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 403);
}

#[test]
fn channel_bind_rules_and_lookups() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let relay = RelayId::from_index(1);
    let bind = |n: u16, p: &str| Req::new(method::CHANNEL_BIND).channel(n).peer(p);
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER), &u, &k).code(), 0);
    assert_eq!(
        h.server.channel_to_peer(&client(1), ch(0x4000)),
        Some((relay, PEER.parse().unwrap()))
    );
    let route = h
        .server
        .peer_to_client(relay, PEER.parse().unwrap())
        .unwrap();
    assert_eq!(route.channel, Some(ch(0x4000)));
    // Another port of the same IP has the permission but no channel.
    let route = h
        .server
        .peer_to_client(relay, "8.8.8.8:1".parse().unwrap())
        .unwrap();
    assert_eq!(route.channel, None);
    // Rebinding: same binding OK; number to another peer, or peer to another number: 400.
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER), &u, &k).code(), 0);
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER2), &u, &k).code(), 400);
    assert_eq!(h.auth(client(1), &bind(0x4001, PEER), &u, &k).code(), 400);
    // Out of range numbers and missing attributes.
    assert_eq!(h.auth(client(1), &bind(0x3FFF, PEER2), &u, &k).code(), 400);
    assert_eq!(h.auth(client(1), &bind(0x8000, PEER2), &u, &k).code(), 400);
    // The top of the RFC 5766 range, as coturn's client library may pick it.
    assert_eq!(h.auth(client(1), &bind(0x7FFF, PEER2), &u, &k).code(), 0);
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::CHANNEL_BIND).peer(PEER2),
            &u,
            &k
        )
        .code(),
        400
    );
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::CHANNEL_BIND).channel(0x4002),
            &u,
            &k
        )
        .code(),
        400
    );
    // Policy applies to channels.
    assert_eq!(
        h.auth(client(1), &bind(0x4002, "10.0.0.1:1"), &u, &k)
            .code(),
        403
    );
    // Other client / unknown channel.
    assert_eq!(h.server.channel_to_peer(&client(2), ch(0x4000)), None);
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4001)), None);
    assert_eq!(h.server.stats().channels_active, 2); // 0x4000 and 0x7FFF
}

#[test]
fn channel_expiry_and_permission_refresh() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4abc).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    // Keep the allocation alive.
    let keep = |h: &mut H| {
        let (u, k) = h.alice();
        assert_eq!(
            h.auth(client(1), &Req::new(method::REFRESH), &u, &k).code(),
            0
        );
    };
    h.advance(290);
    keep(&mut h);
    // The channel bind installed a 300 s permission; without refresh the data path
    // stops at 300 s even though the channel lives 600 s.
    h.advance(10);
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4abc)), None);
    // Refreshing the binding refreshes the permission too.
    h.nonce.clear();
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    assert!(h.server.channel_to_peer(&client(1), ch(0x4abc)).is_some());
    h.advance(290);
    keep(&mut h);
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    h.advance(290);
    keep(&mut h);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    h.advance(19);
    assert!(h.server.channel_to_peer(&client(1), ch(0x4abc)).is_some());
    h.advance(1);
    // 600 s after the last ChannelBind (at 300 s) the channel is gone; the permission
    // (refreshed at 880 s) is alive, so peer data now goes as Data indications.
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4abc)), None);
    assert_eq!(h.server.stats().channels_active, 0);
    let route = h
        .server
        .peer_to_client(RelayId::from_index(1), PEER.parse().unwrap())
        .unwrap();
    assert_eq!(route.channel, None);
}

/// What the kernel fast path mirrors (`Server::channel_routes`): exactly the bindings the
/// per-packet lookups forward, and a new generation whenever that set changes: channel
/// bound, permission expired (channel still bound), channel expired, allocation deleted.
#[test]
fn channel_routes_follow_binding_permission_and_allocation_lifetimes() {
    let routes = |h: &H| {
        let mut v = Vec::new();
        h.server.channel_routes(|r| v.push(r));
        v
    };
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let g0 = h.server.channel_routes_generation();
    assert!(routes(&h).is_empty());
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4001).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    let g1 = h.server.channel_routes_generation();
    assert_ne!(g1, g0);
    let relay = RelayId::from_index(1);
    assert_eq!(
        routes(&h),
        vec![ChannelRoute {
            client: client(1),
            channel: ch(0x4001),
            relay,
            peer: PEER.parse().unwrap(),
        }]
    );
    // A refresh of the same binding changes nothing the fast path holds.
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    assert_eq!(h.server.channel_routes_generation(), g1);
    // The permission expires at 300 s while the channel lives on: the route goes.
    let keep = |h: &mut H| {
        let (u, k) = h.alice();
        assert_eq!(
            h.auth(client(1), &Req::new(method::REFRESH), &u, &k).code(),
            0
        );
    };
    h.advance(290);
    keep(&mut h);
    h.advance(11);
    assert!(routes(&h).is_empty());
    let g2 = h.server.channel_routes_generation();
    assert_ne!(g2, g1);
    // CreatePermission brings it back (the channel is still bound).
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    h.nonce.clear();
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    assert_eq!(routes(&h).len(), 1);
    let g3 = h.server.channel_routes_generation();
    assert_ne!(g3, g2);
    // The channel expires 600 s after its last bind: gone although the permission lives.
    h.advance(250);
    keep(&mut h);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    h.advance(50);
    assert!(routes(&h).is_empty());
    let g4 = h.server.channel_routes_generation();
    assert_ne!(g4, g3);
    // A new binding, then the allocation is deleted: gone with it.
    let bind2 = Req::new(method::CHANNEL_BIND).channel(0x4002).peer(PEER2);
    h.nonce.clear();
    assert_eq!(h.auth(client(1), &bind2, &u, &k).code(), 0);
    assert_eq!(routes(&h).len(), 1);
    let g5 = h.server.channel_routes_generation();
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::REFRESH).u32(attr::LIFETIME, 0),
            &u,
            &k
        )
        .code(),
        0
    );
    assert!(routes(&h).is_empty());
    assert_ne!(h.server.channel_routes_generation(), g5);
}

#[test]
fn send_indication_forwards_only_with_permission() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let mut send = Req::new(method::SEND).peer(PEER);
    send.class = class::INDICATION;
    send.data = Some(b"hello peer".to_vec());
    let msg = send.encode(None);
    let (a, _) = h.raw(client(1), &msg);
    assert_eq!(a, None, "no permission: dropped silently");
    assert_eq!(h.server.stats().sends_dropped, 1);
    let (u, k) = h.alice();
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::CREATE_PERMISSION).peer(PEER),
            &u,
            &k
        )
        .code(),
        0
    );
    let (a, _) = h.raw(client(1), &msg);
    let Some(Output::Forward {
        relay,
        peer,
        payload,
    }) = a
    else {
        panic!("{a:?}")
    };
    assert_eq!(relay, RelayId::from_index(1));
    assert_eq!(peer, PEER.parse::<SocketAddr>().unwrap());
    assert_eq!(&msg[payload], b"hello peer");
    // Without an allocation: dropped.
    let (a, _) = h.raw(client(2), &msg);
    assert_eq!(a, None);
}

#[test]
fn malformed_input_is_dropped_and_counted() {
    let mut h = H::new(|_| {});
    let good = Req::new(method::BINDING).encode(None);
    let mut bad_fp = good.clone();
    let l = bad_fp.len();
    bad_fp[l - 1] ^= 1;
    let mut missized = good.clone();
    missized[3] = 200;
    for m in [
        &good[..10],
        &bad_fp[..],
        &missized[..],
        &[0xFFu8; 40][..],
        &[][..],
    ] {
        let (a, _) = h.raw(client(1), m);
        assert_eq!(a, None);
    }
    assert_eq!(h.server.stats().malformed, 5);
    // Responses and non-Send indications are ignored.
    let mut resp = Req::new(method::BINDING);
    resp.class = class::SUCCESS;
    assert_eq!(h.raw(client(1), &resp.encode(None)).0, None);
    // Unknown method: 400.
    let r = h.send(client(1), &Req::new(0x0055).encode(None));
    assert_eq!(r.code(), 400);
    // And the server still serves.
    assert_eq!(h.send(client(1), &good).code(), 0);
}

#[test]
fn unauthenticated_flood_is_rate_limited_per_source() {
    let mut h = H::new(|c| {
        c.turn.unauth_rate_per_sec = 5;
        c.turn.unauth_burst = 10;
    });
    let req = Req::new(method::ALLOCATE).udp().encode(None);
    let answered = (0..1000)
        .filter(|_| matches!(h.raw(client(1), &req).0, Some(Output::Reply { .. })))
        .count();
    assert_eq!(answered, 10);
    assert_eq!(h.server.stats().rate_limited, 990);
    // Another source is still answered. Buckets are picked by a per-process keyed hash, so
    // take a source that does not share the flooded one's bucket (1 in 4096 would).
    let flooded = h.server.limiter().bucket_of(client(1).client.ip());
    let mut other = client(1);
    other.client = (200..=255u8)
        .map(|n| SocketAddr::from(([192, 0, 2, n], 1)))
        .find(|a| h.server.limiter().bucket_of(a.ip()) != flooded)
        .unwrap();
    assert_eq!(h.send(other, &req).code(), 401);
    // Authenticated requests from the flooded source pass (nonce obtained from the other source is
    // bound to that IP, so fetch one after the bucket refills).
    h.advance(1);
    let r = h.allocate(client(1));
    assert_eq!(r.code(), 0);
    // The budget refills at 5/s: 4 left after the 401 above, plus 5 a second later.
    h.advance(1);
    let answered = (0..100)
        .filter(|_| matches!(h.raw(client(1), &req).0, Some(Output::Reply { .. })))
        .count();
    assert_eq!(answered, 9);
}

#[test]
fn tcp_client_close_deletes_allocation() {
    let mut h = H::new(|_| {});
    let mut tcp = client(1);
    tcp.transport = Transport::Tcp;
    assert_eq!(h.allocate(tcp).code(), 0);
    let now = h.now();
    h.server.client_closed(&client(1), now, &mut h.io);
    h.drain();
    assert_eq!(h.server.allocation_count(), 1, "another 5-tuple");
    h.server.client_closed(&tcp, now, &mut h.io);
    h.drain();
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.io.open.is_empty());
    assert_eq!(h.shared.total_allocations(), 0);
}

#[test]
fn deleting_allocation_clears_data_path_tables() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    assert_eq!(
        h.auth(
            client(1),
            &Req::new(method::REFRESH).u32(attr::LIFETIME, 0),
            &u,
            &k
        )
        .code(),
        0
    );
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4000)), None);
    assert_eq!(
        h.server
            .peer_to_client(RelayId::from_index(1), PEER.parse().unwrap()),
        None
    );
    assert_eq!(h.server.tables_mut().sizes().perms, 0);
    assert_eq!(h.server.tables_mut().sizes().peer_channels, 0);
    assert_eq!(h.server.tables_mut().sizes().client_channels, 0);
    assert_eq!(h.server.tables_mut().sizes().by_relay, 0);
    // The slot is reused and old timers don't touch the new allocation.
    assert_eq!(h.allocate(client(2)).code(), 0);
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn set_config_swaps_policy() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let req = Req::new(method::CREATE_PERMISSION).peer("127.0.0.1:1");
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 403);
    let mut cfg = Config::default();
    cfg.turn.auth_secrets = vec![SECRET.into()];
    cfg.turn.realm = REALM.into();
    cfg.turn.allowed_peer_ranges = vec!["127.0.0.0/8".parse().unwrap()];
    let sc = ServerConfig::from_config(
        &cfg,
        vec![RelayAddr {
            local: RELAY_V4.parse().unwrap(),
            advertised: ADV_V4.parse().unwrap(),
        }],
    )
    .unwrap();
    h.server.set_config(Arc::new(sc));
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 0);
}

/// Counts heap allocations made by the current thread (the lib's test binary only).
mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            COUNT.with(|c| c.set(c.get() + 1));
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            COUNT.with(|c| c.set(c.get() + 1));
            unsafe { System.realloc(p, l, n) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    pub fn count() -> u64 {
        COUNT.with(|c| c.get())
    }
}

#[test]
fn data_path_does_not_allocate() {
    let mut h = H::new(|_| {});
    h.allocate(client(1));
    let (u, k) = h.alice();
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    let mut send = Req::new(method::SEND).peer(PEER);
    send.class = class::INDICATION;
    send.data = Some(vec![7; 1200]);
    let msg = send.encode(None);
    let peer: SocketAddr = PEER.parse().unwrap();
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    let now = h.now();
    let before = alloc_count::count();
    for _ in 0..1000 {
        assert!(h.server.channel_to_peer(&client(1), ch(0x4000)).is_some());
        assert!(h
            .server
            .peer_to_client(RelayId::from_index(1), peer)
            .is_some());
        h.server
            .handle_stun(now, client(1), &msg, &mut out, &mut h.io);
        let a = h.server.poll_output();
        assert!(matches!(a, Some(Output::Forward { .. })));
        let r = crate::stun::write_data_indication(&mut buf, 48, 1200, peer, [1; 12]).unwrap();
        assert_eq!(
            r.start, 12,
            "IPv4 peer: 36 bytes of header before the payload"
        );
        crate::stun::write_channel_data_header(&mut buf, ch(0x4000), 1200);
    }
    assert_eq!(
        alloc_count::count() - before,
        0,
        "heap allocations on the data path"
    );
}

#[test]
fn refresh_can_shorten_and_timers_stay_bounded() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 3600);
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 0);
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    // Many refreshes do not pile up timer entries.
    for _ in 0..200 {
        assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
        assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
        assert_eq!(
            h.auth(
                client(1),
                &Req::new(method::REFRESH).u32(attr::LIFETIME, 3600),
                &u,
                &k
            )
            .code(),
            0
        );
    }
    assert!(
        h.server.timer_count() <= 4,
        "{} timer entries",
        h.server.timer_count()
    );
    // Shortening works: 3600 s → 600 s.
    let r = h.auth(
        client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.lifetime(), 600);
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1);
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn churned_allocations_do_not_leave_the_timer_heap_grown() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    let delete = Req::new(method::REFRESH).u32(attr::LIFETIME, 0);
    // One allocation that stays, and 3000 that come and go, each leaving its allocation,
    // permission and channel entries behind.
    assert_eq!(h.allocate(client(1)).code(), 0);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    for n in 2..3002 {
        assert_eq!(h.allocate(client(n)).code(), 0);
        assert_eq!(h.auth(client(n), &perm, &u, &k).code(), 0);
        assert_eq!(h.auth(client(n), &bind, &u, &k).code(), 0);
        assert_eq!(h.auth(client(n), &delete, &u, &k).code(), 0);
    }
    assert!(h.server.timer_count() > 9000, "{}", h.server.timer_count());
    // The permissions fall due at 300 s; the sweep after them drops the stale entries.
    h.advance(300);
    assert_eq!(h.server.allocation_count(), 1);
    assert!(
        h.server.timer_count() <= 2,
        "{} timer entries",
        h.server.timer_count()
    );
    assert!(
        h.server.timer_capacity() <= 4096,
        "{} entries of capacity kept",
        h.server.timer_capacity()
    );
    // The allocation that stayed still expires on time (600 s default lifetime).
    h.advance(299);
    assert_eq!(h.server.allocation_count(), 1);
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 0);
}

mod fuzzish {
    use super::*;
    use proptest::prelude::*;

    /// A valid message with a random attribute section, a consistent length and a valid
    /// FINGERPRINT, so it gets past the framing checks into the attribute handling.
    fn framed(method: u16, cls: u16, body: &[u8]) -> Vec<u8> {
        let body_len = body.len() & !3;
        let mut m = Vec::with_capacity(20 + body_len + 8);
        m.extend_from_slice(&message_type(method, cls).to_be_bytes());
        m.extend_from_slice(&((body_len + 8) as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[9; 12]);
        m.extend_from_slice(&body[..body_len]);
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&m) ^ 0x5354_554e;
        m.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&crc.to_be_bytes());
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Hostile bytes never panic the core, and the server keeps serving afterwards.
        #[test]
        fn hostile_messages_do_not_panic(
            method in prop_oneof![Just(1u16), Just(3), Just(4), Just(6), Just(8), Just(9), 0u16..0x1000],
            cls in prop_oneof![Just(class::REQUEST), Just(class::INDICATION), Just(class::SUCCESS)],
            body in proptest::collection::vec(any::<u8>(), 0..300),
            raw in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut h = H::new(|c| c.turn.allowed_peer_ranges = vec!["0.0.0.0/0".parse().unwrap()]);
            h.allocate(client(1));
            let msg = framed(method, cls, &body);
            let _ = h.raw(client(1), &msg);
            let _ = h.raw(client(1), &raw);
            let _ = crate::stun::tcp_frame_len(&raw);
            let _ = crate::stun::classify(&raw);
            // Also with attributes that look like ours: sprinkle known types into the body.
            let mut b2 = body.clone();
            for (i, t) in [attr::XOR_PEER_ADDRESS, attr::DATA, attr::CHANNEL_NUMBER, attr::LIFETIME,
                           attr::USERNAME, attr::MESSAGE_INTEGRITY, attr::EVEN_PORT]
                .iter().enumerate() {
                let at = (i * 40) % b2.len().max(1);
                if at + 2 <= b2.len() {
                    b2[at..at + 2].copy_from_slice(&t.to_be_bytes());
                }
            }
            let _ = h.raw(client(1), &framed(method, cls, &b2));
            prop_assert_eq!(h.send(client(2), &Req::new(method::BINDING).encode(None)).code(), 0);
        }
    }
}

#[test]
fn expired_channel_cools_down_before_reuse() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 3600);
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 0);
    let bind = |n: u16, p: &str| Req::new(method::CHANNEL_BIND).channel(n).peer(p);
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER), &u, &k).code(), 0);
    h.advance(600);
    assert_eq!(h.server.stats().channels_active, 0);
    assert_eq!(h.server.tables_mut().sizes().client_channels, 0);
    // During the 5-minute cooldown neither the number nor the peer can move.
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER2), &u, &k).code(), 400);
    assert_eq!(h.auth(client(1), &bind(0x4001, PEER), &u, &k).code(), 400);
    h.advance(299);
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER2), &u, &k).code(), 400);
    h.advance(1);
    assert_eq!(h.auth(client(1), &bind(0x4000, PEER2), &u, &k).code(), 0);
    assert_eq!(h.auth(client(1), &bind(0x4001, PEER), &u, &k).code(), 0);
    assert_eq!(h.server.stats().channels_active, 2);
}

#[test]
fn same_binding_revives_during_cooldown() {
    let mut h = H::new(|_| {});
    let (u, k) = h.alice();
    let req = Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 3600);
    assert_eq!(h.auth(client(1), &req, &u, &k).code(), 0);
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    h.advance(700);
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4000)), None);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    assert!(h.server.channel_to_peer(&client(1), ch(0x4000)).is_some());
    assert_eq!(h.server.stats().channels_active, 1);
    // The revived binding lives its full 600 s from the rebind.
    h.advance(290);
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    h.advance(290);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    h.advance(19);
    assert!(h.server.channel_to_peer(&client(1), ch(0x4000)).is_some());
    h.advance(1);
    assert_eq!(h.server.channel_to_peer(&client(1), ch(0x4000)), None);
}

// ---- reload, drain and ALTERNATE-SERVER (issue 4) ----

/// A plain (non-XOR) address attribute value (RFC 8489 §14.1).
fn plain_addr(v: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([v[2], v[3]]);
    let ip: IpAddr = match v[1] {
        1 => <[u8; 4]>::try_from(&v[4..8]).unwrap().into(),
        _ => <[u8; 16]>::try_from(&v[4..20]).unwrap().into(),
    };
    SocketAddr::new(ip, port)
}

#[test]
fn draining_refuses_new_allocations_with_508_and_keeps_existing_ones() {
    let mut h = H::new(|_| {});
    assert_eq!(h.allocate(client(1)).code(), 0);
    h.shared.set_draining(true);
    let (u, k) = h.alice();
    let r = h.allocate(client(2));
    assert_eq!(r.code(), 508);
    assert!(r.verifies_with(&k), "the refusal is signed");
    assert!(!r.has(attr::ALTERNATE_SERVER));
    // The existing allocation still refreshes and binds.
    let refresh = Req::new(method::REFRESH).u32(attr::LIFETIME, 600);
    assert_eq!(h.auth(client(1), &refresh, &u, &k).code(), 0);
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    assert_eq!(h.auth(client(1), &bind, &u, &k).code(), 0);
    assert!(h.server.channel_to_peer(&client(1), ch(0x4000)).is_some());
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn draining_with_alternates_answers_300_round_robin_in_the_clients_family() {
    let mut h = H::new(|c| {
        c.turn.alternate_udp = vec![
            "192.0.2.50:3478".parse().unwrap(),
            "[2001:db8::50]:3478".parse().unwrap(),
            "192.0.2.51:3479".parse().unwrap(),
        ];
    });
    h.shared.set_draining(true);
    let (_, k) = h.alice();
    let mut seen = Vec::new();
    for n in 1..=3 {
        let r = h.allocate(client(n));
        assert_eq!(r.code(), 300);
        assert!(r.verifies_with(&k));
        let v = r.attr(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER");
        seen.push(plain_addr(&v).to_string());
        assert!(
            !r.has(attr::ALTERNATE_DOMAIN),
            "UDP alternates carry no domain"
        );
    }
    assert_eq!(
        seen,
        ["192.0.2.50:3478", "192.0.2.51:3479", "192.0.2.50:3478"]
    );
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.shared.total_allocations(), 0, "no quota held by refusals");
}

#[test]
fn total_quota_redirects_to_an_alternate_when_configured() {
    let mut h = H::new(|c| {
        c.turn.total_quota = 1;
        c.turn.alternate_udp = vec!["192.0.2.60:3478".parse().unwrap()];
    });
    assert_eq!(h.allocate(client(1)).code(), 0);
    let r = h.allocate(client(2));
    assert_eq!(r.code(), 300);
    let v = r.attr(attr::ALTERNATE_SERVER).unwrap();
    assert_eq!(plain_addr(&v).to_string(), "192.0.2.60:3478");
}

pub(super) fn reloaded(h: &H, tweak: impl FnOnce(&mut Config)) -> Arc<ServerConfig> {
    let mut cfg = Config::default();
    cfg.turn.realm = REALM.into();
    cfg.turn.min_port = 50000;
    cfg.turn.max_port = 50099;
    cfg.turn.unauth_burst = 1000;
    cfg.turn.unauth_rate_per_sec = 1000;
    tweak(&mut cfg);
    Arc::new(ServerConfig::from_config(&cfg, h.server.config().relay.clone()).unwrap())
}

#[test]
fn removed_secret_stops_new_allocations_but_not_existing_ones() {
    let mut h = H::new(|_| {});
    assert_eq!(h.allocate(client(1)).code(), 0);
    let sc = reloaded(&h, |c| c.turn.auth_secrets = vec!["rotated".into()]);
    h.server.set_config(sc);
    let (u, k) = h.alice();
    // A new allocation with the old secret's credential: 401.
    assert_eq!(h.allocate(client(2)).code(), 401);
    // The existing allocation keeps refreshing and binding with its own credential.
    let refresh = Req::new(method::REFRESH).u32(attr::LIFETIME, 600);
    let r = h.auth(client(1), &refresh, &u, &k);
    assert_eq!(r.code(), 0);
    assert!(r.verifies_with(&k));
    let perm = Req::new(method::CREATE_PERMISSION).peer(PEER);
    assert_eq!(h.auth(client(1), &perm, &u, &k).code(), 0);
    // The new secret's credentials allocate.
    let c = mint_rest_credential("rotated", "bob", 3600, T0_UNIX, ":");
    let k2 = Key::md5(&c.username, REALM, &c.password);
    let req = Req::new(method::ALLOCATE).udp();
    assert_eq!(h.auth(client(3), &req, &c.username, &k2).code(), 0);
}

#[test]
fn removed_secret_under_strict_expiry_refuses_the_old_allocations_requests() {
    let mut h = H::new(|c| c.turn.strict_expiry = true);
    assert_eq!(h.allocate(client(1)).code(), 0);
    let sc = reloaded(&h, |c| {
        c.turn.auth_secrets = vec!["rotated".into()];
        c.turn.strict_expiry = true;
    });
    h.server.set_config(sc);
    let (u, k) = h.alice();
    let refresh = Req::new(method::REFRESH).u32(attr::LIFETIME, 600);
    assert_eq!(h.auth(client(1), &refresh, &u, &k).code(), 401);
}

#[test]
fn gauges_by_transport_and_family_and_the_lifetime_histogram() {
    let mut h = H::new(|_| {});
    let mut tcp = client(2);
    tcp.transport = Transport::Tcp;
    assert_eq!(h.allocate(client(1)).code(), 0);
    assert_eq!(h.allocate(tcp).code(), 0);
    let (u, k) = h.alice();
    let bind = Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER);
    assert_eq!(h.auth(tcp, &bind, &u, &k).code(), 0);
    let s = h.server.stats().clone();
    // [transport: udp, tcp, tls][family: ipv4, ipv6(, dual)]
    assert_eq!(s.allocations_by, [[1, 0, 0], [1, 0, 0], [0, 0, 0]]);
    assert_eq!(s.channels_by, [[0, 0], [1, 0], [0, 0]]);
    assert_eq!(s.permissions_by, [[0, 0], [1, 0], [0, 0]]);
    h.advance(30);
    let now = h.now();
    h.server.client_closed(&tcp, now, &mut h.io);
    h.drain();
    let s = h.server.stats().clone();
    assert_eq!(s.allocations_by, [[1, 0, 0], [0, 0, 0], [0, 0, 0]]);
    assert_eq!(s.channels_by, [[0; 2]; 3]);
    assert_eq!(s.permissions_by, [[0; 2]; 3]);
    assert_eq!(s.allocation_lifetime_seconds.count, 1);
    assert_eq!(s.allocation_lifetime_seconds.sum, 30.0);
    // 30 s falls in the "<= 30" bucket.
    assert_eq!(s.allocation_lifetime_seconds.cumulative()[..2], [0, 1]);
    // The UDP allocation expires at the end of its lifetime.
    h.advance(7200);
    let s = h.server.stats();
    assert_eq!(s.allocations_by, [[0; 3]; 3]);
    assert_eq!(s.allocations_active, 0);
    assert_eq!(s.allocation_lifetime_seconds.count, 2);
    assert!(s.allocation_lifetime_seconds.sum > 30.0);
}
