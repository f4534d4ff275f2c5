//! Cluster bus for the native room service and the PeerJS realm (`[cluster]`,
//! docs/cluster.md): the events one node publishes about its own peers (joins, leaves,
//! signals to a peer elsewhere; PeerJS ids and messages), the commands the machines emit
//! for them ([`BusCmd`] in [`super::Out::Bus`]) and its
//! view of the peers on other nodes ([`RemoteMembers`]).
//!
//! Channels: room-scoped events (joins, leaves; the PeerJS realm's id openings and
//! closings, one pseudo-room) go to that room's channel ([`Chan::Room`]), which only the
//! nodes with a local member in the room subscribe to (the machine emits
//! [`BusCmd::Subscribe`] when the room's first local member joins and
//! [`BusCmd::Unsubscribe`] when its last one leaves); traffic for one peer elsewhere
//! (signals, relay tickets, PeerJS messages) goes to the channel of the node holding it
//! ([`Chan::Node`]); a signal or ticket that node cannot hand to its peer goes back to
//! the sender's node as [`BusEvent::Undeliverable`], never dropped there. The driver maps
//! them to sharded pub/sub where Redis has it.
//!
//! Sans-IO like the rooms: the Redis side lives in `crate::cluster`. Each node numbers the
//! events it publishes, one sequence per destination channel (assigned here, so an event
//! the driver could not publish is a gap too), tagged with the sequence's epoch (a
//! channel's sequence restarts under a new epoch when a room empties here and is used
//! again, or the node restarts). A receiver keeps the last number per (sender, room) and
//! per sender for what reached it directly; on a gap in a room it asks for a resync of
//! that room from the sender's published member list. Each node stays authoritative for
//! its peers: a remote node's peers are only ever what it said.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::Out;

/// One event on the rooms channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum BusEvent {
    /// Peer `id` (named `name`) on the publishing node entered `room` (a bus room name:
    /// `room:NAME` or `lan:KEY`).
    Joined {
        room: String,
        id: String,
        name: String,
    },
    Left {
        room: String,
        id: String,
    },
    /// A `signal` from `from` (on the publishing node) to `to` (on another node).
    Signal {
        to: String,
        from: String,
        data: serde_json::Value,
    },
    /// A `/relay` session hosted by the publishing node between `from` (its peer) and `to`
    /// (a peer on another node): `to`'s side of it, to be reached at `url`. Only the ticket
    /// crosses Redis; the relayed bytes go straight to the hosting node.
    RelayTicket {
        to: String,
        from: String,
        ticket: String,
        url: String,
        expires_in: u32,
    },
    /// The answer to a [`BusEvent::Signal`] or [`BusEvent::RelayTicket`] the publishing node
    /// could not deliver: its addressee `peer` is not connected there (it left, or was never
    /// there) or shares no room with the sender. Published at once to the sender's node
    /// for `to` (the sender), which refuses the original message there with the error one
    /// node gives ([`Undelivered`]) instead of it vanishing. `ticket`: the relay ticket that
    /// will never be used (the hosting node ends its session), None for a signal.
    Undeliverable {
        to: String,
        peer: String,
        why: Undelivered,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
    },
    /// PeerJS: the publishing node holds id `id` now (its claim in Redis succeeded).
    PeerjsOpen {
        id: String,
    },
    /// PeerJS: the publishing node no longer holds `id`.
    PeerjsClose {
        id: String,
    },
    /// PeerJS: a message from `from` (on the publishing node) for `to` (held by another
    /// node), already serialized as the `peer` server forwards it: sent as is.
    Peerjs {
        to: String,
        from: String,
        text: String,
    },
}

/// Why a node could not deliver a signal or relay ticket sent to one of its peers: the
/// two checks `signal` and `relay` make on one node, with the same error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Undelivered {
    /// No connected peer with that id there (`peer-not-found`).
    NoPeer,
    /// Connected, but in no room with the sender (`not-in-shared-room`).
    NotInSharedRoom,
}

impl BusEvent {
    /// The room whose channel carries this event (None: it goes to one node's channel).
    pub fn room(&self) -> Option<&str> {
        match self {
            BusEvent::Joined { room, .. } | BusEvent::Left { room, .. } => Some(room),
            BusEvent::PeerjsOpen { .. } | BusEvent::PeerjsClose { .. } => Some(PEERJS_REALM),
            BusEvent::Signal { .. }
            | BusEvent::RelayTicket { .. }
            | BusEvent::Undeliverable { .. }
            | BusEvent::Peerjs { .. } => None,
        }
    }

    /// The peer whose membership this event changes (the published list's entry to write
    /// with it), if any.
    pub fn member(&self) -> Option<&str> {
        match self {
            BusEvent::Joined { id, .. }
            | BusEvent::Left { id, .. }
            | BusEvent::PeerjsOpen { id }
            | BusEvent::PeerjsClose { id } => Some(id),
            _ => None,
        }
    }
}

/// The PeerJS realm's pseudo-room: every node with the PeerJS server subscribes to it.
pub const PEERJS_REALM: &str = "peerjs";

/// Where a published event goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chan {
    /// A room's channel (`room:NAME`, `lan:KEY`, or [`PEERJS_REALM`]).
    Room(String),
    /// The channel of the node holding the addressed peer.
    Node(String),
}

/// What travels on a channel: the event, who published it and its place in the sender's
/// sequence for that channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub node: String,
    /// The sequence's epoch: numbers compare only within one.
    pub ep: u64,
    pub seq: u64,
    pub ev: BusEvent,
    /// When it was published (Unix time, microseconds; 0: unknown), for the receivers'
    /// delivery latency histogram. Across hosts it includes their clock offset.
    #[serde(default)]
    pub ts: u64,
}

/// What the room machine asks the cluster driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum BusCmd {
    /// Publish this event on `to` (numbered by the machine in `to`'s sequence).
    Publish {
        to: Chan,
        ep: u64,
        seq: u64,
        ev: BusEvent,
    },
    /// The first local member joined `room`: subscribe to its channel, then read every
    /// known node's members of it (`bus_snapshot` with the room).
    Subscribe { room: String },
    /// The last local member left `room`: unsubscribe from its channel.
    Unsubscribe { room: String },
    /// Read `node`'s published member list and hand it (or only `room` of it) to the
    /// machine's `bus_snapshot`.
    Resync { node: String, room: Option<String> },
    /// PeerJS: claim `id` cluster-wide (`SET NX` with a lease) and hand the outcome to
    /// `PeerJsService::claim_result`.
    Claim { id: String },
    /// PeerJS: this node no longer holds `id`; delete its claim if it is still ours.
    Release { id: String },
}

/// A peer of this node as published in its member list (`{prefix}members:{node}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub name: String,
    pub rooms: Vec<String>,
}

/// A sans-IO state machine on the cluster bus (the native rooms, the PeerJS realm): what
/// the Redis side (`crate::cluster`) needs of it. Each has its own channels, sequences and
/// published member list.
pub trait BusMachine: super::driver::Machine {
    /// Its channels' and member list's name (`{prefix}bus:{CHANNEL}:…`).
    const CHANNEL: &'static str;
    fn bus_state(&mut self, up: bool) -> Vec<super::Out>;
    fn bus_members(&self) -> (u64, Vec<Member>);
    /// `id`'s entry in the published list now (None: not listed).
    fn bus_member(&self, id: &str) -> Option<Member>;
    /// The rooms whose channels this node listens to.
    fn bus_rooms(&self) -> Vec<String>;
    /// An event published by `node`, received at `now` (the driver's clock).
    fn bus_event(
        &mut self,
        node: &str,
        ep: u64,
        seq: u64,
        ev: BusEvent,
        now: std::time::Instant,
    ) -> Vec<super::Out>;
    fn bus_snapshot(
        &mut self,
        node: &str,
        room: Option<&str>,
        members: &[Member],
    ) -> Vec<super::Out>;
    /// The outcome of a [`BusCmd::Claim`] (only the PeerJS realm claims).
    fn claim_result(&mut self, _id: &str, _ok: bool) -> Vec<super::Out> {
        Vec::new()
    }
}

impl BusMachine for super::rooms::RoomService {
    const CHANNEL: &'static str = "rooms";
    fn bus_state(&mut self, up: bool) -> Vec<super::Out> {
        Self::bus_state(self, up);
        Vec::new()
    }
    fn bus_members(&self) -> (u64, Vec<Member>) {
        Self::bus_members(self)
    }
    fn bus_member(&self, id: &str) -> Option<Member> {
        Self::bus_member(self, id)
    }
    fn bus_rooms(&self) -> Vec<String> {
        Self::bus_rooms(self)
    }
    fn bus_event(
        &mut self,
        node: &str,
        ep: u64,
        seq: u64,
        ev: BusEvent,
        _now: std::time::Instant,
    ) -> Vec<super::Out> {
        Self::bus_event(self, node, ep, seq, ev)
    }
    fn bus_snapshot(
        &mut self,
        node: &str,
        room: Option<&str>,
        members: &[Member],
    ) -> Vec<super::Out> {
        Self::bus_snapshot(self, node, room, members)
    }
}

impl BusMachine for super::peerjs::PeerJsService {
    const CHANNEL: &'static str = "peerjs";
    fn bus_state(&mut self, up: bool) -> Vec<super::Out> {
        Self::bus_state(self, up)
    }
    fn bus_members(&self) -> (u64, Vec<Member>) {
        Self::bus_members(self)
    }
    fn bus_member(&self, id: &str) -> Option<Member> {
        Self::bus_member(self, id)
    }
    fn bus_rooms(&self) -> Vec<String> {
        vec![PEERJS_REALM.to_string()]
    }
    fn bus_event(
        &mut self,
        node: &str,
        ep: u64,
        seq: u64,
        ev: BusEvent,
        now: std::time::Instant,
    ) -> Vec<super::Out> {
        Self::bus_event(self, node, ep, seq, ev, now)
    }
    fn bus_snapshot(
        &mut self,
        node: &str,
        _room: Option<&str>,
        members: &[Member],
    ) -> Vec<super::Out> {
        Self::bus_snapshot(self, node, members)
    }
    fn claim_result(&mut self, id: &str, ok: bool) -> Vec<super::Out> {
        Self::claim_result(self, id, ok)
    }
}

/// How an incoming sequence number relates to the last one from that sender on that
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next one (or the first heard on that channel from that node).
    Next,
    /// Already seen, or from an older epoch: ignore the event.
    Duplicate,
    /// Some were missed: apply this one and resynchronise.
    Gap,
}

#[derive(Debug, Clone)]
struct RemotePeer {
    node: String,
    name: String,
    rooms: BTreeSet<String>,
}

/// A receiver's sequence key: the sender and the room (None: its messages to this node).
type Stream = (String, Option<String>);

/// Peers on other nodes, by room, as their nodes published them; and this node's
/// sequences.
#[derive(Debug, Default)]
pub struct RemoteMembers {
    peers: HashMap<String, RemotePeer>,
    rooms: HashMap<String, BTreeSet<String>>,
    /// Rooms this node listens to: events and snapshots of other rooms are ignored.
    subscribed: BTreeSet<String>,
    /// Last (epoch, number) heard per stream.
    last_seq: HashMap<Stream, (u64, u64)>,
    /// This node's sequences: (epoch, next number) per destination channel.
    next_seq: HashMap<Chan, (u64, u64)>,
    /// The next epoch a sequence starts under (starts at the wall clock the driver gives,
    /// so a restarted node's numbers are not mistaken for old ones).
    next_epoch: u64,
    /// Redis reachable: cross-node sends are refused while it is not.
    pub up: bool,
}

impl RemoteMembers {
    /// `now_unix_us`: the driver's wall clock (Unix time, µs), the first epoch. Sans-IO:
    /// this core reads no clock of its own.
    pub fn new(now_unix_us: u64) -> RemoteMembers {
        RemoteMembers {
            next_epoch: now_unix_us.max(1),
            ..RemoteMembers::default()
        }
    }

    /// Numbers an outgoing event in `to`'s sequence.
    pub fn publish(&mut self, to: Chan, ev: BusEvent) -> BusCmd {
        let epoch = &mut self.next_epoch;
        let s = self.next_seq.entry(to.clone()).or_insert_with(|| {
            *epoch += 1;
            (*epoch - 1, 1)
        });
        let (ep, seq) = *s;
        s.1 += 1;
        BusCmd::Publish { to, ep, seq, ev }
    }

    /// Forgets `to`'s sequence (its room emptied here, its node is gone); the next event
    /// for it starts a new epoch.
    pub fn end_sequence(&mut self, to: &Chan) {
        self.next_seq.remove(to);
    }

    /// Listens to `room` from now on.
    pub fn subscribe(&mut self, room: &str) -> BusCmd {
        self.subscribed.insert(room.to_string());
        BusCmd::Subscribe {
            room: room.to_string(),
        }
    }

    /// Stops listening to `room`: its remote members and sequences are forgotten (a later
    /// subscription reads them afresh).
    pub fn unsubscribe(&mut self, room: &str) -> BusCmd {
        self.subscribed.remove(room);
        for id in self.rooms.get(room).cloned().unwrap_or_default() {
            self.leave(room, &id);
        }
        self.last_seq.retain(|(_, r), _| r.as_deref() != Some(room));
        BusCmd::Unsubscribe {
            room: room.to_string(),
        }
    }

    pub fn is_subscribed(&self, room: &str) -> bool {
        self.subscribed.contains(room)
    }

    pub fn subscribed(&self) -> Vec<String> {
        self.subscribed.iter().cloned().collect()
    }

    /// Where `(ep, seq)` from `node` on stream `room` stands.
    pub fn check_seq(&mut self, node: &str, room: Option<&str>, ep: u64, seq: u64) -> SeqCheck {
        let key = (node.to_string(), room.map(str::to_string));
        let check = match self.last_seq.get(&key).copied() {
            None => SeqCheck::Next,
            Some((e, _)) if ep < e => return SeqCheck::Duplicate,
            // A new sequence on a channel heard before: it starts at 1.
            Some((e, _)) if ep > e => {
                if seq == 1 {
                    SeqCheck::Next
                } else {
                    SeqCheck::Gap
                }
            }
            Some((_, last)) if seq <= last => return SeqCheck::Duplicate,
            Some((_, last)) if seq == last + 1 => SeqCheck::Next,
            Some(_) => SeqCheck::Gap,
        };
        self.last_seq.insert(key, (ep, seq));
        check
    }

    /// Checks an event's place in its sequence for both machines: false to drop it (a
    /// duplicate, or a room not listened to); on a gap it still applies, and a resync of
    /// that node (that room of it, for a room's channel) is queued in `out`.
    pub fn accept(
        &mut self,
        node: &str,
        ep: u64,
        seq: u64,
        ev: &BusEvent,
        out: &mut Vec<Out>,
    ) -> bool {
        let room = ev.room();
        if room.is_some_and(|r| !self.subscribed.contains(r)) {
            return false;
        }
        match self.check_seq(node, room, ep, seq) {
            SeqCheck::Duplicate => false,
            SeqCheck::Gap => {
                out.push(Out::Bus(BusCmd::Resync {
                    node: node.to_string(),
                    room: room.map(str::to_string),
                }));
                true
            }
            SeqCheck::Next => true,
        }
    }

    /// Records a join in a room listened to; true when it is news.
    pub fn join(&mut self, node: &str, room: &str, id: &str, name: &str) -> bool {
        if !self.subscribed.contains(room) {
            return false;
        }
        let p = self
            .peers
            .entry(id.to_string())
            .or_insert_with(|| RemotePeer {
                node: node.to_string(),
                name: name.to_string(),
                rooms: BTreeSet::new(),
            });
        p.node = node.to_string();
        p.name = name.to_string();
        let new = p.rooms.insert(room.to_string());
        self.rooms
            .entry(room.to_string())
            .or_default()
            .insert(id.to_string());
        new
    }

    /// Records a leave; true when the peer was there.
    pub fn leave(&mut self, room: &str, id: &str) -> bool {
        let Some(p) = self.peers.get_mut(id) else {
            return false;
        };
        let was = p.rooms.remove(room);
        if p.rooms.is_empty() {
            self.peers.remove(id);
        }
        if let Some(m) = self.rooms.get_mut(room) {
            m.remove(id);
            if m.is_empty() {
                self.rooms.remove(room);
            }
        }
        was
    }

    /// Remote members of `room`: (id, name).
    pub fn members(&self, room: &str) -> Vec<(String, String)> {
        self.rooms.get(room).map_or_else(Vec::new, |m| {
            m.iter()
                .filter_map(|id| self.peers.get(id).map(|p| (id.clone(), p.name.clone())))
                .collect()
        })
    }

    /// Remote peer `id`'s node, if it shares one of `rooms`.
    pub fn shared(&self, id: &str, rooms: &BTreeSet<String>) -> Option<&str> {
        let p = self.peers.get(id)?;
        (!p.rooms.is_disjoint(rooms)).then_some(p.node.as_str())
    }

    /// The node holding remote peer `id`.
    pub fn node_of(&self, id: &str) -> Option<&str> {
        self.peers.get(id).map(|p| p.node.as_str())
    }

    pub fn is_remote(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }

    /// Replaces what is known about `node` (in `room` only, or in every room) with
    /// `members` (its published list; empty when the node is gone). Rooms not listened to
    /// are skipped. Returns the (room, id, name) joins and (room, id) leaves it implies.
    #[allow(clippy::type_complexity)]
    pub fn replace_node(
        &mut self,
        node: &str,
        room: Option<&str>,
        members: &[Member],
    ) -> (Vec<(String, String, String)>, Vec<(String, String)>) {
        let in_scope = |r: &str| room.is_none_or(|x| x == r);
        let mut left = Vec::new();
        let old: Vec<(String, Vec<String>)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(id, p)| {
                let rooms = p.rooms.iter().filter(|r| in_scope(r)).cloned().collect();
                (id.clone(), rooms)
            })
            .collect();
        let keep: HashMap<&str, &Member> = members.iter().map(|m| (m.id.as_str(), m)).collect();
        for (id, rooms) in old {
            for r in rooms {
                let still = keep.get(id.as_str()).is_some_and(|m| m.rooms.contains(&r));
                if !still && self.leave(&r, &id) {
                    left.push((r, id.clone()));
                }
            }
        }
        let mut joined = Vec::new();
        for m in members {
            for r in m.rooms.iter().filter(|r| in_scope(r)) {
                if self.join(node, r, &m.id, &m.name) {
                    joined.push((r.clone(), m.id.clone(), m.name.clone()));
                }
            }
        }
        if members.is_empty() && room.is_none() {
            // The node is gone: its sequences (and ours to it) start afresh if it returns.
            self.last_seq.retain(|(n, _), _| n != node);
            self.next_seq.remove(&Chan::Node(node.to_string()));
        }
        (joined, left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_detect_gaps_duplicates_and_reordering_per_stream() {
        let mut r = RemoteMembers::new(1);
        let x = Some("room:x");
        assert_eq!(r.check_seq("a", x, 5, 7), SeqCheck::Next, "first heard");
        assert_eq!(r.check_seq("a", x, 5, 8), SeqCheck::Next);
        assert_eq!(r.check_seq("a", x, 5, 8), SeqCheck::Duplicate);
        assert_eq!(r.check_seq("a", x, 5, 10), SeqCheck::Gap, "9 missing");
        assert_eq!(
            r.check_seq("a", x, 5, 9),
            SeqCheck::Duplicate,
            "late 9: the resync covers it"
        );
        assert_eq!(r.check_seq("b", x, 5, 1), SeqCheck::Next, "per node");
        assert_eq!(
            r.check_seq("a", Some("room:y"), 6, 1),
            SeqCheck::Next,
            "per room: room:y's numbers are its own"
        );
        assert_eq!(r.check_seq("a", None, 2, 1), SeqCheck::Next, "direct");
        assert_eq!(r.check_seq("a", x, 5, 11), SeqCheck::Next);
        // room:x emptied on a and was used again: a new epoch starts at 1.
        assert_eq!(r.check_seq("a", x, 9, 1), SeqCheck::Next);
        assert_eq!(r.check_seq("a", x, 5, 12), SeqCheck::Duplicate, "old epoch");
        assert_eq!(
            r.check_seq("a", x, 11, 3),
            SeqCheck::Gap,
            "new epoch, 1 and 2 lost"
        );
    }

    #[test]
    fn each_destination_has_its_own_sequence_and_a_new_epoch_after_it_ends() {
        let mut r = RemoteMembers::new(1);
        let left = |id: &str| BusEvent::Left {
            room: "room:x".into(),
            id: id.into(),
        };
        let x = Chan::Room("room:x".into());
        let n = Chan::Node("b".into());
        let seq = |c: BusCmd| match c {
            BusCmd::Publish { ep, seq, .. } => (ep, seq),
            other => panic!("{other:?}"),
        };
        let (e1, s1) = seq(r.publish(x.clone(), left("p")));
        let (_, s2) = seq(r.publish(x.clone(), left("q")));
        let (en, sn) = seq(r.publish(n.clone(), left("q")));
        assert_eq!((s1, s2, sn), (1, 2, 1));
        assert_ne!(e1, en);
        r.end_sequence(&x);
        let (e3, s3) = seq(r.publish(x, left("p")));
        assert_eq!(s3, 1);
        assert!(e3 > e1 && e3 > en, "a new, later epoch");
    }

    #[test]
    fn replacing_a_node_yields_joins_and_leaves_in_rooms_listened_to() {
        let mut r = RemoteMembers::new(1);
        r.subscribe("room:x");
        r.subscribe("room:y");
        assert!(r.join("a", "room:x", "p1", "Otter"));
        assert!(
            !r.join("a", "room:x", "p1", "Otter"),
            "duplicate join is not news"
        );
        assert!(r.join("a", "room:y", "p2", "Heron"));
        assert!(!r.join("a", "room:q", "p3", "Crane"), "not listened to");
        let p1 = Member {
            id: "p1".into(),
            name: "Otter".into(),
            rooms: vec!["room:x".into(), "room:z".into()],
        };
        let (j, l) = r.replace_node("a", None, std::slice::from_ref(&p1));
        assert!(j.is_empty(), "room:z is not listened to: {j:?}");
        assert_eq!(l, [("room:y".into(), "p2".into())]);
        assert_eq!(r.members("room:x"), [("p1".into(), "Otter".into())]);
        // One room only: room:y's snapshot leaves room:x alone.
        let (j, l) = r.replace_node("a", Some("room:y"), &[]);
        assert!(j.is_empty() && l.is_empty());
        assert!(r.is_remote("p1"));
        let (_, l) = r.replace_node("a", None, &[]);
        assert_eq!(l.len(), 1);
        assert!(!r.is_remote("p1"));
    }

    #[test]
    fn unsubscribing_forgets_the_room_and_its_sequences() {
        let mut r = RemoteMembers::new(1);
        r.subscribe("room:x");
        r.join("a", "room:x", "p1", "Otter");
        assert_eq!(r.check_seq("a", Some("room:x"), 3, 4), SeqCheck::Next);
        assert_eq!(
            r.unsubscribe("room:x"),
            BusCmd::Unsubscribe {
                room: "room:x".into()
            }
        );
        assert!(!r.is_remote("p1"));
        let mut out = Vec::new();
        let ev = BusEvent::Left {
            room: "room:x".into(),
            id: "p1".into(),
        };
        assert!(!r.accept("a", 3, 5, &ev, &mut out), "not listened to");
        r.subscribe("room:x");
        assert!(r.accept("a", 3, 9, &ev, &mut out), "first heard again");
        assert!(out.is_empty(), "no gap against a forgotten number");
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod room_tests;
