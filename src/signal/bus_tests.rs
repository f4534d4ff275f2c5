//! The room machine with bus inputs and outputs (cluster mode): remote joins and leaves,
//! cross-node signals, duplicates, gaps, reordering and resyncs, Redis down.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::config::SignalConfig;
use crate::signal::bus::{BusCmd, BusEvent, Member};
use crate::signal::rooms::tests::to;
use crate::signal::rooms::RoomService;
use crate::signal::Out;

fn svc() -> RoomService {
    let mut s = RoomService::new(SignalConfig::default(), true, StdRng::seed_from_u64(9));
    s.enable_bus();
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
    let o = s.connect(1, "v4:203.0.113.1".into(), None, t);
    let id = to(&o, 1)[0]["id"].as_str().unwrap().to_string();
    let o = s.message(1, r#"{"type":"join","room":"r1"}"#, t);
    // The join is published, numbered after the LAN join.
    let cmds = bus(&o);
    assert!(
        matches!(&cmds[..], [BusCmd::Publish { seq: 2, ev: BusEvent::Joined { room, .. } }] if room == "room:r1")
    );
    id
}

#[test]
fn remote_joins_and_leaves_reach_local_members_once() {
    let mut s = svc();
    local_in_r1(&mut s);
    let o = s.bus_event("b", 1, joined("room:r1", "rb"));
    let m = to(&o, 1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["type"], "peer-joined");
    assert_eq!(m[0]["peer"]["id"], "rb");
    // The same event again (a duplicate from the bus): nothing.
    assert!(s.bus_event("b", 1, joined("room:r1", "rb")).is_empty());
    // A new local member sees the remote one in the member list.
    let t = Instant::now();
    s.connect(2, "v4:198.51.100.7".into(), None, t);
    let o = s.message(2, r#"{"type":"join","room":"r1"}"#, t);
    let room = to(&o, 2).into_iter().find(|m| m["type"] == "room").unwrap();
    assert!(room["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == "rb"));
    let o = s.bus_event(
        "b",
        2,
        BusEvent::Left {
            room: "room:r1".into(),
            id: "rb".into(),
        },
    );
    assert_eq!(to(&o, 1)[0]["type"], "peer-left");
    assert_eq!(to(&o, 2)[0]["id"], "rb");
}

#[test]
fn signals_cross_nodes_only_between_peers_sharing_a_room() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, joined("room:r1", "rb"));
    s.bus_event("b", 2, joined("room:other", "rc"));
    let t = Instant::now();
    let o = s.message(1, r#"{"type":"signal","to":"rb","data":{"sdp":"x"}}"#, t);
    let cmds = bus(&o);
    assert!(
        matches!(&cmds[..], [BusCmd::Publish { ev: BusEvent::Signal { to, from, data }, .. }]
            if to == "rb" && *from == me && *data == json!({"sdp": "x"})),
        "{cmds:?}"
    );
    let o = s.message(1, r#"{"type":"signal","to":"rc","data":1}"#, t);
    assert_eq!(to(&o, 1)[0]["code"], "not-in-shared-room");
    // Incoming: delivered with `from` as published; not to a peer outside the room.
    let o = s.bus_event(
        "b",
        3,
        BusEvent::Signal {
            to: me.clone(),
            from: "rb".into(),
            data: json!("hi"),
        },
    );
    assert_eq!(
        to(&o, 1)[0],
        json!({"type": "signal", "from": "rb", "data": "hi"})
    );
    let o = s.bus_event(
        "b",
        4,
        BusEvent::Signal {
            to: me,
            from: "rc".into(),
            data: json!("sneaky"),
        },
    );
    assert!(to(&o, 1).is_empty());
}

#[test]
fn a_relay_to_a_peer_on_another_node_is_hosted_here_and_its_ticket_goes_on_the_bus() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, joined("room:r1", "rb"));
    s.bus_event("b", 2, joined("room:other", "rc"));
    let t = Instant::now();
    // No advertised URL: the other node's peer could not reach this relay.
    let o = s.message(1, r#"{"type":"relay","to":"rb"}"#, t);
    assert_eq!(to(&o, 1)[0]["code"], "relay-unavailable");
    s.set_relay_url("wss://a.example/relay".into());
    let o = s.message(1, r#"{"type":"relay","to":"rc"}"#, t);
    assert_eq!(to(&o, 1)[0]["code"], "not-in-shared-room");
    let o = s.message(1, r#"{"type":"relay","to":"rb"}"#, t);
    let grant = o
        .iter()
        .find_map(|o| match o {
            Out::Relay(g) => Some(g.clone()),
            _ => None,
        })
        .expect("a grant");
    assert_eq!(grant.sides[0].0, 1);
    assert_eq!(grant.sides[0].1, "rb");
    let tb = grant.sides[1].2.clone();
    assert!(
        matches!(&grant.remote, Some(BusCmd::Publish { ev: BusEvent::RelayTicket { to, from, ticket, url, expires_in: 60 }, .. })
            if to == "rb" && *from == me && *ticket == tb && url == "wss://a.example/relay"),
        "{grant:?}"
    );
    // Redis away: refused, never queued.
    s.bus_state(false);
    let o = s.message(1, r#"{"type":"relay","to":"rb"}"#, t);
    assert_eq!(to(&o, 1)[0]["code"], "cluster-unavailable");
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
    let o = s.bus_event("b", 3, ticket("rb"));
    assert_eq!(
        to(&o, 1)[0],
        json!({"type": "relay-ticket", "peer": "rb", "ticket": "t1", "path": "/relay",
               "url": "ws://b.example/relay", "expires_in": 30})
    );
    assert!(to(&s.bus_event("b", 4, ticket("rc")), 1).is_empty());
}

#[test]
fn a_gap_asks_for_a_resync_and_the_snapshot_repairs_membership() {
    let mut s = svc();
    local_in_r1(&mut s);
    s.bus_event("b", 10, joined("room:r1", "rb"));
    // 11 and 12 were lost (one of them was rb leaving, another rd joining).
    let o = s.bus_event("b", 13, joined("room:r1", "re"));
    assert_eq!(
        bus(&o),
        [BusCmd::Resync { node: "b".into() }],
        "the gap is detected"
    );
    assert_eq!(
        to(&o, 1)[0]["peer"]["id"],
        "re",
        "the event itself still applies"
    );
    // Reordered: 12 arriving late is ignored (the resync covers it).
    assert!(s.bus_event("b", 12, joined("room:r1", "rd")).is_empty());
    // The resync: b's member list is rd and re.
    let member = |id: &str| Member {
        id: id.into(),
        name: format!("name of {id}"),
        rooms: vec!["room:r1".into()],
    };
    let o = s.bus_snapshot("b", &[member("rd"), member("re")]);
    let m = to(&o, 1);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m
        .iter()
        .any(|x| x["type"] == "peer-left" && x["id"] == "rb"));
    assert!(m
        .iter()
        .any(|x| x["type"] == "peer-joined" && x["peer"]["id"] == "rd"));
    // A node gone: all its peers leave.
    let o = s.bus_snapshot("b", &[]);
    assert_eq!(
        to(&o, 1)
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
    s.bus_event("b", 1, joined("room:r1", "rb"));
    s.bus_state(false);
    let t = Instant::now();
    let o = s.message(1, r#"{"type":"signal","to":"rb","data":1}"#, t);
    assert!(bus(&o).is_empty());
    let e = &to(&o, 1)[0];
    assert_eq!(
        (e["code"].as_str(), e["to"].as_str()),
        (Some("cluster-unavailable"), Some("rb"))
    );
    // Local traffic is unaffected.
    let o = s.connect(2, "v4:203.0.113.1".into(), None, t);
    let id2 = to(&o, 2)[0]["id"].as_str().unwrap().to_string();
    let o = s.message(
        1,
        &format!(r#"{{"type":"signal","to":"{id2}","data":2}}"#),
        t,
    );
    assert_eq!(to(&o, 2)[0]["data"], 2);
}

#[test]
fn without_the_bus_nothing_is_published() {
    let mut s = RoomService::new(SignalConfig::default(), true, StdRng::seed_from_u64(9));
    let t = Instant::now();
    let mut o = s.connect(1, "v4:203.0.113.1".into(), None, t);
    o.extend(s.message(1, r#"{"type":"join","room":"r1"}"#, t));
    assert!(bus(&o).is_empty());
    assert!(s.bus_event("b", 1, joined("room:r1", "rb")).is_empty());
}

#[test]
fn a_signal_or_relay_ticket_the_bus_queue_cannot_take_is_refused_to_its_sender() {
    let mut s = svc();
    let me = local_in_r1(&mut s);
    s.bus_event("b", 1, joined("room:r1", "rb"));
    s.set_relay_url("ws://a.example/relay".into());
    let t = Instant::now();
    let o = s.message(1, r#"{"type":"signal","to":"rb","data":1}"#, t);
    let cmd = bus(&o).pop().unwrap();
    let o = s.bus_refused(cmd);
    let e = &to(&o, 1)[0];
    assert_eq!(
        (e["code"].as_str(), e["to"].as_str()),
        (Some("cluster-busy"), Some("rb"))
    );
    let o = s.message(1, r#"{"type":"relay","to":"rb"}"#, t);
    let Some(Out::Relay(g)) = o.into_iter().find(|o| matches!(o, Out::Relay(_))) else {
        panic!("a grant")
    };
    let o = s.bus_refused(g.remote.unwrap());
    assert_eq!(to(&o, 1)[0]["code"], "cluster-busy");
    // A lost join needs nothing from the machine: receivers resync on the gap.
    let lost_join = BusCmd::Publish {
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
    s.bus_event("b", 1, joined("room:r1", "rb"));
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
    hub.drive(|m| m.message(1, signal, Instant::now()));
    hub.drive(|m| m.message(1, signal, Instant::now()));
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
