use super::*;
use rand::SeedableRng;

fn cfg() -> SignalConfig {
    SignalConfig {
        peerjs_concurrent_limit: 3,
        peerjs_queue_bound: 4,
        ..SignalConfig::default()
    }
}

fn texts(outs: &[Out], conn: ConnId) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Send { conn: c, text } if *c == conn => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn closed(outs: &[Out], conn: ConnId) -> bool {
    outs.iter()
        .any(|o| matches!(o, Out::Close { conn: c, .. } if *c == conn))
}

fn open(s: &mut PeerJsService, conn: ConnId, id: &str, token: &str, now: Instant) -> Vec<Out> {
    s.connect(conn, Some("peerjs"), Some(id), Some(token), now)
}

#[test]
fn open_and_parameter_errors() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    let o = open(&mut s, 1, "alice", "t1", t0);
    assert_eq!(texts(&o, 1), vec![serde_json::json!({"type":"OPEN"})]);
    let o = s.connect(2, Some("peerjs"), Some("bob"), None, t0);
    assert_eq!(texts(&o, 2)[0]["type"], "ERROR");
    assert_eq!(texts(&o, 2)[0]["payload"]["msg"], INVALID_WS_PARAMETERS);
    assert!(closed(&o, 2));
    let o = s.connect(3, Some("wrong"), Some("bob"), Some("t"), t0);
    assert_eq!(texts(&o, 3)[0]["payload"]["msg"], INVALID_KEY);
    assert!(closed(&o, 3));
}

#[test]
fn id_taken_and_silent_reattach() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, 1, "alice", "t1", t0);
    let o = open(&mut s, 2, "alice", "other", t0);
    assert_eq!(
        texts(&o, 2),
        vec![serde_json::json!({"type":"ID-TAKEN","payload":{"msg":"ID is taken"}})]
    );
    assert!(closed(&o, 2) && !closed(&o, 1));
    // Same token: the new socket takes over without OPEN; the old one is closed.
    let o = open(&mut s, 3, "alice", "t1", t0);
    assert!(texts(&o, 3).is_empty());
    assert!(closed(&o, 1));
    // The old socket's close does not unregister alice.
    s.disconnect(1, t0);
    open(&mut s, 4, "bob", "tb", t0);
    let o = s.message(
        4,
        r#"{"type":"OFFER","dst":"alice","payload":{"sdp":"x"}}"#,
        t0,
    );
    assert_eq!(texts(&o, 3)[0]["src"], "bob");
}

#[test]
fn forward_sets_src_and_keeps_only_protocol_fields() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, 1, "alice", "t1", t0);
    open(&mut s, 2, "bob", "t2", t0);
    let o = s.message(
        1,
        r#"{"type":"CANDIDATE","src":"mallory","dst":"bob","payload":{"c":1},"extra":true}"#,
        t0,
    );
    assert_eq!(
        texts(&o, 2),
        vec![serde_json::json!({"type":"CANDIDATE","src":"alice","dst":"bob","payload":{"c":1}})]
    );
    // Malformed and unknown messages are ignored, not answered (ERROR would abort the client).
    assert!(s.message(1, "not json", t0).is_empty());
    assert!(s
        .message(1, r#"{"type":"DANCE","dst":"bob"}"#, t0)
        .is_empty());
    assert!(s.message(1, r#"[1,2]"#, t0).is_empty());
    assert_eq!(s.stats().bad_messages, 3);
}

#[test]
fn queue_for_absent_peer_then_expire_on_simulated_clock() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, 1, "alice", "t1", t0);
    for i in 0..3 {
        let o = s.message(
            1,
            &format!(r#"{{"type":"CANDIDATE","dst":"ghost","payload":{i}}}"#),
            t0,
        );
        assert!(o.is_empty());
    }
    // LEAVE and EXPIRE for an absent peer are dropped, not queued.
    assert!(s
        .message(1, r#"{"type":"LEAVE","dst":"ghost"}"#, t0)
        .is_empty());
    assert!(s.tick(t0 + Duration::from_millis(4999)).is_empty());
    let o = s.tick(t0 + Duration::from_secs(5));
    // One EXPIRE per (sender, destination) pair, from the absent peer's id.
    assert_eq!(
        texts(&o, 1),
        vec![serde_json::json!({"type":"EXPIRE","src":"ghost","dst":"alice"})]
    );
    assert!(s.tick(t0 + Duration::from_secs(7)).is_empty());
}

#[test]
fn queued_messages_are_delivered_when_the_peer_arrives() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, 1, "alice", "t1", t0);
    s.message(1, r#"{"type":"OFFER","dst":"bob","payload":"o"}"#, t0);
    s.message(1, r#"{"type":"CANDIDATE","dst":"bob","payload":"c"}"#, t0);
    let o = open(&mut s, 2, "bob", "t2", t0 + Duration::from_secs(2));
    let got = texts(&o, 2);
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
    open(&mut s, 1, "alice", "t1", t0);
    for i in 0..10 {
        s.message(
            1,
            &format!(r#"{{"type":"CANDIDATE","dst":"ghost","payload":{i}}}"#),
            t0,
        );
    }
    assert_eq!(s.stats().queued_dropped, 6);
    let o = open(&mut s, 2, "ghost", "g", t0);
    assert_eq!(texts(&o, 2).len(), 1 + 4);
}

#[test]
fn alive_timeout_drops_silent_clients() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    open(&mut s, 1, "alice", "t1", t0);
    open(&mut s, 2, "bob", "t2", t0);
    s.message(2, r#"{"type":"HEARTBEAT"}"#, t0 + Duration::from_secs(30));
    let o = s.tick(t0 + Duration::from_secs(60));
    assert!(closed(&o, 1) && !closed(&o, 2));
    assert_eq!(s.ids(), vec!["bob".to_string()]);
}

#[test]
fn concurrent_limit() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let t0 = Instant::now();
    for i in 0..3 {
        open(&mut s, i, &format!("p{i}"), "t", t0);
    }
    let o = open(&mut s, 9, "p9", "t", t0);
    assert_eq!(texts(&o, 9)[0]["payload"]["msg"], CONNECTION_LIMIT_EXCEED);
    assert!(closed(&o, 9));
}

#[test]
fn fresh_ids_are_uuids() {
    let mut s = PeerJsService::new(cfg(), StdRng::seed_from_u64(1));
    let id = s.fresh_id();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert_ne!(id, s.fresh_id());
}
