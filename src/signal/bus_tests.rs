//! The room machine with bus inputs and outputs (cluster mode): remote joins and leaves,
//! cross-node signals, duplicates, gaps, reordering and resyncs, Redis down.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::config::SignalConfig;
use crate::signal::bus::{BusCmd, BusEvent, Chan, Member, Undelivered};
use crate::signal::rooms::tests::to;
use crate::signal::rooms::RoomService;
use crate::signal::{ws_id, Out};

fn svc() -> RoomService {
    let mut s = RoomService::new(SignalConfig::default(), true, StdRng::seed_from_u64(9));
    s.enable_bus(1);
    s.bus_state(true);
    s
}

fn bus(outs: &[Out]) -> Vec<BusCmd> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Bus(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn joined(room: &str, id: &str) -> BusEvent {
    BusEvent::Joined {
        room: room.into(),
        id: id.into(),
        name: format!("name of {id}"),
    }
}

/// A local peer on conn 1 in named room r1; returns its id.
fn local_in_r1(s: &mut RoomService) -> String {
    let t = Instant::now();
    let o = s.connect(ws_id(1), "v4:203.0.113.1".into(), None, t);
    let id = to(&o, ws_id(1))[0]["id"].as_str().unwrap().to_string();
    let o = s.message(ws_id(1), r#"{"type":"join","room":"r1"}"#, t);
    // The room's first member here: its channel is listened to, then the join published
    // on it, first in that room's sequence.
    let cmds = bus(&o);
    assert!(
        matches!(&cmds[..], [BusCmd::Subscribe { room: sub }, BusCmd::Publish { to: Chan::Room(r), seq: 1, ev: BusEvent::Joined { room, .. }, .. }]
            if sub == "room:r1" && r == "room:r1" && room == "room:r1"),
        "{cmds:?}"
    );
    id
}

/// A second local peer (conn 3) in named room `other`, so that room is listened to.
/// Local peer 1 and remote peer `rb` (on `node`) share room r1; this node has a relay URL.
fn with_remote_rb(node: &str) -> RoomService {
    let mut s = svc();
    local_in_r1(&mut s);
    s.bus_event(node, 1, 1, joined("room:r1", "rb"));
    s.set_relay_url("ws://a.example/relay".into());
    s
}

fn local_in_other(s: &mut RoomService) {
    let t = Instant::now();
    s.connect(ws_id(3), "v4:192.0.2.9".into(), None, t);
    s.message(ws_id(3), r#"{"type":"join","room":"other"}"#, t);
}

#[test]
fn remote_joins_and_leaves_reach_local_members_once() {
    let mut s = svc();
    local_in_r1(&mut s);
    let o = s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    let m = to(&o, ws_id(1));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["type"], "peer-joined");
    assert_eq!(m[0]["peer"]["id"], "rb");
    // The same event again (a duplicate from the bus): nothing.
    assert!(s.bus_event("b", 1, 1, joined("room:r1", "rb")).is_empty());
    // A new local member sees the remote one in the member list.
    let t = Instant::now();
    s.connect(ws_id(2), "v4:198.51.100.7".into(), None, t);
    let o = s.message(ws_id(2), r#"{"type":"join","room":"r1"}"#, t);
    let room = to(&o, ws_id(2))
        .into_iter()
        .find(|m| m["type"] == "room")
        .unwrap();
    assert!(room["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == "rb"));
    let o = s.bus_event(
        "b",
        1,
        2,
        BusEvent::Left {
            room: "room:r1".into(),
            id: "rb".into(),
        },
    );
    assert_eq!(to(&o, ws_id(1))[0]["type"], "peer-left");
    assert_eq!(to(&o, ws_id(2))[0]["id"], "rb");
}

#[test]
fn signals_cross_nodes_only_between_peers_sharing_a_room() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    local_in_other(&mut s);
    s.bus_event("b", 1, 1, joined("room:other", "rc"));
    let t = Instant::now();
    let o = s.message(
        ws_id(1),
        r#"{"type":"signal","to":"rb","data":{"sdp":"x"}}"#,
        t,
    );
    let cmds = bus(&o);
    assert!(
        matches!(&cmds[..], [BusCmd::Publish { ev: BusEvent::Signal { to, from, data }, .. }]
            if to == "rb" && *from == me && *data == json!({"sdp": "x"})),
        "{cmds:?}"
    );
    let o = s.message(ws_id(1), r#"{"type":"signal","to":"rc","data":1}"#, t);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "not-in-shared-room");
    // Incoming: delivered with `from` as published; not to a peer outside the room.
    let o = s.bus_event(
        "b",
        1,
        3,
        BusEvent::Signal {
            to: me.clone(),
            from: "rb".into(),
            data: json!("hi"),
        },
    );
    assert_eq!(
        to(&o, ws_id(1))[0],
        json!({"type": "signal", "from": "rb", "data": "hi"})
    );
    let o = s.bus_event(
        "b",
        1,
        4,
        BusEvent::Signal {
            to: me,
            from: "rc".into(),
            data: json!("sneaky"),
        },
    );
    assert!(to(&o, ws_id(1)).is_empty());
    // ...but answered to its node, never dropped silently.
    let me = me_id(&s);
    assert!(
        matches!(&bus(&o)[..], [BusCmd::Publish { to: Chan::Node(n), seq: 2, ev, .. }]
            if n == "b" && *ev == undeliverable("rc", &me, Undelivered::NotInSharedRoom, None)),
        "{:?}",
        bus(&o)
    );
}

/// The id of the peer on conn 1.
fn me_id(s: &RoomService) -> String {
    s.bus_members()
        .1
        .into_iter()
        .find(|m| m.rooms.iter().any(|r| r == "room:r1"))
        .map(|m| m.id)
        .expect("a local member of r1")
}

fn undeliverable(to: &str, peer: &str, why: Undelivered, ticket: Option<&str>) -> BusEvent {
    BusEvent::Undeliverable {
        to: to.into(),
        peer: peer.into(),
        why,
        ticket: ticket.map(str::to_string),
    }
}

/// The receiving node: a signal or ticket for a peer that is not connected here (never
/// was, or left) goes back to the sender's node, on that node's channel, at once.
#[test]
fn a_signal_or_ticket_for_a_peer_not_here_is_answered_to_the_sender_s_node() {
    let mut s = with_remote_rb("node-b");
    let me = me_id(&s);
    let signal = |to: &str| BusEvent::Signal {
        to: to.into(),
        from: "rb".into(),
        data: json!(1),
    };
    let ticket = |to: &str| BusEvent::RelayTicket {
        to: to.into(),
        from: "rb".into(),
        ticket: "tb".into(),
        url: "ws://b.example/relay".into(),
        expires_in: 30,
    };
    let answer = |o: &[Out]| match &bus(o)[..] {
        [BusCmd::Publish {
            to: Chan::Node(n),
            ev,
            ..
        }] if n == "node-b" => ev.clone(),
        other => panic!("{other:?}"),
    };
    let o = s.bus_event("node-b", 1, 1, signal("never-here"));
    assert!(to(&o, ws_id(1)).is_empty());
    assert_eq!(
        answer(&o),
        undeliverable("rb", "never-here", Undelivered::NoPeer, None)
    );
    let o = s.bus_event("node-b", 1, 2, ticket("never-here"));
    assert_eq!(
        answer(&o),
        undeliverable("rb", "never-here", Undelivered::NoPeer, Some("tb"))
    );
    // Delivered while `me` is here; once it has gone, the same is answered.
    let o = s.bus_event("node-b", 1, 3, signal(&me));
    assert_eq!(to(&o, ws_id(1))[0]["type"], "signal");
    assert!(bus(&o).is_empty());
    s.disconnect(ws_id(1), Instant::now());
    let o = s.bus_event("node-b", 1, 4, signal(&me));
    assert_eq!(
        answer(&o),
        undeliverable("rb", &me, Undelivered::NoPeer, None)
    );
    let o = s.bus_event("node-b", 1, 5, ticket(&me));
    assert_eq!(
        answer(&o),
        undeliverable("rb", &me, Undelivered::NoPeer, Some("tb"))
    );
}

/// The sending node: the answer refuses the signal or relay to its sender with the error
/// one node gives, counted under `no_target`, and ends the relay's session at once.
#[test]
fn an_undeliverable_answer_refuses_the_signal_or_relay_to_its_sender() {
    let mut s = with_remote_rb("b");
    let me = me_id(&s);
    let no_target = crate::signal::rooms::REFUSAL_REASONS
        .iter()
        .position(|r| *r == "no_target")
        .unwrap();
    let t = Instant::now();
    s.message(ws_id(1), r#"{"type":"signal","to":"rb","data":1}"#, t);
    assert_eq!(
        s.stats().signals_forwarded,
        0,
        "counted by the node that delivers it"
    );
    let o = s.bus_event(
        "b",
        1,
        2,
        undeliverable(&me, "rb", Undelivered::NoPeer, None),
    );
    let e = &to(&o, ws_id(1))[0];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["to"].as_str()),
        (Some("error"), Some("peer-not-found"), Some("rb")),
        "{e}"
    );
    assert_eq!(s.stats().refused[no_target], 1);
    assert_eq!(
        s.stats().signals_forwarded,
        0,
        "and never taken back (a counter only grows)"
    );
    assert!(bus(&o).is_empty(), "an answer is never answered");

    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    let Some(Out::Relay(g)) = o.into_iter().find(|o| matches!(o, Out::Relay(_))) else {
        panic!("a grant")
    };
    let tb = g.sides[1].2.clone();
    let ev = undeliverable(&me, "rb", Undelivered::NotInSharedRoom, Some(&tb));
    let o = s.bus_event("b", 1, 3, ev);
    assert!(
        o.iter()
            .any(|x| matches!(x, Out::CancelRelay { ticket, .. } if *ticket == tb)),
        "the session ends, closing a waiting requester: {o:?}"
    );
    assert_eq!(to(&o, ws_id(1))[0]["code"], "not-in-shared-room");
    assert_eq!(s.stats().refused[no_target], 2);

    // The sender left meanwhile: nobody to tell, still counted.
    s.disconnect(ws_id(1), t);
    let o = s.bus_event(
        "b",
        1,
        4,
        undeliverable(&me, "rb", Undelivered::NoPeer, None),
    );
    assert!(to(&o, ws_id(1)).is_empty());
    assert_eq!(s.stats().refused[no_target], 3);
}

#[test]
fn a_relay_to_a_peer_on_another_node_is_hosted_here_and_its_ticket_goes_on_the_bus() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    local_in_other(&mut s);
    s.bus_event("b", 1, 1, joined("room:other", "rc"));
    let t = Instant::now();
    // No advertised URL: the other node's peer could not reach this relay.
    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "relay-unavailable");
    s.set_relay_url("wss://a.example/relay".into());
    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rc"}"#, t);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "not-in-shared-room");
    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    let grant = o
        .iter()
        .find_map(|o| match o {
            Out::Relay(g) => Some(g.clone()),
            _ => None,
        })
        .expect("a grant");
    assert_eq!(grant.sides[0].0, ws_id(1));
    assert_eq!(grant.sides[0].1, "rb");
    let tb = grant.sides[1].2.clone();
    assert!(
        matches!(&grant.remote, Some(BusCmd::Publish { ev: BusEvent::RelayTicket { to, from, ticket, url, expires_in: 60 }, .. })
            if to == "rb" && *from == me && *ticket == tb && url == "wss://a.example/relay"),
        "{grant:?}"
    );
    // Redis away: refused, never queued.
    s.bus_state(false);
    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "cluster-unavailable");
    s.bus_state(true);
    // Incoming: the ticket for a local peer names the hosting node's URL; not for a peer
    // outside the requester's rooms.
    let ticket = |from: &str| BusEvent::RelayTicket {
        to: me.clone(),
        from: from.into(),
        ticket: "t1".into(),
        url: "ws://b.example/relay".into(),
        expires_in: 30,
    };
    let o = s.bus_event("b", 1, 3, ticket("rb"));
    assert_eq!(
        to(&o, ws_id(1))[0],
        json!({"type": "relay-ticket", "peer": "rb", "ticket": "t1", "path": "/relay",
               "url": "ws://b.example/relay", "expires_in": 30})
    );
    assert!(to(&s.bus_event("b", 1, 4, ticket("rc")), ws_id(1)).is_empty());
}

#[test]
fn a_gap_asks_for_a_resync_and_the_snapshot_repairs_membership() {
    let mut s = svc();
    local_in_r1(&mut s);
    s.bus_event("b", 1, 10, joined("room:r1", "rb"));
    // 11 and 12 were lost (one of them was rb leaving, another rd joining).
    let o = s.bus_event("b", 1, 13, joined("room:r1", "re"));
    assert_eq!(
        bus(&o),
        [BusCmd::Resync {
            node: "b".into(),
            room: Some("room:r1".into())
        }],
        "the gap is detected, in that room's channel"
    );
    assert_eq!(
        to(&o, ws_id(1))[0]["peer"]["id"],
        "re",
        "the event itself still applies"
    );
    // Reordered: 12 arriving late is ignored (the resync covers it).
    assert!(s.bus_event("b", 1, 12, joined("room:r1", "rd")).is_empty());
    // The resync: b's member list is rd and re.
    let member = |id: &str| Member {
        id: id.into(),
        name: format!("name of {id}"),
        rooms: vec!["room:r1".into()],
    };
    let o = s.bus_snapshot("b", None, &[member("rd"), member("re")]);
    let m = to(&o, ws_id(1));
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m
        .iter()
        .any(|x| x["type"] == "peer-left" && x["id"] == "rb"));
    assert!(m
        .iter()
        .any(|x| x["type"] == "peer-joined" && x["peer"]["id"] == "rd"));
    // A node gone: all its peers leave.
    let o = s.bus_snapshot("b", None, &[]);
    assert_eq!(
        to(&o, ws_id(1))
            .iter()
            .filter(|x| x["type"] == "peer-left")
            .count(),
        2
    );
}

#[test]
fn redis_down_refuses_cross_node_signals_and_keeps_local_rooms() {
    let mut s = svc();
    local_in_r1(&mut s);
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    s.bus_state(false);
    let t = Instant::now();
    let o = s.message(ws_id(1), r#"{"type":"signal","to":"rb","data":1}"#, t);
    assert!(bus(&o).is_empty());
    let e = &to(&o, ws_id(1))[0];
    assert_eq!(
        (e["code"].as_str(), e["to"].as_str()),
        (Some("cluster-unavailable"), Some("rb"))
    );
    // Local traffic is unaffected.
    let o = s.connect(ws_id(2), "v4:203.0.113.1".into(), None, t);
    let id2 = to(&o, ws_id(2))[0]["id"].as_str().unwrap().to_string();
    let o = s.message(
        ws_id(1),
        &format!(r#"{{"type":"signal","to":"{id2}","data":2}}"#),
        t,
    );
    assert_eq!(to(&o, ws_id(2))[0]["data"], 2);
}

#[test]
fn without_the_bus_nothing_is_published() {
    let mut s = RoomService::new(SignalConfig::default(), true, StdRng::seed_from_u64(9));
    let t = Instant::now();
    let mut o = s.connect(ws_id(1), "v4:203.0.113.1".into(), None, t);
    o.extend(s.message(ws_id(1), r#"{"type":"join","room":"r1"}"#, t));
    assert!(bus(&o).is_empty());
    assert!(s.bus_event("b", 1, 1, joined("room:r1", "rb")).is_empty());
}

#[test]
fn a_signal_or_relay_ticket_the_bus_queue_cannot_take_is_refused_to_its_sender() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    s.set_relay_url("ws://a.example/relay".into());
    let t = Instant::now();
    let o = s.message(ws_id(1), r#"{"type":"signal","to":"rb","data":1}"#, t);
    let cmd = bus(&o).pop().unwrap();
    let o = s.bus_refused(cmd);
    let e = &to(&o, ws_id(1))[0];
    assert_eq!(
        (e["code"].as_str(), e["to"].as_str()),
        (Some("cluster-busy"), Some("rb"))
    );
    let o = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    let Some(Out::Relay(g)) = o.into_iter().find(|o| matches!(o, Out::Relay(_))) else {
        panic!("a grant")
    };
    let Some(BusCmd::Publish {
        ev: BusEvent::RelayTicket { ticket, .. },
        ..
    }) = g.remote.clone()
    else {
        panic!("{g:?}")
    };
    let o = s.bus_refused(g.remote.unwrap());
    assert_eq!(to(&o, ws_id(1))[0]["code"], "cluster-busy");
    // The session the ticket belonged to ends at once (the requester may be waiting in it).
    assert!(
        o.iter()
            .any(|x| matches!(x, Out::CancelRelay { ticket: t, .. } if *t == ticket)),
        "{o:?}"
    );
    // A lost join needs nothing from the machine: receivers resync on the gap.
    let lost_join = BusCmd::Publish {
        to: Chan::Room("room:r1".into()),
        ep: 1,
        seq: 9,
        ev: joined("room:r1", &me),
    };
    assert!(s.bus_refused(lost_join).is_empty());
    let busy = crate::signal::rooms::REFUSAL_REASONS
        .iter()
        .position(|r| *r == "cluster_busy")
        .unwrap();
    assert_eq!(s.stats().refused[busy], 2);
}

/// Through the hub: a command its full queue to the cluster driver cannot take reaches
/// the machine as a refusal (counted), not a silent drop.
#[test]
fn the_hub_hands_commands_its_full_bus_queue_refuses_back_to_the_machine() {
    use crate::signal::driver::{Hub, SendBudget};
    let mut s = svc();
    local_in_r1(&mut s);
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    let hub = Hub::new(
        s,
        SendBudget {
            frames: 64,
            bytes: 1 << 20,
        },
        None,
        60,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    hub.set_bus(tx);
    let signal = r#"{"type":"signal","to":"rb","data":1}"#;
    hub.drive(|m| m.message(ws_id(1), signal, Instant::now()));
    hub.drive(|m| m.message(ws_id(1), signal, Instant::now()));
    assert!(rx.try_recv().is_ok(), "the first one was queued");
    assert!(rx.try_recv().is_err());
    assert_eq!(
        hub.bus_dropped.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let busy = crate::signal::rooms::REFUSAL_REASONS
        .iter()
        .position(|r| *r == "cluster_busy")
        .unwrap();
    assert_eq!(hub.with_core(|m| m.stats().refused[busy]), 1);
}

/// A cross-node relay whose ticket the bus refuses frees its session at once: when the
/// hub's queue is full (the requester never got a ticket) and when Redis is lost with the
/// ticket in flight (the requester may already wait on `/relay`), instead of holding a
/// `relay_ws.max_sessions` slot until the tickets expire.
#[test]
fn a_relay_ticket_the_bus_refuses_ends_its_session_at_once() {
    use crate::relay_ws::{RelayError, RelayHub};
    use crate::signal::driver::{Hub, SendBudget};
    use std::sync::atomic::Ordering::Relaxed;
    let s = with_remote_rb("b");
    let relay = RelayHub::new(Default::default(), std::time::Duration::from_secs(60));
    let budget = SendBudget {
        frames: 64,
        bytes: 1 << 20,
    };
    let hub = Hub::new(s, budget, Some(relay.clone()), 60);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    hub.set_bus(tx);
    let ask = r#"{"type":"relay","to":"rb"}"#;
    // Queued: the session waits for rb, whose ticket is in the queue to Redis.
    hub.drive(|m| m.message(ws_id(1), ask, Instant::now()));
    assert_eq!(relay.active_sessions(), 1);
    // The queue is full now: the second session is refused and freed in the same call.
    hub.drive(|m| m.message(ws_id(1), ask, Instant::now()));
    assert_eq!(relay.active_sessions(), 1, "the refused one holds no slot");
    assert_eq!(relay.stats.sessions_cancelled.load(Relaxed), 1);
    // Redis is lost with the first ticket in flight: the cluster driver refuses it.
    let cmd = rx.try_recv().expect("the first ticket was queued");
    let BusCmd::Publish {
        ev: BusEvent::RelayTicket { ticket, .. },
        ..
    } = &cmd
    else {
        panic!("{cmd:?}")
    };
    let ticket = ticket.clone();
    hub.drive(|m| m.bus_refused(cmd));
    assert_eq!(
        relay.active_sessions(),
        0,
        "freed without waiting for the TTL"
    );
    assert_eq!(relay.stats.sessions_cancelled.load(Relaxed), 2);
    assert_eq!(
        relay.claim(&ticket, Instant::now()).err(),
        Some(RelayError::BadTicket),
        "a ticket that arrives anyway no longer opens the session"
    );
    let busy = crate::signal::rooms::REFUSAL_REASONS
        .iter()
        .position(|r| *r == "cluster_busy")
        .unwrap();
    assert_eq!(hub.with_core(|m| m.stats().refused[busy]), 2);
}

#[test]
fn a_room_is_listened_to_while_it_has_a_member_here() {
    let mut s = svc();
    let t = Instant::now();
    let me = local_in_r1(&mut s);
    // Events of a room without a member here are not for this node: ignored, no resync.
    assert!(s
        .bus_event("b", 1, 5, joined("room:elsewhere", "rx"))
        .is_empty());
    assert!(s
        .bus_event("b", 1, 9, joined("room:elsewhere", "ry"))
        .is_empty());
    // A second member: no second subscription.
    s.connect(ws_id(2), "v4:198.51.100.7".into(), None, t);
    let o = s.message(ws_id(2), r#"{"type":"join","room":"r1"}"#, t);
    assert!(
        matches!(&bus(&o)[..], [BusCmd::Publish { to: Chan::Room(r), seq: 2, .. }] if r == "room:r1"),
        "{:?}",
        bus(&o)
    );
    s.bus_event("b", 1, 1, joined("room:r1", "rb"));
    // The first leaves: published; the room still has a member here.
    let o = s.message(ws_id(1), r#"{"type":"leave","room":"r1"}"#, t);
    let first_ep = match &bus(&o)[..] {
        [BusCmd::Publish {
            to: Chan::Room(r),
            ep,
            seq: 3,
            ev: BusEvent::Left { id, .. },
        }] if r == "room:r1" && *id == me => *ep,
        other => panic!("{other:?}"),
    };
    // The last one leaves: its leave is published, then the channel is dropped, and so is
    // what this node knew of the room's remote members.
    let o = s.message(ws_id(2), r#"{"type":"leave","room":"r1"}"#, t);
    assert!(
        matches!(&bus(&o)[..], [BusCmd::Publish { to: Chan::Room(r), seq: 4, ev: BusEvent::Left { .. }, .. }, BusCmd::Unsubscribe { room }]
            if r == "room:r1" && room == "room:r1"),
        "{:?}",
        bus(&o)
    );
    assert!(
        s.bus_event("b", 1, 2, joined("room:r1", "rc")).is_empty(),
        "no longer listened to"
    );
    // Back in the room: subscribed again; this node's sequence for it restarts at 1
    // under a later epoch, and the remote members come from the subscription's resync.
    let o = s.message(ws_id(1), r#"{"type":"join","room":"r1"}"#, t);
    match &bus(&o)[..] {
        [BusCmd::Subscribe { room }, BusCmd::Publish { ep, seq: 1, .. }] => {
            assert_eq!(room, "room:r1");
            assert!(*ep > first_ep);
        }
        other => panic!("{other:?}"),
    }
    let room = to(&o, ws_id(1))
        .into_iter()
        .find(|m| m["type"] == "room")
        .unwrap();
    assert_eq!(room["peers"].as_array().unwrap().len(), 0, "rb forgotten");
    let member = |id: &str, rooms: &[&str]| Member {
        id: id.into(),
        name: format!("name of {id}"),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    };
    let o = s.bus_snapshot(
        "b",
        Some("room:r1"),
        &[member("rb", &["room:r1", "room:elsewhere"])],
    );
    let m = to(&o, ws_id(1));
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["peer"]["id"], "rb");
}

#[test]
fn gaps_duplicates_and_reordering_are_per_room_channel() {
    let mut s = svc();
    local_in_r1(&mut s);
    local_in_other(&mut s);
    // Node b's two room channels number independently: 1, 2 in r1 and 1 in other.
    assert_eq!(
        to(&s.bus_event("b", 1, 1, joined("room:r1", "p1")), ws_id(1)).len(),
        1
    );
    assert_eq!(
        to(
            &s.bus_event("b", 7, 1, joined("room:other", "q1")),
            ws_id(3)
        )
        .len(),
        1
    );
    assert_eq!(
        to(&s.bus_event("b", 1, 2, joined("room:r1", "p2")), ws_id(1)).len(),
        1
    );
    // A duplicate in one room.
    assert!(s.bus_event("b", 1, 2, joined("room:r1", "p2")).is_empty());
    // A gap in other (2 lost): a resync of that room only; r1 is undisturbed.
    let o = s.bus_event("b", 7, 3, joined("room:other", "q3"));
    assert_eq!(
        bus(&o),
        [BusCmd::Resync {
            node: "b".into(),
            room: Some("room:other".into())
        }]
    );
    let o = s.bus_event("b", 1, 3, joined("room:r1", "p3"));
    assert!(bus(&o).is_empty(), "r1's sequence has no gap");
    // Reordered within r1: 5 before 4. 5 is a gap (resync asked), 4 then a duplicate.
    let left = |id: &str| BusEvent::Left {
        room: "room:r1".into(),
        id: id.into(),
    };
    let o = s.bus_event("b", 1, 5, left("p3"));
    assert_eq!(
        bus(&o),
        [BusCmd::Resync {
            node: "b".into(),
            room: Some("room:r1".into())
        }]
    );
    assert!(s.bus_event("b", 1, 4, left("p2")).is_empty());
    // The resync of r1 repairs it: p2 left meanwhile; other's members stay as they were.
    let member = |id: &str, rooms: &[&str]| Member {
        id: id.into(),
        name: format!("name of {id}"),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    };
    let o = s.bus_snapshot(
        "b",
        Some("room:r1"),
        &[member("p1", &["room:r1"]), member("q1", &["room:other"])],
    );
    let m = to(&o, ws_id(1));
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (m[0]["type"].as_str(), m[0]["id"].as_str()),
        (Some("peer-left"), Some("p2"))
    );
    assert!(to(&o, ws_id(3)).is_empty(), "room other untouched");
    // b restarted: its r1 sequence comes under a new epoch from 1: not a duplicate.
    let o = s.bus_event("b", 2, 1, joined("room:r1", "p9"));
    assert_eq!(to(&o, ws_id(1))[0]["peer"]["id"], "p9");
    assert!(bus(&o).is_empty());
}

#[test]
fn cross_node_signals_and_tickets_go_to_the_peer_s_node_channel() {
    let mut s = with_remote_rb("node-b");
    let t = Instant::now();
    let o = s.message(ws_id(1), r#"{"type":"signal","to":"rb","data":1}"#, t);
    let o2 = s.message(ws_id(1), r#"{"type":"relay","to":"rb"}"#, t);
    let Some(Out::Relay(g)) = o2.into_iter().find(|o| matches!(o, Out::Relay(_))) else {
        panic!("a grant")
    };
    match (&bus(&o)[..], g.remote) {
        (
            [BusCmd::Publish {
                to: Chan::Node(n1),
                seq: 1,
                ..
            }],
            Some(BusCmd::Publish {
                to: Chan::Node(n2),
                seq: 2,
                ..
            }),
        ) => assert_eq!((n1.as_str(), n2.as_str()), ("node-b", "node-b")),
        other => panic!("{other:?}"),
    }
}
