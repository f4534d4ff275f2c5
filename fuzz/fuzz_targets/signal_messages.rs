//! Client text frames into both signaling state machines, as the WebSocket driver hands
//! them over: the native `/ws` room service (`signal::rooms`, protocol in
//! `signal::protocol`) and the PeerJS server (`signal::peerjs`), each driven without
//! sockets by a sequence of connects, messages, disconnects and clock ticks. Messages are
//! raw text or JSON built from structured input; `$N` in a text stands for the N-th peer
//! id the server handed out, so signals, relays and resumes reach real peers. Also the
//! client address logic (`X-Forwarded-For`, RFC 7239 `Forwarded`) and LAN room keys.
//!
//! Checked besides "no panic": everything the server sends is JSON, close codes are
//! valid (RFC 6455 §7.4), a relay grant names two different connections, and the
//! configured bounds (peers, room size, rooms per peer, PeerJS clients) hold.

#![no_main]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use tern::config::SignalConfig;
use tern::signal::client_ip::{client_ip, lan_key};
use tern::signal::peerjs::PeerJsService;
use tern::signal::protocol::ClientMsg;
use tern::signal::rooms::RoomService;
use tern::signal::{Out, WsId};

#[derive(Arbitrary, Debug)]
struct Input {
    small_limits: bool,
    no_resume_grace: bool,
    relay_enabled: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Native `/ws`: a connection from client address `ip`, maybe with a resume token.
    Connect {
        conn: u8,
        ip: u8,
        resume: Option<u8>,
        forged: Option<String>,
    },
    Text {
        conn: u8,
        text: String,
    },
    Msg {
        conn: u8,
        msg: Msg,
    },
    Alive {
        conn: u8,
    },
    Disconnect {
        conn: u8,
    },
    /// PeerJS: `?key=&id=&token=`.
    PjConnect {
        conn: u8,
        key: Option<String>,
        id: PjId,
        token: Option<String>,
    },
    PjText {
        conn: u8,
        text: String,
    },
    PjMsg {
        conn: u8,
        kind: u8,
        dst: Option<PjId>,
        payload: Option<String>,
    },
    PjDisconnect {
        conn: u8,
    },
    /// Time passes and both services tick.
    Tick {
        secs: u16,
    },
    /// The address of a client behind proxies.
    ClientIp {
        peer: u8,
        trusted: u8,
        headers: Vec<(bool, String)>,
        prefix: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum PjId {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Join(u8),
    JoinRaw(String),
    Leave(u8),
    LeaveLan,
    Signal { to: u8, data: String },
    Relay(u8),
    Ping,
    Pong,
}

const PJ_IDS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const ROOMS: [&str; 3] = ["room-a", "room.b", "c_c"];
const IPS: [&str; 6] = [
    "203.0.113.1",
    "203.0.113.2",
    "192.168.1.10",
    "2001:db8::1",
    "2001:db8::2",
    "::ffff:203.0.113.1",
];

struct Harness {
    rooms: RoomService,
    peerjs: PeerJsService,
    cfg: SignalConfig,
    t0: Instant,
    elapsed: Duration,
    /// Peer ids and resume tokens from `welcome` messages.
    ids: Vec<String>,
    resumes: Vec<String>,
    /// The connection id in each of 8 slots the fuzzer names. The driver never reuses an
    /// id: each connect takes a fresh one (an older connection in the slot lives on).
    ws: [WsId; 8],
    pj: [WsId; 8],
    next_conn: u64,
}

fn check_outs(outs: &[Out]) {
    for o in outs {
        match o {
            Out::Send { text, .. } => {
                serde_json::from_str::<Value>(text).expect("the server sends JSON");
            }
            Out::Close { code, .. } => {
                assert!((1000..=4999).contains(code) && ![1004, 1005, 1006, 1015].contains(code));
            }
            Out::Relay(g) => {
                // Without a cluster bus both sides are connections of this node.
                assert!(g.remote.is_none(), "a remote grant without a bus");
                assert_ne!(g.sides[0].0, g.sides[1].0, "relay grant to itself");
                assert_ne!(g.sides[0].2, g.sides[1].2, "both sides got one ticket");
            }
            Out::Ping { .. } => {}
            Out::Bus(cmd) => panic!("a bus command without a cluster bus: {cmd:?}"),
            Out::CancelRelay { .. } => panic!("a relay cancelled without a cluster bus"),
        }
    }
}

impl Harness {
    fn fresh(&mut self, native: bool, slot: u8) -> WsId {
        self.next_conn += 1;
        let id = WsId::new(self.next_conn);
        let slots = if native { &mut self.ws } else { &mut self.pj };
        slots[usize::from(slot % 8)] = id;
        id
    }

    /// The driver closes the socket of an `Out::Close` and then reports it gone.
    fn native_closes(&mut self, outs: &[Out]) {
        for o in outs {
            if let Out::Close { conn, .. } = o {
                let more = self.rooms.disconnect(*conn, self.now());
                check_outs(&more);
            }
        }
    }

    fn peerjs_closes(&mut self, outs: &[Out]) {
        for o in outs {
            if let Out::Close { conn, .. } = o {
                let more = self.peerjs.disconnect(*conn, self.now());
                check_outs(&more);
            }
        }
    }

    fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    fn expand(&self, text: &str) -> String {
        if !text.contains('$') || self.ids.is_empty() {
            return text.to_string();
        }
        let mut s = text.to_string();
        for d in 0..10 {
            let id = &self.ids[d % self.ids.len()];
            s = s.replace(&format!("${d}"), id);
        }
        s
    }

    fn id(&self, i: u8) -> String {
        if self.ids.is_empty() {
            return "nobody".into();
        }
        self.ids[usize::from(i) % self.ids.len()].clone()
    }

    fn learn(&mut self, outs: &[Out]) {
        check_outs(outs);
        for o in outs {
            if let Out::Send { text, .. } = o {
                let v: Value = serde_json::from_str(text).unwrap();
                if v["type"] == "welcome" {
                    if let (Some(id), Some(r)) = (v["id"].as_str(), v["resume"].as_str()) {
                        if self.ids.len() < 16 && !self.ids.iter().any(|x| x == id) {
                            self.ids.push(id.to_string());
                            self.resumes.push(r.to_string());
                        }
                    }
                }
            }
        }
        assert!(
            self.rooms.live_peers() <= self.cfg.max_peers,
            "max_peers exceeded"
        );
        assert!(self.peerjs.client_count() <= self.cfg.peerjs_concurrent_limit);
    }

    fn native(&mut self, conn: u8, text: &str) {
        let now = self.now();
        let outs = self
            .rooms
            .message(self.ws[usize::from(conn % 8)], text, now);
        self.native_closes(&outs);
        self.learn(&outs);
    }

    fn pj(&mut self, conn: u8, text: &str) {
        let now = self.now();
        let outs = self
            .peerjs
            .message(self.pj[usize::from(conn % 8)], text, now);
        self.peerjs_closes(&outs);
        self.learn(&outs);
    }

    fn op(&mut self, op: &Op) {
        let now = self.now();
        match op {
            Op::Connect {
                conn,
                ip,
                resume,
                forged,
            } => {
                let ip: IpAddr = IPS[usize::from(*ip) % IPS.len()].parse().unwrap();
                let lan = lan_key(ip, self.cfg.lan_ipv6_prefix_len);
                let token = match (resume, forged) {
                    (_, Some(f)) => Some(f.clone()),
                    (Some(i), None) if !self.resumes.is_empty() => {
                        Some(self.resumes[usize::from(*i) % self.resumes.len()].clone())
                    }
                    _ => None,
                };
                let c = self.fresh(true, *conn);
                let outs = self.rooms.connect(c, lan, token.as_deref(), now);
                self.native_closes(&outs);
                self.learn(&outs);
            }
            Op::Text { conn, text } => {
                // The protocol parser alone, then the service.
                let _ = serde_json::from_str::<ClientMsg>(text);
                let t = self.expand(text);
                self.native(*conn, &t);
            }
            Op::Msg { conn, msg } => {
                let v = match msg {
                    Msg::Join(r) => json!({"type": "join", "room": ROOMS[usize::from(*r) % 3]}),
                    Msg::JoinRaw(r) => json!({"type": "join", "room": r}),
                    Msg::Leave(r) => json!({"type": "leave", "room": ROOMS[usize::from(*r) % 3]}),
                    Msg::LeaveLan => json!({"type": "leave", "room": "lan"}),
                    Msg::Signal { to, data } => {
                        json!({"type": "signal", "to": self.id(*to), "data": {"sdp": data}})
                    }
                    Msg::Relay(to) => json!({"type": "relay", "to": self.id(*to)}),
                    Msg::Ping => json!({"type": "ping"}),
                    Msg::Pong => json!({"type": "pong"}),
                };
                self.native(*conn, &v.to_string());
            }
            Op::Alive { conn } => self.rooms.alive(self.ws[usize::from(conn % 8)], now),
            Op::Disconnect { conn } => {
                let outs = self.rooms.disconnect(self.ws[usize::from(conn % 8)], now);
                self.native_closes(&outs);
                self.learn(&outs);
            }
            Op::PjConnect {
                conn,
                key,
                id,
                token,
            } => {
                let id = match id {
                    PjId::Known(i) => PJ_IDS[usize::from(*i) % 4].to_string(),
                    PjId::Raw(s) => s.clone(),
                };
                let key = key.clone().unwrap_or_else(|| self.cfg.peerjs_key.clone());
                let token = token.clone().unwrap_or_else(|| "t".into());
                let c = self.fresh(false, *conn);
                let outs = self
                    .peerjs
                    .connect(c, Some(&key), Some(&id), Some(&token), now);
                self.peerjs_closes(&outs);
                self.learn(&outs);
            }
            Op::PjText { conn, text } => self.pj(*conn, text),
            Op::PjMsg {
                conn,
                kind,
                dst,
                payload,
            } => {
                let kinds = [
                    "HEARTBEAT",
                    "OFFER",
                    "ANSWER",
                    "CANDIDATE",
                    "LEAVE",
                    "EXPIRE",
                    "OTHER",
                ];
                let mut v = json!({"type": kinds[usize::from(*kind) % kinds.len()]});
                match dst {
                    Some(PjId::Known(i)) => v["dst"] = json!(PJ_IDS[usize::from(*i) % 4]),
                    Some(PjId::Raw(s)) => v["dst"] = json!(s),
                    None => {}
                }
                if let Some(p) = payload {
                    v["payload"] = json!({"sdp": p});
                }
                self.pj(*conn, &v.to_string());
            }
            Op::PjDisconnect { conn } => {
                let outs = self.peerjs.disconnect(self.pj[usize::from(conn % 8)], now);
                self.peerjs_closes(&outs);
                self.learn(&outs);
            }
            Op::Tick { secs } => {
                self.elapsed += Duration::from_secs(u64::from(*secs % 600));
                let now = self.now();
                let outs = self.rooms.tick(now);
                self.native_closes(&outs);
                self.learn(&outs);
                let outs = self.peerjs.tick(now);
                self.peerjs_closes(&outs);
                self.learn(&outs);
            }
            Op::ClientIp {
                peer,
                trusted,
                headers,
                prefix,
            } => {
                let peer: IpAddr = IPS[usize::from(*peer) % IPS.len()].parse().unwrap();
                let nets: Vec<IpNet> = match trusted % 3 {
                    0 => vec![],
                    1 => vec![
                        "203.0.113.0/24".parse().unwrap(),
                        "2001:db8::/32".parse().unwrap(),
                    ],
                    _ => vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                };
                let mut h = HeaderMap::new();
                for (fwd, v) in headers.iter().take(8) {
                    let name =
                        HeaderName::from_static(if *fwd { "forwarded" } else { "x-forwarded-for" });
                    if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                        h.append(name, v);
                    }
                }
                let ip = client_ip(peer, &h, &nets);
                let _ = lan_key(ip, prefix % 129);
                if nets.is_empty() {
                    // Headers are believed only from a trusted proxy.
                    assert_eq!(ip, tern::signal::client_ip::canonical(peer));
                }
            }
        }
    }

    fn check_rooms_bounded(&self) {
        assert!(self.rooms.room_count() <= 8 * (self.cfg.max_rooms_per_peer + 1) + 16);
    }
}

fuzz_target!(|input: Input| {
    let mut cfg = SignalConfig::default();
    if input.small_limits {
        cfg.max_peers = 4;
        cfg.max_room_size = 2;
        cfg.max_rooms_per_peer = 2;
        cfg.burst = 5;
        cfg.rate_per_sec = 1;
        cfg.max_message_bytes = 200;
        cfg.peerjs_concurrent_limit = 2;
        cfg.peerjs_queue_bound = 2;
    }
    if input.no_resume_grace {
        cfg.resume_grace_secs = 0;
    }
    let mut h = Harness {
        rooms: RoomService::new(cfg.clone(), input.relay_enabled, StdRng::seed_from_u64(1)),
        peerjs: PeerJsService::new(cfg.clone(), StdRng::seed_from_u64(2)),
        cfg,
        t0: Instant::now(),
        elapsed: Duration::ZERO,
        ids: Vec::new(),
        resumes: Vec::new(),
        ws: [WsId::new(0); 8],
        pj: [WsId::new(0); 8],
        next_conn: 0,
    };
    for op in input.ops.iter().take(128) {
        h.op(op);
        h.check_rooms_bounded();
    }
    // Long silence: every peer times out, every resume and queue expires.
    for _ in 0..4 {
        h.elapsed += Duration::from_secs(3600);
        let now = h.now();
        let outs = h.rooms.tick(now);
        h.native_closes(&outs);
        h.learn(&outs);
        let outs = h.peerjs.tick(now);
        h.peerjs_closes(&outs);
        h.learn(&outs);
    }
    assert_eq!(
        h.rooms.live_peers(),
        0,
        "a silent peer outlived its timeout"
    );
    assert_eq!(h.rooms.room_count(), 0, "rooms left with nobody in them");
    assert_eq!(
        h.peerjs.client_count(),
        0,
        "a PeerJS client outlived alive_timeout"
    );
});
