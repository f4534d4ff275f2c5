//! The PeerJS server protocol (as the `peer` npm server 1.0 speaks it), sans-IO.
//!
//! WebSocket `{path}/peerjs?key=&id=&token=`: OPEN on success; ERROR with
//! `payload.msg` for missing parameters, a bad key or the concurrent limit; ID-TAKEN when
//! the id is held under another token; a silent re-attach for the same token. OFFER,
//! ANSWER, CANDIDATE, LEAVE and EXPIRE are forwarded as `{type,src,dst,payload}` with
//! `src` set by the server. Messages for an absent peer wait in a queue and are answered
//! with EXPIRE after `expire_timeout`; a client without HEARTBEAT for `alive_timeout` is
//! dropped.
//!
//! Refusals: a PeerJS client aborts its whole Peer on any ERROR message, so no message is
//! refused with ERROR and none is dropped silently. A message that cannot be queued (count
//! or byte budgets) is answered with EXPIRE for its destination at once, as if it had
//! expired; a client past its rate limit or sending a message over the size limit is
//! disconnected with a close code and a reason naming the limit (the client reconnects).
//!
//! Cluster mode (`enable_bus`, docs/cluster.md): an id is claimed cluster-wide before OPEN
//! and messages for an id another node holds go out as bus commands; without it nothing of
//! that runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::bus::{BusCmd, BusEvent, Chan, Member, RemoteMembers, PEERJS_REALM as BUS_ROOM};
use super::{shrink_map, Out, Text, WsId};
use crate::config::SignalConfig;
use crate::rate::TokenBucket;

/// The `peer` server's error texts, which clients show to users.
pub const INVALID_KEY: &str = "Invalid key provided";
pub const INVALID_WS_PARAMETERS: &str = "No id, token, or key supplied to websocket server";
pub const CONNECTION_LIMIT_EXCEED: &str = "Server has reached its concurrent user limit";

/// `GET {path}`: the same info document the `peer` server returns.
pub const INFO_JSON: &str = r#"{"name":"PeerJS Server","description":"A server side element to broker connections between PeerJS clients.","website":"https://peerjs.com/"}"#;

/// Longest id or token accepted (the `peer` server has no limit; memory needs one).
const MAX_ID_LEN: usize = 256;

/// A forwarded message, with the fields the `peer` server sends (absent fields omitted).
/// The payload is the sender's JSON text as it came (never parsed into a tree nor escaped
/// again): one serialization per message, into one allocation of its size.
#[derive(Debug, Clone, Serialize)]
struct Fwd<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    src: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
}

impl Fwd<'_> {
    fn text(&self) -> String {
        let len = |s: Option<&str>| s.map_or(0, str::len);
        let cap = 48 + self.src.len() + len(self.dst) + len(self.payload.map(RawValue::get));
        let mut v = Vec::with_capacity(cap);
        serde_json::to_writer(&mut v, self).expect("serializes");
        String::from_utf8(v).expect("serde_json writes UTF-8")
    }
}

/// A message as a client sends it, borrowed from its frame: no tree, no copies (a string
/// with escapes is the only one unescaped into its own allocation).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "opt_str")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_str")]
    dst: Option<Cow<'a, str>>,
    /// Present (even `null`, forwarded as such) or absent.
    #[serde(borrow, default, deserialize_with = "raw")]
    payload: Option<&'a RawValue>,
}

/// An optional string, borrowed from the input when it has no escapes (serde's own
/// `Option<Cow<str>>` always copies).
fn opt_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

struct Client {
    token: String,
    conn: WsId,
    last_ping: Instant,
    bucket: TokenBucket,
    /// Cluster mode: false until this node's claim of the id in Redis succeeded (no OPEN
    /// yet; messages for it are queued). Always true on a single node.
    claimed: bool,
}

/// A message held for an absent peer, already serialized: it is sent as is.
struct Queued {
    src: String,
    text: String,
}

impl Queued {
    /// Bytes charged to the budgets: the texts plus a fixed allowance for the entry.
    fn cost(&self) -> usize {
        self.src.len() + self.text.len() + QUEUED_OVERHEAD
    }
}

/// Allocation and bookkeeping per queued message beyond its text.
const QUEUED_OVERHEAD: usize = 96;

struct Queue {
    created: Instant,
    msgs: VecDeque<Queued>,
}

/// Labels of [`PeerJsStats::messages`]: PeerJS message types, then "invalid".
pub const MESSAGE_TYPES: [&str; 7] = [
    "heartbeat",
    "offer",
    "answer",
    "candidate",
    "leave",
    "expire",
    "invalid",
];
const INVALID: usize = 6;

/// Labels of [`PeerJsStats::refused`]: why a message was not carried out. `rate_limit` and
/// `too_large` also closed the sender's connection; the `queue_*` ones got EXPIRE at once.
pub const REFUSAL_REASONS: [&str; 8] = [
    "rate_limit",
    "too_large",
    "invalid",
    "queue_full",
    "queue_sender_bytes",
    "queue_total_bytes",
    "cluster_unavailable",
    "cluster_busy",
];
// Indexes of `PeerJsStats::refused`, in [`REFUSAL_REASONS`] order.
pub(crate) const R_RATE: usize = 0;
pub(crate) const R_TOO_LARGE: usize = 1;
const R_INVALID: usize = 2;
const R_QUEUE_FULL: usize = 3;
pub(crate) const R_SENDER_BYTES: usize = 4;
pub(crate) const R_TOTAL_BYTES: usize = 5;
/// Cluster mode: the destination is on another node and Redis is away (EXPIRE sent).
pub(crate) const R_CLUSTER: usize = 6;
/// Cluster mode: the queue to Redis was full (a message: EXPIRE; a claim: ERROR and close).
const R_CLUSTER_BUSY: usize = 7;

/// Counters for the metrics face.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerJsStats {
    pub bad_messages: u64,
    /// Messages delivered to a client's connection; one that crosses the cluster bus is
    /// counted once, by the node that delivers it.
    pub forwarded: u64,
    /// Messages for absent peers refused (any `queue_*` reason): the sender got EXPIRE.
    pub queued_dropped: u64,
    pub expired: u64,
    /// Messages accepted past the rate limit, by type ([`MESSAGE_TYPES`]).
    pub messages: [u64; MESSAGE_TYPES.len()],
    /// Messages refused, by reason ([`REFUSAL_REASONS`]).
    pub refused: [u64; REFUSAL_REASONS.len()],
    /// Bytes now queued for absent peers (a gauge; see [`Queued::cost`]).
    pub queued_bytes: u64,
}

/// The PeerJS realm: clients by id, connections, queues for absent peers.
pub struct PeerJsService {
    cfg: SignalConfig,
    rng: StdRng,
    clients: HashMap<String, Client>,
    conns: HashMap<WsId, String>,
    queues: HashMap<String, Queue>,
    /// Bytes each sender has queued (entries removed at zero), and their sum.
    queued_by_sender: HashMap<String, usize>,
    queued_total: usize,
    stats: PeerJsStats,
    /// Cluster mode: ids held by other nodes (one pseudo-room, [`BUS_ROOM`]) and this
    /// node's bus sequence (None: one node, nothing of this runs).
    bus: Option<RemoteMembers>,
    /// Changes whenever the set of claimed ids does (the driver rewrites the list then).
    members_version: u64,
}

fn id_taken_text() -> String {
    serde_json::json!({"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}).to_string()
}

fn error_text(msg: &str) -> String {
    serde_json::json!({"type": "ERROR", "payload": {"msg": msg}}).to_string()
}

impl PeerJsService {
    /// Takes reloaded limits and key (SIGHUP); connected clients stay.
    pub fn set_config(&mut self, cfg: SignalConfig) {
        self.cfg = cfg;
    }

    /// `rng` makes the ids `GET {path}{key}/id` hands out.
    pub fn new(cfg: SignalConfig, rng: StdRng) -> Self {
        Self {
            cfg,
            rng,
            clients: HashMap::new(),
            conns: HashMap::new(),
            queues: HashMap::new(),
            queued_by_sender: HashMap::new(),
            queued_total: 0,
            stats: PeerJsStats::default(),
            bus: None,
            members_version: 0,
        }
    }

    pub fn stats(&self) -> PeerJsStats {
        PeerJsStats {
            queued_bytes: self.queued_total as u64,
            ..self.stats
        }
    }

    /// Registered clients (connected ids).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Connected ids (for `GET {path}{key}/peers` when discovery is on).
    pub fn ids(&self) -> Vec<String> {
        self.clients.keys().cloned().collect()
    }

    /// `GET {path}{key}/id`: a random UUID no client holds.
    pub fn fresh_id(&mut self) -> String {
        loop {
            let mut b = [0u8; 16];
            self.rng.fill(&mut b);
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let id = format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            );
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    fn reject(conn: WsId, text: String, out: &mut Vec<Out>) {
        out.push(Out::Send {
            conn,
            text: text.into(),
        });
        out.push(Out::Close {
            conn,
            code: 1000,
            reason: "",
        });
    }

    /// A WebSocket connection with the query parameters `key`, `id`, `token`.
    pub fn connect(
        &mut self,
        conn: WsId,
        key: Option<&str>,
        id: Option<&str>,
        token: Option<&str>,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let (Some(key), Some(id), Some(token)) = (key, id, token) else {
            Self::reject(conn, error_text(INVALID_WS_PARAMETERS), &mut out);
            return out;
        };
        if id.is_empty() || token.is_empty() || key.is_empty() {
            Self::reject(conn, error_text(INVALID_WS_PARAMETERS), &mut out);
            return out;
        }
        if key != self.cfg.peerjs_key {
            Self::reject(conn, error_text(INVALID_KEY), &mut out);
            return out;
        }
        if id.len() > MAX_ID_LEN || token.len() > MAX_ID_LEN {
            Self::reject(conn, error_text(INVALID_WS_PARAMETERS), &mut out);
            return out;
        }
        if let Some(c) = self.clients.get_mut(id) {
            if c.token != token {
                Self::reject(conn, id_taken_text(), &mut out);
                return out;
            }
            // Same token: the client reconnected; attach the new socket without OPEN.
            let old = std::mem::replace(&mut c.conn, conn);
            c.last_ping = now;
            self.conns.remove(&old);
            self.conns.insert(conn, id.to_string());
            out.push(Out::Close {
                conn: old,
                code: 1000,
                reason: "",
            });
            self.flush_queue(id, &mut out);
            return out;
        }
        if self.bus.as_ref().is_some_and(|b| b.is_remote(id)) {
            Self::reject(conn, id_taken_text(), &mut out);
            return out;
        }
        if self.clients.len() >= self.cfg.peerjs_concurrent_limit {
            Self::reject(conn, error_text(CONNECTION_LIMIT_EXCEED), &mut out);
            return out;
        }
        // Cluster mode with Redis up: the id is only ours once the claim succeeds. With
        // Redis away the node serves its own peers (the id is claimed on reconnect).
        let claimed = self.bus.as_ref().is_none_or(|b| !b.up);
        let bucket = TokenBucket::new(
            f64::from(self.cfg.peerjs_rate_per_sec),
            f64::from(self.cfg.peerjs_burst),
            now,
        );
        self.clients.insert(
            id.to_string(),
            Client {
                token: token.to_string(),
                conn,
                last_ping: now,
                bucket,
                claimed,
            },
        );
        self.conns.insert(conn, id.to_string());
        if claimed {
            self.opened(id, &mut out);
        } else {
            out.push(Out::Bus(BusCmd::Claim { id: id.to_string() }));
        }
        out
    }

    /// `id` is this node's: OPEN, tell the other nodes, deliver what waited for it.
    fn opened(&mut self, id: &str, out: &mut Vec<Out>) {
        out.push(Out::Send {
            conn: self.clients[id].conn,
            text: Text::from_static(r#"{"type":"OPEN"}"#),
        });
        if let Some(b) = self.bus.as_mut() {
            self.members_version += 1;
            if b.up {
                out.push(Out::Bus(b.publish(
                    Chan::Room(BUS_ROOM.into()),
                    BusEvent::PeerjsOpen { id: id.to_string() },
                )));
            }
        }
        self.flush_queue(id, out);
    }

    fn flush_queue(&mut self, id: &str, out: &mut Vec<Out>) {
        if !self.clients.get(id).is_some_and(|c| c.claimed) {
            return;
        }
        let Some(q) = self.queues.remove(id) else {
            return;
        };
        let conn = self.clients[id].conn;
        for m in q.msgs {
            self.unqueue(&m);
            self.stats.forwarded += 1;
            out.push(Out::Send {
                conn,
                text: m.text.into(),
            });
        }
        self.shrink();
    }

    /// Takes a message's bytes off its sender's and the total budget.
    fn unqueue(&mut self, m: &Queued) {
        let cost = m.cost();
        self.queued_total -= cost;
        if let Some(b) = self.queued_by_sender.get_mut(&m.src) {
            *b -= cost;
            if *b == 0 {
                self.queued_by_sender.remove(&m.src);
            }
        }
    }

    /// Gives memory back once queues and clients have drained.
    fn shrink(&mut self) {
        shrink_map(&mut self.queues);
        shrink_map(&mut self.queued_by_sender);
        shrink_map(&mut self.clients);
        shrink_map(&mut self.conns);
    }

    /// Closes a client for breaking a limit: a PeerJS client cannot take an ERROR without
    /// aborting, and a message dropped silently would leave it waiting.
    fn cut_off(&mut self, id: &str, conn: WsId, code: u16, reason: &'static str) -> Vec<Out> {
        let mut out = Vec::new();
        self.drop_client(id, &mut out);
        out.push(Out::Close { conn, code, reason });
        out
    }

    /// A text frame from `conn`. Bad JSON and unknown types are ignored, as the `peer`
    /// server does: answering ERROR would make the client abort its Peer.
    pub fn message(&mut self, conn: WsId, text: &str, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(id) = self.conns.get(&conn) else {
            return out;
        };
        let c = self.clients.get_mut(id).expect("conns and clients agree");
        if !c.bucket.try_take(1.0, now) {
            self.stats.refused[R_RATE] += 1;
            let id = id.clone();
            return self.cut_off(
                &id,
                conn,
                1008,
                "rate limit: over signal.peerjs_rate_per_sec / peerjs_burst",
            );
        }
        if text.len() > self.cfg.peerjs_max_message_bytes {
            // The `peer` server closes such a sender with 1009 (past its WebSocket limit).
            self.stats.bad_messages += 1;
            self.stats.messages[INVALID] += 1;
            self.stats.refused[R_TOO_LARGE] += 1;
            let id = id.clone();
            return self.cut_off(
                &id,
                conn,
                1009,
                "message too large: over signal.peerjs_max_message_bytes",
            );
        }
        let Ok(msg) = serde_json::from_str::<Incoming<'_>>(text) else {
            // Not a JSON object, or `type`/`dst` not strings.
            self.stats.bad_messages += 1;
            self.stats.messages[INVALID] += 1;
            self.stats.refused[R_INVALID] += 1;
            tracing::debug!(
                %conn,
                "PeerJS message is not a JSON object of the protocol; ignored"
            );
            return out;
        };
        let (kind, label) = match msg.kind.as_deref() {
            Some("HEARTBEAT") => {
                c.last_ping = now;
                self.stats.messages[0] += 1;
                return out;
            }
            Some("OFFER") => ("OFFER", 1),
            Some("ANSWER") => ("ANSWER", 2),
            Some("CANDIDATE") => ("CANDIDATE", 3),
            Some("LEAVE") => ("LEAVE", 4),
            Some("EXPIRE") => ("EXPIRE", 5),
            _ => {
                self.stats.bad_messages += 1;
                self.stats.messages[INVALID] += 1;
                self.stats.refused[R_INVALID] += 1;
                return out;
            }
        };
        self.stats.messages[label] += 1;
        let Some(dst) = msg.dst.as_deref() else {
            if kind == "LEAVE" {
                // The `peer` server unregisters a client that leaves without a destination.
                let id = id.clone();
                self.drop_client(&id, &mut out);
                out.push(Out::Close {
                    conn,
                    code: 1000,
                    reason: "",
                });
            }
            return out;
        };
        let text = Fwd {
            kind,
            src: id,
            dst: Some(dst),
            payload: msg.payload,
        }
        .text();
        if let Some(text) = self.deliver_local(dst, text, &mut out) {
            let src = self.conns[&conn].clone();
            self.transmit_elsewhere(kind, src, dst.to_owned(), text, now, &mut out);
        }
        out
    }

    /// Delivers `text` to `dst` when it is a client of this node (the common case: no
    /// allocation beyond the text); otherwise hands the text back.
    fn deliver_local(&mut self, dst: &str, text: String, out: &mut Vec<Out>) -> Option<String> {
        match self.clients.get(dst) {
            Some(c) if c.claimed => {
                self.stats.forwarded += 1;
                out.push(Out::Send {
                    conn: c.conn,
                    text: text.into(),
                });
                None
            }
            _ => Some(text),
        }
    }

    /// Delivers a server-made message (EXPIRE) from `src` to `dst`.
    fn transmit(
        &mut self,
        kind: &'static str,
        src: String,
        dst: String,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let text = Fwd {
            kind,
            src: &src,
            dst: Some(&dst),
            payload: None,
        }
        .text();
        if let Some(text) = self.deliver_local(&dst, text, out) {
            self.transmit_elsewhere(kind, src, dst, text, now, out);
        }
    }

    /// A message for a destination that is not a claimed client here: published for its
    /// node (cluster mode), or queued until it connects. A message that cannot go either
    /// way gets EXPIRE at once: never an ERROR (the client would abort), never a silent
    /// drop.
    fn transmit_elsewhere(
        &mut self,
        kind: &'static str,
        src: String,
        dst: String,
        text: String,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        // Held here but not yet claimed: queued below until OPEN.
        if !self.clients.contains_key(&dst) {
            if let Some(b) = self.bus.as_mut().filter(|b| b.is_remote(&dst)) {
                if b.up {
                    // Counted by the node that delivers it.
                    let node = b.node_of(&dst).unwrap_or_default().to_string();
                    out.push(Out::Bus(b.publish(
                        Chan::Node(node),
                        BusEvent::Peerjs {
                            to: dst,
                            from: src,
                            text,
                        },
                    )));
                } else if kind != "LEAVE" && kind != "EXPIRE" {
                    // Redis away: the peer's node cannot be reached. EXPIRE, not ERROR
                    // (the client would abort its whole Peer).
                    self.stats.refused[R_CLUSTER] += 1;
                    self.send_expire(dst, src, now, out);
                }
                return;
            }
        }
        if kind == "LEAVE" || kind == "EXPIRE" {
            return;
        }
        self.enqueue(dst, Queued { src, text }, now, out);
    }

    /// Holds `q` for the absent `dst`, or answers EXPIRE at once when it does not fit.
    fn enqueue(&mut self, dst: String, q: Queued, now: Instant, out: &mut Vec<Out>) {
        let cost = q.cost();
        let sender_bytes = self.queued_by_sender.get(&q.src).copied().unwrap_or(0);
        let refusal = match self.queues.get(&dst) {
            Some(q) if q.msgs.len() >= self.cfg.peerjs_queue_bound => Some(R_QUEUE_FULL),
            None if self.queues.len() >= self.cfg.peerjs_concurrent_limit => Some(R_QUEUE_FULL),
            _ if sender_bytes + cost > self.cfg.peerjs_queue_bytes_per_sender => {
                Some(R_SENDER_BYTES)
            }
            _ if self.queued_total + cost > self.cfg.peerjs_queue_bytes_total => {
                Some(R_TOTAL_BYTES)
            }
            _ => None,
        };
        if let Some(reason) = refusal {
            self.stats.refused[reason] += 1;
            self.stats.queued_dropped += 1;
            self.send_expire(dst, q.src, now, out);
            return;
        }
        *self.queued_by_sender.entry(q.src.clone()).or_insert(0) += cost;
        self.queued_total += cost;
        self.queues
            .entry(dst)
            .or_insert_with(|| Queue {
                created: now,
                msgs: VecDeque::new(),
            })
            .msgs
            .push_back(q);
    }

    /// Queued messages from `to` for `from` expired.
    fn expire(&mut self, from: String, to: String, now: Instant, out: &mut Vec<Out>) {
        self.stats.expired += 1;
        self.send_expire(from, to, now, out);
    }

    /// Tells `to` that its messages for `from` will not arrive.
    fn send_expire(&mut self, from: String, to: String, now: Instant, out: &mut Vec<Out>) {
        self.transmit("EXPIRE", from, to, now, out);
    }

    fn drop_client(&mut self, id: &str, out: &mut Vec<Out>) {
        if let Some(c) = self.clients.remove(id) {
            self.conns.remove(&c.conn);
            self.released(id, c.claimed, out);
        }
    }

    /// Cluster mode: `id` left this node; the other nodes forget it, Redis frees it.
    fn released(&mut self, id: &str, claimed: bool, out: &mut Vec<Out>) {
        let Some(b) = self.bus.as_mut() else { return };
        if claimed {
            self.members_version += 1;
            if b.up {
                out.push(Out::Bus(b.publish(
                    Chan::Room(BUS_ROOM.into()),
                    BusEvent::PeerjsClose { id: id.to_string() },
                )));
            }
        }
        // A pending claim may still succeed in Redis: release it either way.
        out.push(Out::Bus(BusCmd::Release { id: id.to_string() }));
    }

    /// The connection closed.
    pub fn disconnect(&mut self, conn: WsId, _now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        if let Some(id) = self.conns.remove(&conn) {
            if self.clients.get(&id).is_some_and(|c| c.conn == conn) {
                let c = self.clients.remove(&id).expect("checked");
                self.released(&id, c.claimed, &mut out);
            }
        }
        self.shrink();
        out
    }

    /// Drops clients without a heartbeat for `alive_timeout`; answers queued messages
    /// older than `expire_timeout` with one EXPIRE per (sender, destination) pair.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let alive = Duration::from_secs(self.cfg.peerjs_alive_timeout_secs.into());
        let dead: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.last_ping) >= alive)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            if let Some(c) = self.clients.remove(&id) {
                self.conns.remove(&c.conn);
                self.released(&id, c.claimed, &mut out);
                out.push(Out::Close {
                    conn: c.conn,
                    code: 1000,
                    reason: "",
                });
            }
        }
        let expire = Duration::from_secs(self.cfg.peerjs_expire_timeout_secs.into());
        let due: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| now.saturating_duration_since(q.created) >= expire)
            .map(|(id, _)| id.clone())
            .collect();
        for dst in due {
            let q = self.queues.remove(&dst).expect("listed above");
            let mut seen = HashSet::new();
            for m in q.msgs {
                self.unqueue(&m);
                if seen.insert(m.src.clone()) {
                    self.expire(dst.clone(), m.src, now, &mut out);
                }
            }
        }
        self.shrink();
        out
    }
}

/// Cluster mode (`[cluster]`, docs/cluster.md): the bus inputs and outputs of the PeerJS
/// realm, like [`super::rooms::RoomService`]'s. Ids are claimed in Redis before OPEN
/// ([`BusCmd::Claim`]), so one id is held by one node; messages for an id another node holds
/// are published for it. Without [`PeerJsService::enable_bus`] none of this is consulted.
impl PeerJsService {
    /// Turns cluster mode on. `now_unix_us`: the driver's wall clock, where this node's
    /// sequence epochs start.
    pub fn enable_bus(&mut self, now_unix_us: u64) {
        let mut b = RemoteMembers::new(now_unix_us);
        // Every node with the PeerJS server listens to the realm's channel.
        b.subscribe(BUS_ROOM);
        self.bus = Some(b);
    }

    /// Redis reachable or not: while not, new ids open without a claim and messages for
    /// ids on other nodes get EXPIRE. Claims still pending when Redis goes (their answer
    /// will not come) are opened here, as during the outage.
    pub fn bus_state(&mut self, up: bool) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(b) = self.bus.as_mut() else {
            return out;
        };
        b.up = up;
        if !up {
            let pending: Vec<String> = self
                .clients
                .iter()
                .filter(|(_, c)| !c.claimed)
                .map(|(id, _)| id.clone())
                .collect();
            for id in pending {
                self.clients.get_mut(&id).expect("listed").claimed = true;
                self.opened(&id, &mut out);
            }
        }
        out
    }

    /// The ids this node holds (the list other nodes resync from, and the claims the
    /// driver renews each tick), and a version that changes whenever it does.
    pub fn bus_members(&self) -> (u64, Vec<Member>) {
        let list = self
            .clients
            .iter()
            .filter(|(_, c)| c.claimed)
            .map(|(id, _)| Member {
                id: id.clone(),
                name: String::new(),
                rooms: vec![BUS_ROOM.to_string()],
            })
            .collect();
        (self.members_version, list)
    }

    /// `id`'s entry in [`PeerJsService::bus_members`] now.
    pub fn bus_member(&self, id: &str) -> Option<Member> {
        self.clients.get(id).filter(|c| c.claimed).map(|_| Member {
            id: id.to_string(),
            name: String::new(),
            rooms: vec![BUS_ROOM.to_string()],
        })
    }

    /// The outcome of a [`BusCmd::Claim`]: OPEN, or ID-TAKEN when another node holds it.
    pub fn claim_result(&mut self, id: &str, ok: bool) -> Vec<Out> {
        let mut out = Vec::new();
        match self.clients.get(id) {
            None if ok => out.push(Out::Bus(BusCmd::Release { id: id.to_string() })),
            None => {}
            Some(c) if c.claimed => {}
            Some(_) if ok => {
                self.clients.get_mut(id).expect("present").claimed = true;
                self.opened(id, &mut out);
            }
            Some(c) => {
                let conn = c.conn;
                self.clients.remove(id);
                self.conns.remove(&conn);
                Self::reject(conn, id_taken_text(), &mut out);
            }
        }
        out
    }

    /// A bus command the driver could not queue (its queue to Redis is full). Never silent
    /// for the client concerned: a message for another node's id gets EXPIRE, as when
    /// Redis is away (its client aborts the whole Peer on ERROR); a claim not yet answered
    /// gets ERROR and a close, as the `peer` server refuses an open, since the Peer cannot
    /// open anyway. A lost open or close announcement needs nothing here (the receivers
    /// see the gap and resync), nor does a lost release (the claim lapses within a lease).
    pub fn bus_refused(&mut self, cmd: BusCmd, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        match cmd {
            BusCmd::Publish {
                ev: BusEvent::Peerjs { to, from, text },
                ..
            } => {
                let kind = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
                if !matches!(kind.as_deref(), Some("LEAVE" | "EXPIRE")) {
                    self.stats.refused[R_CLUSTER_BUSY] += 1;
                    self.send_expire(to, from, now, &mut out);
                }
            }
            BusCmd::Claim { id } => {
                if let Some(c) = self.clients.get(&id).filter(|c| !c.claimed) {
                    let conn = c.conn;
                    self.stats.refused[R_CLUSTER_BUSY] += 1;
                    self.clients.remove(&id);
                    self.conns.remove(&conn);
                    Self::reject(
                        conn,
                        error_text(
                            "the cluster is busy and the id could not be claimed; try again",
                        ),
                        &mut out,
                    );
                }
            }
            _ => {}
        }
        out
    }

    /// Messages queued here for `id`, which another node now holds, go to it.
    fn forward_queue(&mut self, id: &str, out: &mut Vec<Out>) {
        if !self.bus.as_ref().is_some_and(|b| b.up) || !self.queues.contains_key(id) {
            return;
        }
        let q = self.queues.remove(id).expect("checked");
        for m in q.msgs {
            self.unqueue(&m);
            let b = self.bus.as_mut().expect("checked");
            let node = b.node_of(id).unwrap_or_default().to_string();
            out.push(Out::Bus(b.publish(
                Chan::Node(node),
                BusEvent::Peerjs {
                    to: id.to_string(),
                    from: m.src,
                    text: m.text,
                },
            )));
        }
    }

    /// An event published by `node` with number `seq` of its sequence `ep` for the
    /// channel it came on.
    pub fn bus_event(
        &mut self,
        node: &str,
        ep: u64,
        seq: u64,
        ev: BusEvent,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(b) = self.bus.as_mut() else {
            return out;
        };
        if !b.accept(node, ep, seq, &ev, &mut out) {
            return out;
        }
        match ev {
            BusEvent::PeerjsOpen { id } => {
                b.join(node, BUS_ROOM, &id, "");
                self.forward_queue(&id, &mut out);
            }
            BusEvent::PeerjsClose { id } => {
                b.leave(BUS_ROOM, &id);
            }
            BusEvent::Peerjs { to, from, text } => match self.clients.get(&to) {
                Some(c) if c.claimed => {
                    self.stats.forwarded += 1;
                    out.push(Out::Send {
                        conn: c.conn,
                        text: text.into(),
                    });
                }
                // Not (or no longer, or not yet) here: held, then EXPIRE back to the sender
                // through the bus as for any absent peer.
                _ => self.enqueue(to, Queued { src: from, text }, now, &mut out),
            },
            // Room events travel on their own channel, never this one.
            BusEvent::Joined { .. }
            | BusEvent::Left { .. }
            | BusEvent::Signal { .. }
            | BusEvent::RelayTicket { .. }
            | BusEvent::Undeliverable { .. } => {}
        }
        out
    }

    /// `node`'s published id list (after a gap, a reconnect or a new node), or an empty
    /// one when the node is gone: its ids are free here (messages for them then expire).
    pub fn bus_snapshot(&mut self, node: &str, members: &[Member]) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(b) = self.bus.as_mut() else {
            return out;
        };
        let (joined, _left) = b.replace_node(node, None, members);
        for (_, id, _) in joined {
            self.forward_queue(&id, &mut out);
        }
        out
    }
}

#[cfg(test)]
#[path = "peerjs_tests.rs"]
mod tests;
