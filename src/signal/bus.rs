//! Cluster bus for the native room service and the PeerJS realm (`[cluster]`,
//! docs/cluster.md): the events one node publishes about its own peers (joins, leaves,
//! signals to a peer elsewhere; PeerJS ids and messages), the commands the machines emit
//! for them ([`BusCmd`] in [`super::Out::Bus`]) and its
//! view of the peers on other nodes ([`RemoteMembers`]).
//!
//! Sans-IO like the rooms: the Redis side lives in `crate::cluster`. Each node numbers the
//! events it publishes (one sequence per node and channel, assigned here, so an event the
//! driver could not publish is a gap too); a receiver that sees a gap asks for a resync and
//! replaces that node's members with the node's own published list. Each node stays
//! authoritative for its peers: a remote node's peers are only ever what it said.

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

/// What travels on the channel: the event, who published it and its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub node: String,
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
    /// Publish this event (numbered by the machine).
    Publish { seq: u64, ev: BusEvent },
    /// Read `node`'s published member list and hand it to `RoomService::bus_snapshot`.
    Resync { node: String },
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
/// the Redis side (`crate::cluster`) needs of it. Each has its own channel, sequence and
/// published member list.
pub trait BusMachine: super::driver::Machine {
    /// Its channel and member-list name (`{prefix}bus:{CHANNEL}`).
    const CHANNEL: &'static str;
    fn bus_state(&mut self, up: bool) -> Vec<super::Out>;
    fn bus_members(&self) -> (u64, Vec<Member>);
    fn bus_event(&mut self, node: &str, seq: u64, ev: BusEvent) -> Vec<super::Out>;
    fn bus_snapshot(&mut self, node: &str, members: &[Member]) -> Vec<super::Out>;
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
    fn bus_event(&mut self, node: &str, seq: u64, ev: BusEvent) -> Vec<super::Out> {
        Self::bus_event(self, node, seq, ev)
    }
    fn bus_snapshot(&mut self, node: &str, members: &[Member]) -> Vec<super::Out> {
        Self::bus_snapshot(self, node, members)
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
    fn bus_event(&mut self, node: &str, seq: u64, ev: BusEvent) -> Vec<super::Out> {
        Self::bus_event(self, node, seq, ev, std::time::Instant::now())
    }
    fn bus_snapshot(&mut self, node: &str, members: &[Member]) -> Vec<super::Out> {
        Self::bus_snapshot(self, node, members)
    }
    fn claim_result(&mut self, id: &str, ok: bool) -> Vec<super::Out> {
        Self::claim_result(self, id, ok)
    }
}

/// How an incoming sequence number relates to the last one from that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next one (or the first heard from that node).
    Next,
    /// Already seen: ignore the event.
    Duplicate,
    /// Some were missed: apply this one and resynchronise that node.
    Gap,
}

#[derive(Debug, Clone)]
struct RemotePeer {
    node: String,
    name: String,
    rooms: BTreeSet<String>,
}

/// Peers on other nodes, by room, as their nodes published them.
#[derive(Debug, Default)]
pub struct RemoteMembers {
    peers: HashMap<String, RemotePeer>,
    rooms: HashMap<String, BTreeSet<String>>,
    last_seq: HashMap<String, u64>,
    /// The next sequence number this node publishes.
    next_seq: u64,
    /// Redis reachable: cross-node sends are refused while it is not.
    pub up: bool,
}

impl RemoteMembers {
    pub fn new() -> RemoteMembers {
        RemoteMembers {
            next_seq: 1,
            ..RemoteMembers::default()
        }
    }

    /// Numbers an outgoing event.
    pub fn publish(&mut self, ev: BusEvent) -> BusCmd {
        let seq = self.next_seq;
        self.next_seq += 1;
        BusCmd::Publish { seq, ev }
    }

    pub fn check_seq(&mut self, node: &str, seq: u64) -> SeqCheck {
        match self.last_seq.get(node).copied() {
            Some(last) if seq <= last => SeqCheck::Duplicate,
            Some(last) => {
                self.last_seq.insert(node.to_string(), seq);
                if seq == last + 1 {
                    SeqCheck::Next
                } else {
                    SeqCheck::Gap
                }
            }
            None => {
                self.last_seq.insert(node.to_string(), seq);
                SeqCheck::Next
            }
        }
    }

    /// Checks an event's sequence number for both machines: false for a duplicate (drop
    /// it); on a gap it still applies, and a resync of that node is queued in `out`.
    pub fn accept(&mut self, node: &str, seq: u64, out: &mut Vec<Out>) -> bool {
        match self.check_seq(node, seq) {
            SeqCheck::Duplicate => false,
            SeqCheck::Gap => {
                out.push(Out::Bus(BusCmd::Resync {
                    node: node.to_string(),
                }));
                true
            }
            SeqCheck::Next => true,
        }
    }

    /// Records a join; true when it is news.
    pub fn join(&mut self, node: &str, room: &str, id: &str, name: &str) -> bool {
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

    pub fn is_remote(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }

    /// Replaces everything known about `node` with `members` (its published list; empty when
    /// the node is gone). Returns the (room, id, name) joins and (room, id) leaves it implies.
    #[allow(clippy::type_complexity)]
    pub fn replace_node(
        &mut self,
        node: &str,
        members: &[Member],
    ) -> (Vec<(String, String, String)>, Vec<(String, String)>) {
        let mut left = Vec::new();
        let old: Vec<(String, Vec<String>)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(id, p)| (id.clone(), p.rooms.iter().cloned().collect()))
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
            for r in &m.rooms {
                if self.join(node, r, &m.id, &m.name) {
                    joined.push((r.clone(), m.id.clone(), m.name.clone()));
                }
            }
        }
        if members.is_empty() {
            self.last_seq.remove(node);
        }
        (joined, left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_detect_gaps_duplicates_and_reordering() {
        let mut r = RemoteMembers::new();
        assert_eq!(r.check_seq("a", 7), SeqCheck::Next, "first heard");
        assert_eq!(r.check_seq("a", 8), SeqCheck::Next);
        assert_eq!(r.check_seq("a", 8), SeqCheck::Duplicate);
        assert_eq!(r.check_seq("a", 10), SeqCheck::Gap, "9 missing");
        assert_eq!(
            r.check_seq("a", 9),
            SeqCheck::Duplicate,
            "late 9: the resync covers it"
        );
        assert_eq!(r.check_seq("b", 1), SeqCheck::Next, "per node");
        assert_eq!(r.check_seq("a", 11), SeqCheck::Next);
    }

    #[test]
    fn replacing_a_node_yields_joins_and_leaves() {
        let mut r = RemoteMembers::new();
        assert!(r.join("a", "room:x", "p1", "Otter"));
        assert!(
            !r.join("a", "room:x", "p1", "Otter"),
            "duplicate join is not news"
        );
        assert!(r.join("a", "room:y", "p2", "Heron"));
        let (j, l) = r.replace_node(
            "a",
            &[Member {
                id: "p1".into(),
                name: "Otter".into(),
                rooms: vec!["room:x".into(), "room:z".into()],
            }],
        );
        assert_eq!(j, [("room:z".into(), "p1".into(), "Otter".into())]);
        assert_eq!(l, [("room:y".into(), "p2".into())]);
        assert_eq!(r.members("room:x"), [("p1".into(), "Otter".into())]);
        let (_, l) = r.replace_node("a", &[]);
        assert_eq!(l.len(), 2);
        assert!(!r.is_remote("p1"));
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod room_tests;
