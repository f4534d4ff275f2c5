//! The native room service: a sans-IO state machine. Events in (connect, message,
//! disconnect, tick with `now`), [`Out`] commands out. No sockets, no clock, no tasks.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::bus::{BusCmd, BusEvent, Chan, Member, RemoteMembers, Undelivered};
use super::names::friendly_name;
use super::protocol::{rate_limited_text, ClientMsg, ErrorCode, PeerInfo, ServerMsg, CLIENT_TYPES};
use super::{shrink_map, Out, Text, WsId};
use crate::config::SignalConfig;
use crate::rate::TokenBucket;

/// A room: the automatic LAN room of a client address, or one joined by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RoomKey {
    Lan(String),
    Named(String),
}

impl RoomKey {
    /// The room's name on the cluster bus (`lan:KEY` or `room:NAME`).
    fn bus_name(&self) -> String {
        match self {
            RoomKey::Lan(k) => format!("lan:{k}"),
            RoomKey::Named(n) => format!("room:{n}"),
        }
    }

    fn from_bus(name: &str) -> Option<RoomKey> {
        if let Some(k) = name.strip_prefix("lan:") {
            Some(RoomKey::Lan(k.to_string()))
        } else {
            name.strip_prefix("room:")
                .map(|n| RoomKey::Named(n.to_string()))
        }
    }

    /// The name clients see: every client sees its own LAN room as `lan`.
    fn label(&self) -> &str {
        match self {
            RoomKey::Lan(_) => "lan",
            RoomKey::Named(n) => n,
        }
    }
}

struct Peer {
    id: String,
    name: String,
    resume: String,
    conn: Option<WsId>,
    lan: RoomKey,
    /// Rooms the peer is in; kept while detached so a resume rejoins them.
    rooms: BTreeSet<RoomKey>,
    last_seen: Instant,
    last_ping: Instant,
    detached_at: Option<Instant>,
    bucket: TokenBucket,
    /// Set while the rate limit is refusing this peer's messages (boxed: rare, and idle
    /// peers should stay small).
    flood: Option<Box<Flood>>,
}

/// A rate-limit episode: from the first refused message until a second passes without one.
/// The sender hears of it at once and then at most once per [`REPORT_EVERY`].
#[derive(Debug, Clone, Copy)]
struct Flood {
    last_refusal: Instant,
    last_report: Instant,
    /// Refused since the last report.
    unreported: u64,
    /// Refused in this episode; past [`FLOOD_FACTOR`] × burst the connection is closed.
    total: u64,
}

impl Flood {
    /// Everything reported, and a second without a refusal or an error since: a later
    /// refusal starts a new episode (whose first error is then at least a second after
    /// the last one).
    fn is_over(&self, now: Instant) -> bool {
        self.unreported == 0
            && now.saturating_duration_since(self.last_refusal) >= REPORT_EVERY
            && now.saturating_duration_since(self.last_report) >= REPORT_EVERY
    }
}

/// Counts of refused messages reach the sender at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A connection refused more than this many bursts' worth of messages in one episode has
/// ignored the error and keeps flooding: it is closed with 1008.
const FLOOD_FACTOR: u64 = 4;
const FLOOD_REASON: &str = "flooding: over signal.rate_per_sec after a rate-limited error";

/// Labels of [`RoomStats::refused`]: why a message was not carried out (each one answered
/// with an error; see [`refusal_reason`]).
pub const REFUSAL_REASONS: [&str; 8] = [
    "rate_limit",
    "too_large",
    "invalid",
    "no_target",
    "room_limit",
    "relay_unavailable",
    "cluster_unavailable",
    "cluster_busy",
];
const R_RATE: usize = 0;

/// The error a signal or relay request gets when its target cannot take it, on one node
/// (`check_target`) and across nodes ([`BusEvent::Undeliverable`]) alike.
fn target_error(why: Undelivered) -> (ErrorCode, &'static str) {
    match why {
        Undelivered::NoPeer => (ErrorCode::PeerNotFound, "no connected peer with that id"),
        Undelivered::NotInSharedRoom => (
            ErrorCode::NotInSharedRoom,
            "that peer is not in a room with you",
        ),
    }
}

/// The [`REFUSAL_REASONS`] index an error code is counted under.
fn refusal_reason(code: ErrorCode) -> usize {
    match code {
        ErrorCode::RateLimited => R_RATE,
        ErrorCode::TooLarge => 1,
        ErrorCode::BadJson
        | ErrorCode::UnknownType
        | ErrorCode::BadMessage
        | ErrorCode::BinaryNotSupported
        | ErrorCode::BadRoom
        | ErrorCode::NotInRoom => 2,
        ErrorCode::PeerNotFound | ErrorCode::NotInSharedRoom => 3,
        ErrorCode::RoomFull | ErrorCode::TooManyRooms => 4,
        ErrorCode::RelayUnavailable => 5,
        ErrorCode::ClusterUnavailable => 6,
        ErrorCode::ClusterBusy => 7,
    }
}

/// Labels of [`RoomStats::messages`]: the client message types, then "invalid" (too
/// large, not JSON, unknown type or bad fields).
pub const MESSAGE_TYPES: [&str; 7] = [
    "join", "leave", "signal", "relay", "ping", "pong", "invalid",
];
const INVALID: usize = 6;

/// Counters for the metrics face.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoomStats {
    pub bad_messages: u64,
    pub rate_limited: u64,
    /// Signals delivered to a peer's connection. One that crosses the cluster bus is
    /// counted once, by the node that delivers it, so the counter only ever grows.
    pub signals_forwarded: u64,
    /// Messages accepted past the rate limit, by type ([`MESSAGE_TYPES`]).
    pub messages: [u64; MESSAGE_TYPES.len()],
    /// Messages refused, by reason ([`REFUSAL_REASONS`]).
    pub refused: [u64; REFUSAL_REASONS.len()],
    /// Connections closed with 1008 for flooding.
    pub flood_closed: u64,
}

/// A `/relay` session the service granted to two peers sharing a room: the driver registers
/// the tickets with the relay and sends each peer its ticket (see [`relay_ticket_text`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RelayGrant {
    pub session: u64,
    /// (connection, peer id of the *other* side, ticket) for each side.
    pub sides: [(WsId, String, String); 2],
    /// Cluster mode: side 1 is a peer on another node. This node hosts the session; once
    /// it is registered, side 1's ticket goes out as this bus command (its connection in
    /// `sides` is then the requester's and is not written to).
    pub remote: Option<super::bus::BusCmd>,
}

/// The text of a `relay-ticket` message.
pub fn relay_ticket_text(other: &str, ticket: &str, ttl_secs: u32) -> String {
    ticket_text(other, ticket, ttl_secs, None)
}

fn ticket_text(other: &str, ticket: &str, ttl_secs: u32, url: Option<&str>) -> String {
    ServerMsg::RelayTicket {
        peer: other,
        ticket,
        path: "/relay",
        url,
        expires_in: ttl_secs,
    }
    .to_text()
}

/// The room service. One per daemon; the driver serializes calls.
pub struct RoomService {
    cfg: SignalConfig,
    relay_enabled: bool,
    rng: StdRng,
    conns: HashMap<WsId, String>,
    peers: HashMap<String, Peer>,
    by_resume: HashMap<String, String>,
    rooms: HashMap<RoomKey, BTreeSet<String>>,
    next_session: u64,
    stats: RoomStats,
    /// Cluster mode: peers on other nodes and this node's bus sequence (None: one node).
    bus: Option<RemoteMembers>,
    /// Bumped on every local membership change, so the cluster driver republishes the
    /// member list only when it changed.
    members_version: u64,
    /// Cluster mode: this node's `/relay` as peers on other nodes reach it
    /// (from `cluster.advertise_http_url`; None: cross-node relays are refused).
    relay_url: Option<String>,
}

impl RoomService {
    /// Takes reloaded limits (SIGHUP): new messages and connections see them; peers and
    /// rooms already present stay.
    pub fn set_config(&mut self, cfg: SignalConfig) {
        self.cfg = cfg;
    }

    /// `rng` makes ids, resume tokens and relay tickets: seed it from the OS
    /// (`StdRng::from_os_rng()`) outside tests, since tokens and tickets are secrets.
    pub fn new(cfg: SignalConfig, relay_enabled: bool, rng: StdRng) -> Self {
        Self {
            cfg,
            relay_enabled,
            rng,
            conns: HashMap::new(),
            peers: HashMap::new(),
            by_resume: HashMap::new(),
            rooms: HashMap::new(),
            next_session: 1,
            stats: RoomStats::default(),
            bus: None,
            members_version: 0,
            relay_url: None,
        }
    }

    pub fn stats(&self) -> RoomStats {
        self.stats
    }

    /// Connected (attached) peers.
    pub fn live_peers(&self) -> usize {
        self.conns.len()
    }

    /// Rooms with at least one member (named rooms and LAN groups).
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    fn token(&mut self, bytes: usize) -> String {
        let mut b = vec![0u8; bytes];
        self.rng.fill(&mut b[..]);
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// A new connection from a client whose LAN key is `lan` (see `client_ip::lan_key`).
    /// `resume` is the token from an earlier `welcome`, if the client has one.
    pub fn connect(
        &mut self,
        conn: WsId,
        lan: String,
        resume: Option<&str>,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let lan = RoomKey::Lan(lan);
        let existing = resume.and_then(|r| self.by_resume.get(r)).cloned();
        // A new peer, and a detached one coming back, take a connection; a socket replacing
        // a live one does not. At `max_peers` they are refused (a resume may try again
        // within the grace period).
        let takes_a_conn = existing
            .as_ref()
            .is_none_or(|id| self.peers.get(id).is_some_and(|p| p.conn.is_none()));
        if takes_a_conn && self.conns.len() >= self.cfg.max_peers {
            out.push(Out::Close {
                conn,
                code: 1013,
                reason: "server full, try again later",
            });
            return out;
        }
        if let Some(id) = existing {
            // Same peer again: a reconnect within the grace period, or a new socket
            // replacing one the server has not noticed is dead yet. The token is single-use:
            // the welcome carries a fresh one and the old one is dead (a leaked token
            // cannot take the id over and over).
            let fresh = self.token(16);
            let peer = self.peers.get_mut(&id).expect("resume index is consistent");
            let used = std::mem::replace(&mut peer.resume, fresh.clone());
            self.by_resume.remove(&used);
            self.by_resume.insert(fresh, id.clone());
            let peer = self.peers.get_mut(&id).expect("still there");
            if let Some(old) = peer.conn.take() {
                self.conns.remove(&old);
                out.push(Out::Close {
                    conn: old,
                    code: 4000,
                    reason: "replaced by a new connection",
                });
                // Leave the rooms as a disconnect would; they are rejoined below.
                let rooms: Vec<RoomKey> = peer.rooms.iter().cloned().collect();
                for r in &rooms {
                    self.remove_from_room(&id, r, &mut out);
                }
            }
            let peer = self.peers.get_mut(&id).expect("still there");
            peer.detached_at = None;
            peer.conn = Some(conn);
            peer.last_seen = now;
            peer.last_ping = now;
            peer.flood = None;
            // The LAN room follows the client's current address; named rooms are kept.
            let named = peer
                .rooms
                .iter()
                .filter(|r| matches!(r, RoomKey::Named(_)))
                .cloned();
            let targets: Vec<RoomKey> = std::iter::once(lan.clone()).chain(named).collect();
            peer.lan = lan;
            peer.rooms.clear();
            self.conns.insert(conn, id.clone());
            self.enter_rooms(conn, &id, true, targets, &mut out);
            return out;
        }
        let id = loop {
            let id = self.token(8);
            if !self.peers.contains_key(&id) {
                break id;
            }
        };
        let resume = self.token(16);
        let name = friendly_name(&mut self.rng);
        let bucket = TokenBucket::new(
            f64::from(self.cfg.rate_per_sec),
            f64::from(self.cfg.burst),
            now,
        );
        self.peers.insert(
            id.clone(),
            Peer {
                id: id.clone(),
                name,
                resume: resume.clone(),
                conn: Some(conn),
                lan: lan.clone(),
                rooms: BTreeSet::new(),
                last_seen: now,
                last_ping: now,
                detached_at: None,
                bucket,
                flood: None,
            },
        );
        self.by_resume.insert(resume, id.clone());
        self.conns.insert(conn, id.clone());
        self.enter_rooms(conn, &id, false, vec![lan], &mut out);
        out
    }

    /// Welcomes the peer into `rooms`, skipping (with a `room-full` error) any room at
    /// `max_room_size`: a LAN room too, so thousands of clients behind one address (or an
    /// untrusted proxy) cannot make every join a broadcast to thousands.
    fn enter_rooms(
        &mut self,
        conn: WsId,
        id: &str,
        resumed: bool,
        rooms: Vec<RoomKey>,
        out: &mut Vec<Out>,
    ) {
        let max = self.cfg.max_room_size;
        let (fits, full): (Vec<RoomKey>, Vec<RoomKey>) = rooms
            .into_iter()
            .partition(|r| self.rooms.get(r).map_or(0, BTreeSet::len) < max);
        self.send_welcome(id, resumed, &fits, out);
        for r in full {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::RoomFull,
                format!("room {:?} holds at most {max} peers", r.label()),
                None,
            ));
        }
        for room in fits {
            self.add_to_room(id, room, out);
        }
    }

    fn send_welcome(&self, id: &str, resumed: bool, rooms: &[RoomKey], out: &mut Vec<Out>) {
        let p = &self.peers[id];
        let text = ServerMsg::Welcome {
            id: &p.id,
            name: &p.name,
            resume: &p.resume,
            resumed,
            rooms: rooms.iter().map(RoomKey::label).collect(),
        }
        .to_text();
        out.push(Out::Send {
            conn: p.conn.expect("welcome goes to an attached peer"),
            text: text.into(),
        });
    }

    fn in_room(&self, id: &str, room: &RoomKey) -> bool {
        self.rooms.get(room).is_some_and(|m| m.contains(id))
    }

    fn info(&self, id: &str) -> PeerInfo {
        let p = &self.peers[id];
        PeerInfo {
            id: p.id.clone(),
            name: p.name.clone(),
        }
    }

    /// Adds `id` to `room`: the member list to it, `peer-joined` to the others.
    fn add_to_room(&mut self, id: &str, room: RoomKey, out: &mut Vec<Out>) {
        let members = self.rooms.entry(room.clone()).or_default();
        let others: Vec<String> = members.iter().cloned().collect();
        members.insert(id.to_string());
        self.peers.get_mut(id).unwrap().rooms.insert(room.clone());
        let me = self.info(id);
        let mut peers: Vec<PeerInfo> = others.iter().map(|o| self.info(o)).collect();
        if let Some(b) = self.bus.as_mut() {
            let bus_room = room.bus_name();
            if others.is_empty() {
                // The room's first member here: listen to its channel (and read who is in
                // it elsewhere) before announcing the join.
                out.push(Out::Bus(b.subscribe(&bus_room)));
            }
            peers.extend(
                b.members(&bus_room)
                    .into_iter()
                    .map(|(id, name)| PeerInfo { id, name }),
            );
            out.push(Out::Bus(b.publish(
                Chan::Room(bus_room.clone()),
                BusEvent::Joined {
                    room: bus_room,
                    id: me.id.clone(),
                    name: me.name.clone(),
                },
            )));
            self.members_version += 1;
        }
        let conn = self.peers[id].conn.expect("joining peer is attached");
        out.push(Out::Send {
            conn,
            text: ServerMsg::Room {
                room: room.label(),
                peers,
            }
            .to_text()
            .into(),
        });
        let joined: Text = ServerMsg::PeerJoined {
            room: room.label(),
            peer: me,
        }
        .to_text()
        .into();
        for o in others {
            if let Some(c) = self.peers[&o].conn {
                out.push(Out::Send {
                    conn: c,
                    text: joined.clone(),
                });
            }
        }
    }

    /// Removes `id` from `room` and tells the remaining members.
    fn remove_from_room(&mut self, id: &str, room: &RoomKey, out: &mut Vec<Out>) {
        let Some(members) = self.rooms.get_mut(room) else {
            return;
        };
        if !members.remove(id) {
            return;
        }
        let rest: Vec<String> = members.iter().cloned().collect();
        if rest.is_empty() {
            self.rooms.remove(room);
        }
        if let Some(b) = self.bus.as_mut() {
            let bus_room = room.bus_name();
            let chan = Chan::Room(bus_room.clone());
            out.push(Out::Bus(b.publish(
                chan.clone(),
                BusEvent::Left {
                    room: bus_room.clone(),
                    id: id.to_string(),
                },
            )));
            if rest.is_empty() {
                // Its last member here: stop listening; this node's sequence for the room
                // ends with that leave.
                out.push(Out::Bus(b.unsubscribe(&bus_room)));
                b.end_sequence(&chan);
            }
            self.members_version += 1;
        }
        let left: Text = ServerMsg::PeerLeft {
            room: room.label(),
            id,
        }
        .to_text()
        .into();
        for o in rest {
            if let Some(c) = self.peers[&o].conn {
                out.push(Out::Send {
                    conn: c,
                    text: left.clone(),
                });
            }
        }
    }

    /// An error answer, counted under its [`refusal_reason`].
    fn error(
        stats: &mut RoomStats,
        conn: WsId,
        code: ErrorCode,
        message: String,
        to: Option<&str>,
    ) -> Out {
        stats.refused[refusal_reason(code)] += 1;
        Out::Send {
            conn,
            text: ServerMsg::Error { code, message, to }.to_text().into(),
        }
    }

    /// Any frame (including a WebSocket pong) proves the peer alive.
    pub fn alive(&mut self, conn: WsId, now: Instant) {
        if let Some(p) = self.conns.get(&conn).and_then(|id| self.peers.get_mut(id)) {
            p.last_seen = now;
        }
    }

    /// A binary frame from `conn`: signaling is JSON text, so it is answered with
    /// `binary-not-supported` and counted (reason `invalid`).
    pub fn binary(&mut self, conn: WsId, now: Instant) -> Vec<Out> {
        self.alive(conn, now);
        vec![Self::error(
            &mut self.stats,
            conn,
            ErrorCode::BinaryNotSupported,
            "signaling uses JSON text frames".into(),
            None,
        )]
    }

    /// The driver could not register a granted relay session (the relay is disabled or at
    /// `relay_ws.max_sessions`): the asking side gets `relay-unavailable`, counted.
    pub fn relay_refused(&mut self, conn: WsId, to: &str, message: String) -> Out {
        Self::error(
            &mut self.stats,
            conn,
            ErrorCode::RelayUnavailable,
            message,
            Some(to),
        )
    }

    /// A text frame from `conn`.
    pub fn message(&mut self, conn: WsId, text: &str, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(id) = self.conns.get(&conn).cloned() else {
            return out;
        };
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.burst);
        let max = self.cfg.max_message_bytes;
        {
            let p = self.peers.get_mut(&id).unwrap();
            p.last_seen = now;
            if !p.bucket.try_take(1.0, now) {
                self.stats.rate_limited += 1;
                self.stats.refused[R_RATE] += 1;
                let Some(f) = p.flood.as_mut() else {
                    p.flood = Some(Box::new(Flood {
                        last_refusal: now,
                        last_report: now,
                        unreported: 0,
                        total: 1,
                    }));
                    let message = format!(
                        "more than {rate} messages/s (burst {burst}; signal.rate_per_sec, \
                         signal.burst): this message and later ones are refused until the \
                         rate falls; counts follow at most once a second, and a connection \
                         that keeps on is closed with 1008"
                    );
                    out.push(Out::Send {
                        conn,
                        text: rate_limited_text(&message, 1).into(),
                    });
                    return out;
                };
                f.total += 1;
                f.unreported += 1;
                f.last_refusal = now;
                if f.total > u64::from(burst) * FLOOD_FACTOR {
                    // It ignored the error and kept on: cut it off.
                    self.stats.flood_closed += 1;
                    self.conns.remove(&conn);
                    out.push(Out::Close {
                        conn,
                        code: 1008,
                        reason: FLOOD_REASON,
                    });
                    self.detach(&id, now, &mut out);
                } else if let Some(o) = Self::report_refused(conn, rate, f, now) {
                    out.push(o);
                }
                return out;
            }
            if let Some(f) = p.flood.as_mut() {
                out.extend(Self::report_refused(conn, rate, f, now));
                if f.is_over(now) {
                    p.flood = None;
                }
            }
        }
        if text.len() > max {
            self.stats.bad_messages += 1;
            self.stats.messages[INVALID] += 1;
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::TooLarge,
                format!(
                    "message of {} bytes exceeds signal.max_message_bytes = {max}",
                    text.len()
                ),
                None,
            ));
            return out;
        }
        let msg = match serde_json::from_str::<ClientMsg>(text) {
            Ok(m) => m,
            Err(e) => {
                self.stats.bad_messages += 1;
                self.stats.messages[INVALID] += 1;
                let (code, message) = classify_parse_error(text, &e);
                tracing::debug!(%conn, ?code, "bad signaling message");
                out.push(Self::error(&mut self.stats, conn, code, message, None));
                return out;
            }
        };
        let kind = match &msg {
            ClientMsg::Join { .. } => 0,
            ClientMsg::Leave { .. } => 1,
            ClientMsg::Signal { .. } => 2,
            ClientMsg::Relay { .. } => 3,
            ClientMsg::Ping => 4,
            ClientMsg::Pong => 5,
        };
        self.stats.messages[kind] += 1;
        match msg {
            ClientMsg::Ping => out.push(Out::Send {
                conn,
                text: ServerMsg::Pong.to_text().into(),
            }),
            ClientMsg::Pong => {}
            ClientMsg::Join { room } => self.join(conn, &id, room, &mut out),
            ClientMsg::Leave { room } => {
                let key = self.key_for(&id, &room);
                if !self.in_room(&id, &key) {
                    out.push(Self::error(
                        &mut self.stats,
                        conn,
                        ErrorCode::NotInRoom,
                        format!("not in room {room:?}"),
                        None,
                    ));
                } else {
                    self.remove_from_room(&id, &key, &mut out);
                    self.peers.get_mut(&id).unwrap().rooms.remove(&key);
                    out.push(Out::Send {
                        conn,
                        text: ServerMsg::Left { room: &room }.to_text().into(),
                    });
                }
            }
            ClientMsg::Signal { to, data } if self.is_remote(&to) => {
                self.signal_remote(conn, &id, to, data, &mut out)
            }
            ClientMsg::Signal { to, data } => {
                if let Some(target) = self.check_target(conn, &id, &to, &mut out) {
                    self.stats.signals_forwarded += 1;
                    // `from` is always set here, from the connection: never from the client.
                    out.push(Out::Send {
                        conn: target,
                        text: ServerMsg::Signal {
                            from: &id,
                            data: &data,
                        }
                        .to_text()
                        .into(),
                    });
                }
            }
            ClientMsg::Relay { to } if self.relay_enabled && self.is_remote(&to) => {
                self.relay_remote(conn, &id, to, &mut out)
            }
            ClientMsg::Relay { to } => {
                if !self.relay_enabled {
                    out.push(Self::error(
                        &mut self.stats,
                        conn,
                        ErrorCode::RelayUnavailable,
                        "the WebSocket relay is disabled on this server".into(),
                        Some(&to),
                    ));
                } else if let Some(target) = self.check_target(conn, &id, &to, &mut out) {
                    let session = self.next_session;
                    self.next_session += 1;
                    let (ta, tb) = (self.token(16), self.token(16));
                    out.push(Out::Relay(RelayGrant {
                        session,
                        sides: [(conn, to.clone(), ta), (target, id.clone(), tb)],
                        remote: None,
                    }));
                }
            }
        }
        out
    }

    /// The count refused since the last report, if there is one and a report is due.
    fn report_refused(conn: WsId, rate: u32, f: &mut Flood, now: Instant) -> Option<Out> {
        if f.unreported == 0 || now.saturating_duration_since(f.last_report) < REPORT_EVERY {
            return None;
        }
        let n = std::mem::take(&mut f.unreported);
        f.last_report = now;
        let message = format!(
            "{n} messages refused since the last report: over {rate} messages/s \
             (signal.rate_per_sec)"
        );
        Some(Out::Send {
            conn,
            text: rate_limited_text(&message, n).into(),
        })
    }

    fn key_for(&self, id: &str, room: &str) -> RoomKey {
        if room == "lan" {
            self.peers[id].lan.clone()
        } else {
            RoomKey::Named(room.to_string())
        }
    }

    fn join(&mut self, conn: WsId, id: &str, room: String, out: &mut Vec<Out>) {
        let valid = !room.is_empty()
            && room.len() <= 64
            && room
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid || room == "lan" {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::BadRoom,
                "room names are 1-64 characters of A-Z a-z 0-9 - _ . (and not \"lan\")".into(),
                None,
            ));
            return;
        }
        let key = RoomKey::Named(room);
        if self.in_room(id, &key) {
            // Idempotent: resend the member list.
            let peers = self.rooms[&key]
                .iter()
                .filter(|m| m.as_str() != id)
                .map(|m| self.info(m))
                .collect();
            out.push(Out::Send {
                conn,
                text: ServerMsg::Room {
                    room: key.label(),
                    peers,
                }
                .to_text()
                .into(),
            });
            return;
        }
        let named = self.peers[id]
            .rooms
            .iter()
            .filter(|r| matches!(r, RoomKey::Named(_)))
            .count();
        if named >= self.cfg.max_rooms_per_peer {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::TooManyRooms,
                format!(
                    "at most {} named rooms per peer",
                    self.cfg.max_rooms_per_peer
                ),
                None,
            ));
            return;
        }
        if self.rooms.get(&key).map_or(0, BTreeSet::len) >= self.cfg.max_room_size {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::RoomFull,
                format!("room holds at most {} peers", self.cfg.max_room_size),
                None,
            ));
            return;
        }
        self.add_to_room(id, key, out);
    }

    /// The target's connection if it exists, is connected and shares a room with `id`.
    fn check_target(&mut self, conn: WsId, id: &str, to: &str, out: &mut Vec<Out>) -> Option<WsId> {
        let target = self.peers.get(to).and_then(|t| t.conn.map(|c| (t, c)));
        let why = match target {
            None => Undelivered::NoPeer,
            Some((t, tconn)) => {
                let me = &self.peers[id];
                if t.id != me.id && !me.rooms.is_disjoint(&t.rooms) {
                    return Some(tconn);
                }
                Undelivered::NotInSharedRoom
            }
        };
        let (code, message) = target_error(why);
        out.push(Self::error(
            &mut self.stats,
            conn,
            code,
            message.into(),
            Some(to),
        ));
        None
    }

    /// The connection closed (or the driver dropped it).
    pub fn disconnect(&mut self, conn: WsId, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        if let Some(id) = self.conns.remove(&conn) {
            self.detach(&id, now, &mut out);
        }
        out
    }

    /// Leaves every room (members are told now) but keeps id and room list for a resume.
    fn detach(&mut self, id: &str, now: Instant, out: &mut Vec<Out>) {
        let rooms: Vec<RoomKey> = self.peers[id].rooms.iter().cloned().collect();
        for r in &rooms {
            self.remove_from_room(id, r, out);
        }
        let p = self.peers.get_mut(id).unwrap();
        p.conn = None;
        p.detached_at = Some(now);
        if self.cfg.resume_grace_secs == 0 {
            self.forget(id);
        }
    }

    fn forget(&mut self, id: &str) {
        if let Some(p) = self.peers.remove(id) {
            self.by_resume.remove(&p.resume);
        }
        // Give memory back after a crowd leaves.
        shrink_map(&mut self.peers);
        shrink_map(&mut self.by_resume);
        shrink_map(&mut self.conns);
        shrink_map(&mut self.rooms);
    }

    /// Periodic work: pings quiet peers, drops silent ones, forgets expired resumes.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let ping = Duration::from_secs(self.cfg.ping_interval_secs.into());
        let timeout = Duration::from_secs(self.cfg.peer_timeout_secs.into());
        let grace = Duration::from_secs(self.cfg.resume_grace_secs.into());
        let rate = self.cfg.rate_per_sec;
        let mut dead = Vec::new();
        let mut expired = Vec::new();
        for p in self.peers.values_mut() {
            match (p.conn, p.detached_at) {
                (Some(conn), _) => {
                    // Refusals that stopped still get their count, and the episode ends.
                    if let Some(f) = p.flood.as_mut() {
                        out.extend(Self::report_refused(conn, rate, f, now));
                        if f.is_over(now) {
                            p.flood = None;
                        }
                    }
                    let quiet = now.saturating_duration_since(p.last_seen);
                    if quiet >= timeout {
                        dead.push((conn, p.id.clone()));
                    } else if quiet >= ping && now.saturating_duration_since(p.last_ping) >= ping {
                        p.last_ping = now;
                        out.push(Out::Ping { conn });
                    }
                }
                (None, Some(at)) if now.saturating_duration_since(at) >= grace => {
                    expired.push(p.id.clone());
                }
                _ => {}
            }
        }
        for (conn, id) in dead {
            self.conns.remove(&conn);
            out.push(Out::Close {
                conn,
                code: 4001,
                reason: "heartbeat timeout",
            });
            self.detach(&id, now, &mut out);
        }
        for id in expired {
            self.forget(&id);
        }
        out
    }
}

/// Cluster mode (`[cluster]`): the bus inputs and outputs of the room service. The cluster
/// driver feeds events from other nodes in and carries [`Out::Bus`] commands out; without
/// [`RoomService::enable_bus`] none of this is consulted.
impl RoomService {
    /// Turns cluster mode on: joins, leaves and cross-node signals become bus commands.
    /// `now_unix_us`: the driver's wall clock, where this node's sequence epochs start.
    pub fn enable_bus(&mut self, now_unix_us: u64) {
        self.bus = Some(RemoteMembers::new(now_unix_us));
    }

    /// This node's `/relay` URL for peers on other nodes (`ws(s)://…/relay`): with it, a
    /// `relay` to a peer on another node is hosted here.
    pub fn set_relay_url(&mut self, url: String) {
        self.relay_url = Some(url);
    }

    /// Redis reachable or not: while not, signals to peers on other nodes are refused.
    pub fn bus_state(&mut self, up: bool) {
        if let Some(b) = self.bus.as_mut() {
            b.up = up;
        }
    }

    /// This node's attached peers and their rooms (the list other nodes resync from), and
    /// a version that changes whenever it does.
    pub fn bus_members(&self) -> (u64, Vec<Member>) {
        let list = self
            .peers
            .values()
            .filter(|p| p.conn.is_some() && !p.rooms.is_empty())
            .map(|p| Member {
                id: p.id.clone(),
                name: p.name.clone(),
                rooms: p.rooms.iter().map(RoomKey::bus_name).collect(),
            })
            .collect();
        (self.members_version, list)
    }

    /// Peer `id`'s entry in [`RoomService::bus_members`] now.
    pub fn bus_member(&self, id: &str) -> Option<Member> {
        let p = self.peers.get(id)?;
        (p.conn.is_some() && !p.rooms.is_empty()).then(|| Member {
            id: p.id.clone(),
            name: p.name.clone(),
            rooms: p.rooms.iter().map(RoomKey::bus_name).collect(),
        })
    }

    /// The rooms with a member here, whose channels this node listens to.
    pub fn bus_rooms(&self) -> Vec<String> {
        self.bus
            .as_ref()
            .map_or_else(Vec::new, RemoteMembers::subscribed)
    }

    /// Without the bus this is one branch: the single-node signal path is unchanged.
    fn is_remote(&self, id: &str) -> bool {
        self.bus.as_ref().is_some_and(|b| b.is_remote(id)) && !self.peers.contains_key(id)
    }

    /// A `signal` to a peer on another node: published when it shares a room with the
    /// sender and the bus is up, else refused with the documented error.
    fn signal_remote(
        &mut self,
        conn: WsId,
        id: &str,
        to: String,
        data: serde_json::Value,
        out: &mut Vec<Out>,
    ) {
        let rooms: BTreeSet<String> = self.peers[id].rooms.iter().map(RoomKey::bus_name).collect();
        let Some(b) = self.bus.as_mut() else { return };
        let Some(node) = b.shared(&to, &rooms).map(str::to_string) else {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::NotInSharedRoom,
                "that peer is not in a room with you".into(),
                Some(&to),
            ));
            return;
        };
        if !b.up {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::ClusterUnavailable,
                "that peer is on another node and the cluster bus is unavailable; not sent".into(),
                Some(&to),
            ));
        } else {
            // Counted by the node that delivers it.
            out.push(Out::Bus(b.publish(
                Chan::Node(node),
                BusEvent::Signal {
                    to,
                    from: id.to_string(),
                    data,
                },
            )));
        }
    }

    /// A `relay` to a peer on another node: this node hosts the session (its relay is the
    /// requester's), and the other side's ticket travels on the bus with this node's relay
    /// URL, so both sides meet here and no relayed byte crosses Redis.
    fn relay_remote(&mut self, conn: WsId, id: &str, to: String, out: &mut Vec<Out>) {
        let rooms: BTreeSet<String> = self.peers[id].rooms.iter().map(RoomKey::bus_name).collect();
        let Some(b) = self.bus.as_mut() else { return };
        let node = b.shared(&to, &rooms).map(str::to_string);
        let refusal = if node.is_none() {
            Some((
                ErrorCode::NotInSharedRoom,
                "that peer is not in a room with you",
            ))
        } else if !b.up {
            Some((
                ErrorCode::ClusterUnavailable,
                "that peer is on another node and the cluster bus is unavailable; no relay",
            ))
        } else if self.relay_url.is_none() {
            Some((
                ErrorCode::RelayUnavailable,
                "that peer is on another node and this node has no cluster.advertise_http_url \
                 for it to reach this relay",
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            out.push(Self::error(
                &mut self.stats,
                conn,
                code,
                message.into(),
                Some(&to),
            ));
            return;
        }
        let session = self.next_session;
        self.next_session += 1;
        let (ta, tb) = (self.token(16), self.token(16));
        let url = self.relay_url.clone().unwrap_or_default();
        let Some(b) = self.bus.as_mut() else { return };
        let cmd = b.publish(
            Chan::Node(node.unwrap_or_default()),
            BusEvent::RelayTicket {
                to: to.clone(),
                from: id.to_string(),
                ticket: tb.clone(),
                url,
                expires_in: self.cfg.relay_ticket_ttl_secs,
            },
        );
        out.push(Out::Relay(RelayGrant {
            session,
            sides: [(conn, to, ta), (conn, id.to_string(), tb)],
            remote: Some(cmd),
        }));
    }

    /// Sends `text` to the attached local members of bus room `room` (serialised once,
    /// shared by every recipient).
    fn tell_local(&self, room: &RoomKey, text: &str, out: &mut Vec<Out>) {
        let text = Text::from(text.to_string());
        for m in self.rooms.get(room).into_iter().flatten() {
            if let Some(c) = self.peers.get(m).and_then(|p| p.conn) {
                out.push(Out::Send {
                    conn: c,
                    text: text.clone(),
                });
            }
        }
    }

    fn remote_joined(&self, room: &str, id: &str, name: &str, out: &mut Vec<Out>) {
        if let Some(key) = RoomKey::from_bus(room) {
            let peer = PeerInfo {
                id: id.to_string(),
                name: name.to_string(),
            };
            let text = ServerMsg::PeerJoined {
                room: key.label(),
                peer,
            }
            .to_text();
            self.tell_local(&key, &text, out);
        }
    }

    fn remote_left(&self, room: &str, id: &str, out: &mut Vec<Out>) {
        if let Some(key) = RoomKey::from_bus(room) {
            let text = ServerMsg::PeerLeft {
                room: key.label(),
                id,
            }
            .to_text();
            self.tell_local(&key, &text, out);
        }
    }

    /// An event published by `node` with number `seq` of its sequence `ep` for the
    /// channel it came on.
    pub fn bus_event(&mut self, node: &str, ep: u64, seq: u64, ev: BusEvent) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(b) = self.bus.as_mut() else {
            return out;
        };
        if !b.accept(node, ep, seq, &ev, &mut out) {
            return out;
        }
        match ev {
            BusEvent::Joined { room, id, name } => {
                if b.join(node, &room, &id, &name) {
                    self.remote_joined(&room, &id, &name, &mut out);
                }
            }
            BusEvent::Left { room, id } => {
                if b.leave(&room, &id) {
                    self.remote_left(&room, &id, &mut out);
                }
            }
            BusEvent::Signal { to, from, data } => match self.bus_target(&to, &from) {
                Ok(conn) => {
                    self.stats.signals_forwarded += 1;
                    out.push(Out::Send {
                        conn,
                        text: ServerMsg::Signal {
                            from: &from,
                            data: &data,
                        }
                        .to_text()
                        .into(),
                    });
                }
                Err(why) => out.extend(self.undeliverable(node, from, to, why, None)),
            },
            BusEvent::RelayTicket {
                to,
                from,
                ticket,
                url,
                expires_in,
            } => match self.bus_target(&to, &from) {
                Ok(conn) => out.push(Out::Send {
                    conn,
                    text: ticket_text(&from, &ticket, expires_in, Some(&url)).into(),
                }),
                Err(why) => out.extend(self.undeliverable(node, from, to, why, Some(ticket))),
            },
            BusEvent::Undeliverable {
                to,
                peer,
                why,
                ticket,
            } => self.undelivered(to, &peer, why, ticket, &mut out),
            // PeerJS events travel on their own channel, never this one.
            BusEvent::PeerjsOpen { .. }
            | BusEvent::PeerjsClose { .. }
            | BusEvent::Peerjs { .. } => {}
        }
        out
    }

    /// The local connection for a signal or relay ticket from `from` (a peer on another
    /// node) to `to`: the checks `check_target` makes on one node, `to` connected here and
    /// sharing a room with `from`.
    fn bus_target(&self, to: &str, from: &str) -> Result<WsId, Undelivered> {
        let Some((p, conn)) = self.peers.get(to).and_then(|p| p.conn.map(|c| (p, c))) else {
            return Err(Undelivered::NoPeer);
        };
        let rooms: BTreeSet<String> = p.rooms.iter().map(RoomKey::bus_name).collect();
        match self.bus.as_ref().and_then(|b| b.shared(from, &rooms)) {
            Some(_) => Ok(conn),
            None => Err(Undelivered::NotInSharedRoom),
        }
    }

    /// A signal or relay ticket from `from` on `node` that cannot reach `to` here: the
    /// answer for `node`, which refuses it to its sender ([`Self::undelivered`]).
    fn undeliverable(
        &mut self,
        node: &str,
        from: String,
        to: String,
        why: Undelivered,
        ticket: Option<String>,
    ) -> Option<Out> {
        let b = self.bus.as_mut()?;
        let ev = BusEvent::Undeliverable {
            to: from,
            peer: to,
            why,
            ticket,
        };
        Some(Out::Bus(b.publish(Chan::Node(node.to_string()), ev)))
    }

    /// Another node could not deliver what local peer `to` sent to its peer `peer`: `to`
    /// gets the error one node gives for that target (counted under its reason,
    /// `no_target`), and a relay's session (of `ticket`) ends at once, closing the
    /// requester's `/relay` socket with 1013 if it already waits there. A sender that is
    /// gone too is told nothing, but the refusal is still counted.
    fn undelivered(
        &mut self,
        to: String,
        peer: &str,
        why: Undelivered,
        ticket: Option<String>,
        out: &mut Vec<Out>,
    ) {
        let (code, message) = target_error(why);
        if let Some(ticket) = ticket {
            out.push(Out::CancelRelay {
                ticket,
                reason: "the other peer is not connected to its node; no relay",
            });
        }
        match self.peers.get(&to).and_then(|p| p.conn) {
            Some(conn) => out.push(Self::error(
                &mut self.stats,
                conn,
                code,
                message.into(),
                Some(peer),
            )),
            None => self.stats.refused[refusal_reason(code)] += 1,
        }
    }

    /// A bus command the driver could not queue (its queue to Redis is full), or one in
    /// flight when Redis was lost: a signal's or a relay ticket's sender is told
    /// (`cluster-busy`), and a relay ticket's session is cancelled so the requester's side,
    /// if already connected to `/relay`, is closed at once rather than at the ticket's
    /// expiry; a lost join or leave needs nothing here, since the receivers see the gap in
    /// this node's sequence and resync.
    pub fn bus_refused(&mut self, cmd: BusCmd) -> Vec<Out> {
        let mut out = Vec::new();
        let BusCmd::Publish { ev, .. } = cmd else {
            return out;
        };
        let (from, to, what) = match ev {
            BusEvent::Signal { from, to, .. } => (from, to, "not sent"),
            BusEvent::RelayTicket {
                from, to, ticket, ..
            } => {
                out.push(Out::CancelRelay {
                    ticket,
                    reason: "the other peer is on another node and the cluster bus could not \
                             carry its ticket",
                });
                (from, to, "no relay")
            }
            _ => return out,
        };
        if let Some(conn) = self.peers.get(&from).and_then(|p| p.conn) {
            out.push(Self::error(
                &mut self.stats,
                conn,
                ErrorCode::ClusterBusy,
                format!("that peer is on another node and the cluster bus is full; {what}"),
                Some(&to),
            ));
        }
        out
    }

    /// `node`'s published member list (after a gap, a reconnect, a new node, or this
    /// node subscribing to `room`; only `room`'s members count when given), or an empty
    /// one when the node is gone: its peers join and leave the local rooms to match.
    pub fn bus_snapshot(&mut self, node: &str, room: Option<&str>, members: &[Member]) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(b) = self.bus.as_mut() else {
            return out;
        };
        let (joined, left) = b.replace_node(node, room, members);
        for (room, id) in left {
            self.remote_left(&room, &id, &mut out);
        }
        for (room, id, name) in joined {
            self.remote_joined(&room, &id, &name, &mut out);
        }
        out
    }
}

/// Tells "not JSON", "unknown type" and "bad fields" apart for a precise error.
fn classify_parse_error(text: &str, e: &serde_json::Error) -> (ErrorCode, String) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return (ErrorCode::BadJson, format!("not valid JSON: {e}"));
    };
    match v.get("type").and_then(|t| t.as_str()) {
        Some(t) if !CLIENT_TYPES.contains(&t) => {
            let t: String = t.chars().take(32).collect();
            (
                ErrorCode::UnknownType,
                format!("unknown message type {t:?}"),
            )
        }
        None => (
            ErrorCode::BadMessage,
            "missing string field \"type\"".into(),
        ),
        Some(_) => (ErrorCode::BadMessage, format!("bad message: {e}")),
    }
}

#[cfg(test)]
#[path = "rooms_tests.rs"]
pub(crate) mod tests;
