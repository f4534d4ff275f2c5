use super::*;
use crate::signal::bus::{BusCmd, BusEvent, Member};
use crate::signal::ws_id;
use rand::SeedableRng;
use serde_json::Value;

fn cfg() -> SignalConfig {
    SignalConfig {
        peerjs_concurrent_limit: 3,
        peerjs_queue_bound: 4,
        ..SignalConfig::default()
    }
}

fn texts(outs: &[Out], conn: WsId) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Send { conn: c, text } if *c == conn => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn closed(outs: &[Out], conn: WsId) -> bool {
    outs.iter()
        .any(|o| matches!(o, Out::Close { conn: c, .. } if *c == conn))
}

fn open(s: &mut PeerJsService, conn: WsId, id: &str, token: &str, now: Instant) -> Vec<Out> {
    s.connect(conn, Some("peerjs"), Some(id), Some(token), now)
}

#[test]
fn open_and_parameter_errors() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    let o = open(&mut s, ws_id(1), "alice", "t1", t0);
    assert_eq!(
        texts(&o, ws_id(1)),
        vec![serde_json::json!({"type":"OPEN"})]
    );
    let o = s.connect(ws_id(2), Some("peerjs"), Some("bob"), None, t0);
    assert_eq!(texts(&o, ws_id(2))[0]["type"], "ERROR");
    assert_eq!(
        texts(&o, ws_id(2))[0]["payload"]["msg"],
        INVALID_WS_PARAMETERS
    );
    assert!(closed(&o, ws_id(2)));
    let o = s.connect(ws_id(3), Some("wrong"), Some("bob"), Some("t"), t0);
    assert_eq!(texts(&o, ws_id(3))[0]["payload"]["msg"], INVALID_KEY);
    assert!(closed(&o, ws_id(3)));
}

#[test]
fn id_taken_and_silent_reattach() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    let o = open(&mut s, ws_id(2), "alice", "other", t0);
    assert_eq!(
        texts(&o, ws_id(2)),
        vec![serde_json::json!({"type":"ID-TAKEN","payload":{"msg":"ID is taken"}})]
    );
    assert!(closed(&o, ws_id(2)) && !closed(&o, ws_id(1)));
    // Same token: the new socket takes over without OPEN; the old one is closed.
    let o = open(&mut s, ws_id(3), "alice", "t1", t0);
    assert!(texts(&o, ws_id(3)).is_empty());
    assert!(closed(&o, ws_id(1)));
    // The old socket's close does not unregister alice.
    s.disconnect(ws_id(1), t0);
    open(&mut s, ws_id(4), "bob", "tb", t0);
    let o = s.message(
        ws_id(4),
        r#"{"type":"OFFER","dst":"alice","payload":{"sdp":"x"}}"#,
        t0,
    );
    assert_eq!(texts(&o, ws_id(3))[0]["src"], "bob");
}

#[test]
fn forward_sets_src_and_keeps_only_protocol_fields() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    let o = s.message(
        ws_id(1),
        r#"{"type":"CANDIDATE","src":"mallory","dst":"bob","payload":{"c":1},"extra":true}"#,
        t0,
    );
    assert_eq!(
        texts(&o, ws_id(2)),
        vec![serde_json::json!({"type":"CANDIDATE","src":"alice","dst":"bob","payload":{"c":1}})]
    );
    // Malformed and unknown messages are ignored, not answered (ERROR would abort the client).
    assert!(s.message(ws_id(1), "not json", t0).is_empty());
    assert!(s
        .message(ws_id(1), r#"{"type":"DANCE","dst":"bob"}"#, t0)
        .is_empty());
    assert!(s.message(ws_id(1), r#"[1,2]"#, t0).is_empty());
    assert_eq!(s.stats().bad_messages, 3);
}

/// The payload goes out as the sender wrote it (raw JSON text: no tree, no re-escaping),
/// a `null` payload stays `null`, and an escaped `dst` still finds its peer.
#[test]
fn payload_is_forwarded_as_raw_json_text() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    let payload = r#"{"sdp":"v=0\r\na=x \u00e9","n":[1, 2.50]}"#;
    let msg = format!(r#"{{"type":"OFFER","dst":"b\u006fb","payload":{payload}}}"#);
    let o = s.message(ws_id(1), &msg, t0);
    let Some(Out::Send {
        conn: WsId(2),
        text,
    }) = o.first()
    else {
        panic!("{o:?}")
    };
    assert_eq!(
        text.as_str(),
        format!(r#"{{"type":"OFFER","src":"alice","dst":"bob","payload":{payload}}}"#)
    );
    let o = s.message(
        ws_id(1),
        r#"{"type":"ANSWER","dst":"bob","payload":null}"#,
        t0,
    );
    assert_eq!(texts(&o, ws_id(2))[0]["payload"], Value::Null);
    assert!(texts(&o, ws_id(2))[0]
        .as_object()
        .unwrap()
        .contains_key("payload"));
    // A `dst` that is not a string is not a message of the protocol.
    assert!(s
        .message(ws_id(1), r#"{"type":"OFFER","dst":7}"#, t0)
        .is_empty());
}

#[test]
fn queue_for_absent_peer_then_expire_on_simulated_clock() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    for i in 0..3 {
        let o = s.message(
            ws_id(1),
            &format!(r#"{{"type":"CANDIDATE","dst":"ghost","payload":{i}}}"#),
            t0,
        );
        assert!(o.is_empty());
    }
    // LEAVE and EXPIRE for an absent peer are dropped, not queued.
    assert!(s
        .message(ws_id(1), r#"{"type":"LEAVE","dst":"ghost"}"#, t0)
        .is_empty());
    assert!(s.tick(t0 + Duration::from_millis(4999)).is_empty());
    let o = s.tick(t0 + Duration::from_secs(5));
    // One EXPIRE per (sender, destination) pair, from the absent peer's id.
    assert_eq!(
        texts(&o, ws_id(1)),
        vec![serde_json::json!({"type":"EXPIRE","src":"ghost","dst":"alice"})]
    );
    assert!(s.tick(t0 + Duration::from_secs(7)).is_empty());
}

#[test]
fn queued_messages_are_delivered_when_the_peer_arrives() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    s.message(
        ws_id(1),
        r#"{"type":"OFFER","dst":"bob","payload":"o"}"#,
        t0,
    );
    s.message(
        ws_id(1),
        r#"{"type":"CANDIDATE","dst":"bob","payload":"c"}"#,
        t0,
    );
    let o = open(&mut s, ws_id(2), "bob", "t2", t0 + Duration::from_secs(2));
    let got = texts(&o, ws_id(2));
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["type"], "OPEN");
    assert_eq!(got[1]["type"], "OFFER");
    assert_eq!(got[2]["type"], "CANDIDATE");
    assert!(s.tick(t0 + Duration::from_secs(10)).is_empty());
}

#[test]
fn queue_is_bounded() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    for i in 0..10 {
        s.message(
            ws_id(1),
            &format!(r#"{{"type":"CANDIDATE","dst":"ghost","payload":{i}}}"#),
            t0,
        );
    }
    assert_eq!(s.stats().queued_dropped, 6);
    let o = open(&mut s, ws_id(2), "ghost", "g", t0);
    assert_eq!(texts(&o, ws_id(2)).len(), 1 + 4);
}

#[test]
fn alive_timeout_drops_silent_clients() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    s.message(
        ws_id(2),
        r#"{"type":"HEARTBEAT"}"#,
        t0 + Duration::from_secs(30),
    );
    let o = s.tick(t0 + Duration::from_secs(60));
    assert!(closed(&o, ws_id(1)) && !closed(&o, ws_id(2)));
    assert_eq!(s.ids(), vec!["bob".to_string()]);
}

#[test]
fn concurrent_limit() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    for i in 0..3 {
        open(&mut s, ws_id(i), &format!("p{i}"), "t", t0);
    }
    let o = open(&mut s, ws_id(9), "p9", "t", t0);
    assert_eq!(
        texts(&o, ws_id(9))[0]["payload"]["msg"],
        CONNECTION_LIMIT_EXCEED
    );
    assert!(closed(&o, ws_id(9)));
}

#[test]
fn fresh_ids_are_uuids() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let id = s.fresh_id();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert_ne!(id, s.fresh_id());
}

fn close_of(outs: &[Out], conn: WsId) -> Option<(u16, &'static str)> {
    outs.iter().find_map(|o| match o {
        Out::Close {
            conn: c,
            code,
            reason,
        } if *c == conn => Some((*code, *reason)),
        _ => None,
    })
}

#[test]
fn one_mib_offer_and_150_candidates_pass_at_defaults() {
    let mut s = PeerJsService::new(SignalConfig::default(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    let sdp = "v".repeat(1 << 20);
    let o = s.message(
        ws_id(1),
        &format!(r#"{{"type":"OFFER","dst":"bob","payload":{{"sdp":{{"sdp":"{sdp}"}}}}}}"#),
        t0,
    );
    assert_eq!(
        texts(&o, ws_id(2))[0]["payload"]["sdp"]["sdp"]
            .as_str()
            .unwrap(),
        sdp
    );
    for i in 0..150u64 {
        let o = s.message(
            ws_id(1),
            &format!(r#"{{"type":"CANDIDATE","dst":"bob","payload":{{"c":{i}}}}}"#),
            t0 + Duration::from_millis(i),
        );
        assert_eq!(texts(&o, ws_id(2))[0]["payload"]["c"], i);
        assert!(close_of(&o, ws_id(1)).is_none());
    }
    assert_eq!(s.stats().refused, [0; REFUSAL_REASONS.len()]);
}

#[test]
fn a_client_past_its_rate_is_disconnected_with_a_reason() {
    let mut s = PeerJsService::new(
        SignalConfig {
            peerjs_rate_per_sec: 10,
            peerjs_burst: 20,
            ..cfg()
        },
        StdRng::seed_from_u64(1),
    );
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    for i in 0..20 {
        let o = s.message(
            ws_id(1),
            r#"{"type":"CANDIDATE","dst":"bob","payload":1}"#,
            t0,
        );
        assert_eq!(texts(&o, ws_id(2)).len(), 1, "message {i}");
    }
    // The 21st within the burst's instant: no ERROR (it would abort the client), no
    // silent drop: the connection closes with a reason naming the limit.
    let o = s.message(
        ws_id(1),
        r#"{"type":"CANDIDATE","dst":"bob","payload":1}"#,
        t0,
    );
    assert!(texts(&o, ws_id(1)).is_empty() && texts(&o, ws_id(2)).is_empty());
    let (code, reason) = close_of(&o, ws_id(1)).unwrap();
    assert_eq!(code, 1008);
    assert!(reason.contains("signal.peerjs_rate_per_sec"), "{reason}");
    assert!(reason.len() <= 123, "fits a close frame");
    assert_eq!(s.stats().refused[R_RATE], 1);
    // Unregistered: the id is free for the client's reconnect.
    assert_eq!(s.ids(), vec!["bob".to_string()]);
    let o = open(&mut s, ws_id(3), "alice", "t1", t0 + Duration::from_secs(1));
    assert_eq!(texts(&o, ws_id(3))[0]["type"], "OPEN");
}

#[test]
fn a_message_over_the_size_limit_closes_its_sender_with_1009() {
    let mut s = PeerJsService::new(
        SignalConfig {
            peerjs_max_message_bytes: 1000,
            ..cfg()
        },
        StdRng::seed_from_u64(1),
    );
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    let big = format!(
        r#"{{"type":"OFFER","dst":"bob","payload":"{}"}}"#,
        "x".repeat(1000)
    );
    let o = s.message(ws_id(1), &big, t0);
    assert!(texts(&o, ws_id(2)).is_empty());
    let (code, reason) = close_of(&o, ws_id(1)).unwrap();
    assert_eq!(code, 1009);
    assert!(reason.contains("signal.peerjs_max_message_bytes"));
    assert_eq!(s.stats().refused[R_TOO_LARGE], 1);
}

fn big_offer(dst: &str, n: usize) -> String {
    format!(
        r#"{{"type":"OFFER","dst":"{dst}","payload":"{}"}}"#,
        "p".repeat(n)
    )
}

#[test]
fn queued_bytes_are_bounded_per_sender_and_in_total_then_given_back() {
    let mut s = PeerJsService::new(
        SignalConfig {
            peerjs_concurrent_limit: 1000,
            peerjs_queue_bytes_per_sender: 250_000,
            peerjs_queue_bytes_total: 400_000,
            ..SignalConfig::default()
        },
        StdRng::seed_from_u64(1),
    );
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    open(&mut s, ws_id(2), "bob", "t2", t0);
    // alice: 60 KB messages to distinct unknown ids; the 5th would pass 250 KB.
    let mut expired_now = Vec::new();
    for i in 0..8 {
        let o = s.message(ws_id(1), &big_offer(&format!("ghost{i}"), 60_000), t0);
        expired_now.extend(texts(&o, ws_id(1)));
    }
    assert_eq!(expired_now.len(), 4, "{expired_now:?}");
    assert_eq!(
        expired_now[0],
        serde_json::json!({"type":"EXPIRE","src":"ghost4","dst":"alice"})
    );
    let st = s.stats();
    assert_eq!(st.refused[R_SENDER_BYTES], 4, "queue_sender_bytes");
    assert!(st.queued_bytes > 4 * 60_000 && st.queued_bytes <= 250_000);
    // bob: the total (400 KB) runs out first.
    let mut bob_expired = 0;
    for i in 0..4 {
        let o = s.message(ws_id(2), &big_offer(&format!("spirit{i}"), 60_000), t0);
        bob_expired += texts(&o, ws_id(2)).len();
    }
    let st = s.stats();
    assert_eq!(st.refused[R_TOTAL_BYTES], 2, "queue_total_bytes");
    assert_eq!(bob_expired, 2);
    assert!(st.queued_bytes <= 400_000);
    assert_eq!(st.queued_dropped, 6);
    // One arrives: its message is delivered and its bytes given back.
    let before = s.stats().queued_bytes;
    let o = open(&mut s, ws_id(3), "ghost0", "g", t0 + Duration::from_secs(1));
    assert_eq!(texts(&o, ws_id(3)).len(), 2);
    assert!(s.stats().queued_bytes < before);
    // The rest expire: one EXPIRE per pair, and every byte is back.
    let o = s.tick(t0 + Duration::from_secs(5));
    assert_eq!(texts(&o, ws_id(1)).len(), 3);
    assert_eq!(texts(&o, ws_id(2)).len(), 2);
    assert_eq!(s.stats().queued_bytes, 0);
    assert!(s.queued_by_sender.is_empty() && s.queues.is_empty());
    // Then alice may queue again.
    let o = s.message(
        ws_id(1),
        &big_offer("later", 60_000),
        t0 + Duration::from_secs(6),
    );
    assert!(texts(&o, ws_id(1)).is_empty());
}

#[test]
fn maps_shrink_after_a_crowd_leaves() {
    let mut s = PeerJsService::new(
        SignalConfig {
            peerjs_concurrent_limit: 10_000,
            ..SignalConfig::default()
        },
        StdRng::seed_from_u64(1),
    );
    let t0 = Instant::now();
    for i in 0..2000 {
        open(&mut s, ws_id(i), &format!("p{i}"), "t", t0);
        s.message(
            ws_id(i),
            r#"{"type":"OFFER","dst":"nobody-yet","payload":1}"#,
            t0,
        );
        s.message(ws_id(i), &big_offer(&format!("n{i}"), 10), t0);
    }
    let big = s.clients.capacity();
    for i in 0..2000 {
        s.disconnect(ws_id(i), t0);
    }
    s.tick(t0 + Duration::from_secs(5));
    assert!(
        s.clients.capacity() < big / 4,
        "{} of {big}",
        s.clients.capacity()
    );
    assert!(s.queues.capacity() <= 128);
    assert_eq!(s.stats().queued_bytes, 0);
}

// ---- cluster mode: bus inputs and outputs ----

fn bus_cmds(outs: &[Out]) -> Vec<BusCmd> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Bus(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn clustered() -> PeerJsService {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    s.enable_bus(1);
    s.bus_state(true);
    s
}

fn open_ev(id: &str) -> BusEvent {
    BusEvent::PeerjsOpen { id: id.into() }
}

#[test]
fn cluster_claim_before_open_and_id_taken_from_redis() {
    let mut s = clustered();
    let t0 = Instant::now();
    let o = open(&mut s, ws_id(1), "alice", "t1", t0);
    assert!(texts(&o, ws_id(1)).is_empty(), "no OPEN before the claim");
    assert_eq!(bus_cmds(&o), [BusCmd::Claim { id: "alice".into() }]);
    // A message for alice meanwhile waits until OPEN.
    open(&mut s, ws_id(2), "bob", "t2", t0);
    s.claim_result("bob", true);
    let o = s.message(
        ws_id(2),
        r#"{"type":"OFFER","dst":"alice","payload":{"n":1}}"#,
        t0,
    );
    assert!(texts(&o, ws_id(1)).is_empty());
    let o = s.claim_result("alice", true);
    let t = texts(&o, ws_id(1));
    assert_eq!(t[0]["type"], "OPEN");
    assert_eq!(t[1]["type"], "OFFER");
    assert!(
        matches!(&bus_cmds(&o)[0], BusCmd::Publish { ev: BusEvent::PeerjsOpen { id }, .. } if id == "alice")
    );
    assert_eq!(s.bus_members().1.len(), 2);
    // Another node won the race for carol: ID-TAKEN, and the machine forgets carol.
    open(&mut s, ws_id(3), "carol", "t3", t0);
    let o = s.claim_result("carol", false);
    assert_eq!(texts(&o, ws_id(3))[0]["type"], "ID-TAKEN");
    assert!(closed(&o, ws_id(3)));
    assert_eq!(s.client_count(), 2);
    // A claim that succeeds after its client left is released again.
    open(&mut s, ws_id(4), "dave", "t4", t0);
    let o = s.disconnect(ws_id(4), t0);
    assert_eq!(bus_cmds(&o), [BusCmd::Release { id: "dave".into() }]);
    let o = s.claim_result("dave", true);
    assert_eq!(bus_cmds(&o), [BusCmd::Release { id: "dave".into() }]);
}

#[test]
fn cluster_id_on_another_node_is_taken_and_messages_go_through_the_bus() {
    let mut s = clustered();
    let t0 = Instant::now();
    s.bus_event("b", 1, 1, open_ev("zed"), t0);
    let o = open(&mut s, ws_id(1), "zed", "t", t0);
    assert_eq!(texts(&o, ws_id(1))[0]["type"], "ID-TAKEN");
    assert!(
        bus_cmds(&o).is_empty(),
        "no claim for an id known elsewhere"
    );
    open(&mut s, ws_id(2), "alice", "t1", t0);
    s.claim_result("alice", true);
    let o = s.message(
        ws_id(2),
        r#"{"type":"OFFER","dst":"zed","payload":{"sdp":"x"}}"#,
        t0,
    );
    let cmds = bus_cmds(&o);
    let BusCmd::Publish {
        seq: s1,
        ev: BusEvent::Peerjs { to, from, text },
        ..
    } = &cmds[0]
    else {
        panic!("{cmds:?}")
    };
    assert_eq!((to.as_str(), from.as_str()), ("zed", "alice"));
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"OFFER","src":"alice","dst":"zed","payload":{"sdp":"x"}})
    );
    let o = s.message(
        ws_id(2),
        r#"{"type":"CANDIDATE","dst":"zed","payload":{"c":1}}"#,
        t0,
    );
    let BusCmd::Publish { seq: s2, .. } = &bus_cmds(&o)[0] else {
        panic!()
    };
    assert_eq!(*s2, s1 + 1, "one sequence per node, in order");
    // From zed to alice: delivered as is.
    let o = s.bus_event(
        "b",
        1,
        2,
        BusEvent::Peerjs {
            to: "alice".into(),
            from: "zed".into(),
            text: "{\"type\":\"ANSWER\"}".into(),
        },
        t0,
    );
    assert_eq!(
        texts(&o, ws_id(2)),
        vec![serde_json::json!({"type":"ANSWER"})]
    );
    // zed leaves its node: ids free, messages for it are held then expire.
    s.bus_event("b", 1, 3, BusEvent::PeerjsClose { id: "zed".into() }, t0);
    let o = open(&mut s, ws_id(3), "zed", "t", t0);
    assert_eq!(bus_cmds(&o), [BusCmd::Claim { id: "zed".into() }]);
}

#[test]
fn cluster_duplicate_gap_and_node_gone() {
    let mut s = clustered();
    let t0 = Instant::now();
    open(&mut s, ws_id(1), "alice", "t1", t0);
    s.claim_result("alice", true);
    let ans = |n: u32| BusEvent::Peerjs {
        to: "alice".into(),
        from: "zed".into(),
        text: format!("{{\"type\":\"CANDIDATE\",\"n\":{n}}}"),
    };
    assert_eq!(
        texts(&s.bus_event("b", 1, 1, open_ev("zed"), t0), ws_id(1)).len(),
        0
    );
    assert_eq!(
        texts(&s.bus_event("b", 1, 2, ans(1), t0), ws_id(1)).len(),
        1
    );
    // A duplicate is ignored.
    assert!(s.bus_event("b", 1, 2, ans(1), t0).is_empty());
    // A gap: applied, and a resync of that node asked for.
    let o = s.bus_event("b", 1, 5, ans(2), t0);
    assert_eq!(texts(&o, ws_id(1)).len(), 1);
    assert_eq!(
        bus_cmds(&o),
        [BusCmd::Resync {
            node: "b".into(),
            room: None
        }]
    );
    // The late (reordered) one is a duplicate: the resync covers it.
    assert!(s.bus_event("b", 1, 4, ans(9), t0).is_empty());
    // The resync shows zed gone and yan there.
    let yan = Member {
        id: "yan".into(),
        name: String::new(),
        rooms: vec!["peerjs".into()],
    };
    s.bus_snapshot("b", std::slice::from_ref(&yan));
    assert_eq!(
        texts(&open(&mut s, ws_id(2), "yan", "t", t0), ws_id(2))[0]["type"],
        "ID-TAKEN"
    );
    let o = open(&mut s, ws_id(3), "zed", "t", t0);
    assert_eq!(bus_cmds(&o), [BusCmd::Claim { id: "zed".into() }]);
    // Node b gone (crashed): its ids are free; a message for one is held, then EXPIRE.
    s.bus_snapshot("b", &[]);
    let o = s.message(ws_id(1), r#"{"type":"OFFER","dst":"yan","payload":{}}"#, t0);
    assert!(
        bus_cmds(&o).is_empty() && texts(&o, ws_id(1)).is_empty(),
        "held here"
    );
    let o = s.tick(t0 + Duration::from_secs(6));
    assert_eq!(
        texts(&o, ws_id(1)),
        vec![serde_json::json!({"type":"EXPIRE","src":"yan","dst":"alice"})]
    );
}

#[test]
fn cluster_redis_down_expires_cross_node_sends_and_opens_locally() {
    let mut s = clustered();
    let t0 = Instant::now();
    s.bus_event("b", 1, 1, open_ev("zed"), t0);
    open(&mut s, ws_id(1), "alice", "t1", t0);
    s.claim_result("alice", true);
    s.bus_state(false);
    let o = s.message(ws_id(1), r#"{"type":"OFFER","dst":"zed","payload":{}}"#, t0);
    assert!(bus_cmds(&o).is_empty());
    assert_eq!(
        texts(&o, ws_id(1)),
        vec![serde_json::json!({"type":"EXPIRE","src":"zed","dst":"alice"})]
    );
    assert_eq!(s.stats().refused[R_CLUSTER], 1);
    // A new local id opens at once; it is in the list the driver rewrites on reconnect.
    let o = open(&mut s, ws_id(2), "bob", "t2", t0);
    assert_eq!(texts(&o, ws_id(2))[0]["type"], "OPEN");
    assert!(s.bus_members().1.iter().any(|m| m.id == "bob"));
    // Messages between local peers are untouched.
    let o = s.message(
        ws_id(2),
        r#"{"type":"OFFER","dst":"alice","payload":{}}"#,
        t0,
    );
    assert_eq!(texts(&o, ws_id(1))[0]["type"], "OFFER");
}

#[test]
fn single_node_emits_no_bus_commands() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    let mut all = open(&mut s, ws_id(1), "alice", "t1", t0);
    all.extend(s.message(
        ws_id(1),
        r#"{"type":"OFFER","dst":"nobody","payload":{}}"#,
        t0,
    ));
    all.extend(s.disconnect(ws_id(1), t0));
    assert!(bus_cmds(&all).is_empty());
}

#[test]
fn cluster_claim_pending_when_redis_goes_opens_locally() {
    let mut s = clustered();
    let t0 = Instant::now();
    let o = open(&mut s, ws_id(1), "alice", "t1", t0);
    assert_eq!(bus_cmds(&o), [BusCmd::Claim { id: "alice".into() }]);
    // The claim's answer never comes: Redis went away first.
    let o = s.bus_state(false);
    assert_eq!(
        texts(&o, ws_id(1)),
        vec![serde_json::json!({"type":"OPEN"})]
    );
    assert!(
        bus_cmds(&o).is_empty(),
        "nothing published while Redis is away"
    );
    // A late answer changes nothing.
    assert!(s.claim_result("alice", true).is_empty());
}

#[test]
fn cluster_commands_the_bus_queue_cannot_take_are_never_silent() {
    let mut s = clustered();
    let t0 = Instant::now();
    s.bus_event("b", 1, 1, open_ev("zed"), t0);
    open(&mut s, ws_id(1), "alice", "t1", t0);
    s.claim_result("alice", true);
    // A message for zed (on node b) that could not be queued: EXPIRE back to alice.
    let o = s.message(ws_id(1), r#"{"type":"OFFER","dst":"zed","payload":{}}"#, t0);
    let cmd = bus_cmds(&o).pop().unwrap();
    let o = s.bus_refused(cmd, t0);
    let t = texts(&o, ws_id(1));
    assert_eq!(
        (t[0]["type"].as_str(), t[0]["src"].as_str()),
        (Some("EXPIRE"), Some("zed"))
    );
    // A LEAVE lost that way needs no answer.
    let o = s.message(ws_id(1), r#"{"type":"LEAVE","dst":"zed"}"#, t0);
    let cmd = bus_cmds(&o).pop().unwrap();
    assert!(s.bus_refused(cmd, t0).is_empty());
    // A claim that could not be queued: ERROR and a close, never a Peer left waiting.
    let o = open(&mut s, ws_id(2), "bob", "t2", t0);
    let cmd = bus_cmds(&o).pop().unwrap();
    let o = s.bus_refused(cmd, t0);
    assert_eq!(texts(&o, ws_id(2))[0]["type"], "ERROR");
    assert!(closed(&o, ws_id(2)));
    assert_eq!(s.client_count(), 1);
    let busy = crate::signal::peerjs::REFUSAL_REASONS
        .iter()
        .position(|r| *r == "cluster_busy")
        .unwrap();
    assert_eq!(s.stats().refused[busy], 2);
}
