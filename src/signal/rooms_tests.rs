use super::*;
use crate::signal::ws_id;
use rand::SeedableRng;
use serde_json::Value;

fn cfg() -> SignalConfig {
    SignalConfig::default()
}

fn svc() -> RoomService {
    RoomService::new(cfg(), true, StdRng::seed_from_u64(7))
}

/// Messages sent to `conn`, parsed (the bus tests use it too).
pub(crate) fn to(outs: &[Out], conn: WsId) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Send { conn: c, text } if *c == conn => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn of_type<'a>(msgs: &'a [Value], t: &str) -> Vec<&'a Value> {
    msgs.iter().filter(|m| m["type"] == t).collect()
}

fn welcome(outs: &[Out], conn: WsId) -> (String, String) {
    let w = to(outs, conn)
        .into_iter()
        .find(|m| m["type"] == "welcome")
        .expect("welcome");
    (
        w["id"].as_str().unwrap().to_string(),
        w["resume"].as_str().unwrap().to_string(),
    )
}

#[test]
fn connect_assigns_id_name_and_lan_room() {
    let mut s = svc();
    let t0 = Instant::now();
    let o = s.connect(ws_id(1), "v4:203.0.113.1".into(), None, t0);
    let m = to(&o, ws_id(1));
    assert_eq!(m[0]["type"], "welcome");
    assert_eq!(m[0]["rooms"], serde_json::json!(["lan"]));
    assert!(m[0]["name"].as_str().unwrap().contains(' '));
    assert_eq!(m[1]["type"], "room");
    assert_eq!(m[1]["peers"], serde_json::json!([]));
}

#[test]
fn lan_members_see_each_other_and_other_lans_do_not() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, _) = welcome(
        &s.connect(ws_id(1), "v4:203.0.113.1".into(), None, t0),
        ws_id(1),
    );
    let o = s.connect(ws_id(2), "v4:203.0.113.1".into(), None, t0);
    let (b, _) = welcome(&o, ws_id(2));
    // B gets the member list with A; A is told B joined.
    let room = of_type(&to(&o, ws_id(2)), "room")[0].clone();
    assert_eq!(room["peers"][0]["id"], a.as_str());
    let joined = of_type(&to(&o, ws_id(1)), "peer-joined")[0].clone();
    assert_eq!(joined["peer"]["id"], b.as_str());
    assert_eq!(joined["room"], "lan");
    // C from another address sees nobody and nobody hears of C.
    let o = s.connect(ws_id(3), "v4:198.51.100.9".into(), None, t0);
    assert_eq!(
        of_type(&to(&o, ws_id(3)), "room")[0]["peers"],
        serde_json::json!([])
    );
    assert!(to(&o, ws_id(1)).is_empty() && to(&o, ws_id(2)).is_empty());
    // C cannot signal A: no shared room.
    let o = s.message(
        ws_id(3),
        &format!(r#"{{"type":"signal","to":"{a}","data":{{}}}}"#),
        t0,
    );
    assert_eq!(to(&o, ws_id(3))[0]["code"], "not-in-shared-room");
    assert!(to(&o, ws_id(1)).is_empty());
}

#[test]
fn signal_from_is_set_by_server_not_client() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, _) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    let (b, _) = welcome(&s.connect(ws_id(2), "local".into(), None, t0), ws_id(2));
    // A tries to pretend to be someone else: unknown fields are rejected outright...
    let o = s.message(
        ws_id(1),
        &format!(r#"{{"type":"signal","to":"{b}","from":"mallory","data":{{"sdp":"x"}}}}"#),
        t0,
    );
    assert_eq!(to(&o, ws_id(1))[0]["code"], "bad-message");
    assert!(to(&o, ws_id(2)).is_empty());
    // ...and a spoofed `from` inside data stays opaque data; the envelope says A.
    let o = s.message(
        ws_id(1),
        &format!(r#"{{"type":"signal","to":"{b}","data":{{"from":"mallory","sdp":"v=0"}}}}"#),
        t0,
    );
    let got = to(&o, ws_id(2));
    assert_eq!(got[0]["type"], "signal");
    assert_eq!(got[0]["from"], a.as_str());
    assert_eq!(got[0]["data"]["sdp"], "v=0");
}

#[test]
fn named_rooms_join_leave_and_errors() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, _) = welcome(
        &s.connect(ws_id(1), "v4:203.0.113.1".into(), None, t0),
        ws_id(1),
    );
    let (b, _) = welcome(
        &s.connect(ws_id(2), "v4:198.51.100.2".into(), None, t0),
        ws_id(2),
    );
    s.message(ws_id(1), r#"{"type":"join","room":"share-42"}"#, t0);
    let o = s.message(ws_id(2), r#"{"type":"join","room":"share-42"}"#, t0);
    assert_eq!(
        of_type(&to(&o, ws_id(2)), "room")[0]["peers"][0]["id"],
        a.as_str()
    );
    assert_eq!(
        of_type(&to(&o, ws_id(1)), "peer-joined")[0]["room"],
        "share-42"
    );
    // Now they share a room: signaling works across LANs.
    let o = s.message(
        ws_id(2),
        &format!(r#"{{"type":"signal","to":"{a}","data":1}}"#),
        t0,
    );
    assert_eq!(to(&o, ws_id(1))[0]["from"], b.as_str());
    // Leave: A hears peer-left, B gets `left`, signaling stops.
    let o = s.message(ws_id(2), r#"{"type":"leave","room":"share-42"}"#, t0);
    assert_eq!(of_type(&to(&o, ws_id(1)), "peer-left")[0]["id"], b.as_str());
    assert_eq!(to(&o, ws_id(2))[0]["type"], "left");
    let o = s.message(
        ws_id(2),
        &format!(r#"{{"type":"signal","to":"{a}","data":1}}"#),
        t0,
    );
    assert_eq!(to(&o, ws_id(2))[0]["code"], "not-in-shared-room");
    // Errors.
    let o = s.message(ws_id(2), r#"{"type":"join","room":"bad room!"}"#, t0);
    assert_eq!(to(&o, ws_id(2))[0]["code"], "bad-room");
    let o = s.message(ws_id(2), r#"{"type":"join","room":"lan"}"#, t0);
    assert_eq!(to(&o, ws_id(2))[0]["code"], "bad-room");
    let o = s.message(ws_id(2), r#"{"type":"signal","to":"nobody","data":1}"#, t0);
    assert_eq!(to(&o, ws_id(2))[0]["code"], "peer-not-found");
    assert_eq!(to(&o, ws_id(2))[0]["to"], "nobody");
}

#[test]
fn bad_input_gets_precise_errors() {
    let mut s = svc();
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    let code = |s: &mut RoomService, text: &str| {
        let o = s.message(ws_id(1), text, t0);
        to(&o, ws_id(1))[0]["code"].as_str().unwrap().to_string()
    };
    assert_eq!(code(&mut s, "{nope"), "bad-json");
    assert_eq!(code(&mut s, r#"{"type":"dance"}"#), "unknown-type");
    assert_eq!(code(&mut s, r#"{"kind":"join"}"#), "bad-message");
    assert_eq!(code(&mut s, r#"{"type":"join"}"#), "bad-message");
    let big = format!(
        r#"{{"type":"signal","to":"x","data":"{}"}}"#,
        "a".repeat((2 << 20) + 1)
    );
    assert_eq!(code(&mut s, &big), "too-large");
    assert!(to(&s.message(ws_id(1), &big, t0), ws_id(1))[0]["message"]
        .as_str()
        .unwrap()
        .contains("signal.max_message_bytes"));
    assert_eq!(s.stats().bad_messages, 6);
    assert_eq!(s.stats().refused, [0, 2, 4, 0, 0, 0, 0, 0]);
}

#[test]
fn flood_is_rate_limited_then_cut_off() {
    let mut s = RoomService::new(
        SignalConfig {
            rate_per_sec: 5,
            burst: 5,
            ..cfg()
        },
        true,
        StdRng::seed_from_u64(7),
    );
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    s.connect(ws_id(2), "local".into(), None, t0);
    for _ in 0..5 {
        let o = s.message(ws_id(1), r#"{"type":"ping"}"#, t0);
        assert_eq!(to(&o, ws_id(1))[0]["type"], "pong");
    }
    let o = s.message(ws_id(1), r#"{"type":"ping"}"#, t0);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "rate-limited");
    // Within the same second no further error; past 4x the burst refused in one episode
    // (the client ignored the error) the socket closes.
    let mut closed = false;
    for _ in 0..25 {
        let o = s.message(ws_id(1), r#"{"type":"ping"}"#, t0);
        if o.iter().any(|x| {
            matches!(
                x,
                Out::Close {
                    conn: WsId(1),
                    code: 1008,
                    ..
                }
            )
        }) {
            closed = true;
            break;
        }
        assert!(to(&o, ws_id(1)).is_empty());
    }
    assert!(closed);
    // The other peer was told and is still served.
    let o = s.message(ws_id(2), r#"{"type":"ping"}"#, t0);
    assert_eq!(to(&o, ws_id(2))[0]["type"], "pong");
    // After a second the limit refills for a well-behaved client.
    let o = s.message(ws_id(2), r#"{"type":"ping"}"#, t0 + Duration::from_secs(1));
    assert_eq!(to(&o, ws_id(2))[0]["type"], "pong");
}

#[test]
fn heartbeat_ping_then_timeout_tells_rooms() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, _) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    s.connect(ws_id(2), "local".into(), None, t0);
    let o = s.tick(t0 + Duration::from_secs(19));
    assert!(o.is_empty());
    let o = s.tick(t0 + Duration::from_secs(20));
    assert!(o.contains(&Out::Ping { conn: ws_id(1) }) && o.contains(&Out::Ping { conn: ws_id(2) }));
    // No second ping within the interval.
    assert!(s.tick(t0 + Duration::from_secs(21)).is_empty());
    // B answers (a pong frame), A stays silent.
    s.alive(ws_id(2), t0 + Duration::from_secs(30));
    let o = s.tick(t0 + Duration::from_secs(60));
    assert!(o.iter().any(|x| matches!(
        x,
        Out::Close {
            conn: WsId(1),
            code: 4001,
            ..
        }
    )));
    assert_eq!(of_type(&to(&o, ws_id(2)), "peer-left")[0]["id"], a.as_str());
    assert!(!o
        .iter()
        .any(|x| matches!(x, Out::Close { conn: WsId(2), .. })));
    assert_eq!(s.live_peers(), 1);
}

#[test]
fn resume_within_grace_keeps_id_and_rooms() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, token) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    s.message(ws_id(1), r#"{"type":"join","room":"r1"}"#, t0);
    s.connect(ws_id(2), "local".into(), None, t0);
    s.message(ws_id(2), r#"{"type":"join","room":"r1"}"#, t0);
    let o = s.disconnect(ws_id(1), t0);
    assert_eq!(
        of_type(&to(&o, ws_id(2)), "peer-left").len(),
        2,
        "left lan and r1"
    );
    // Back within the grace period on a new connection: same id, same rooms.
    let o = s.connect(
        ws_id(3),
        "local".into(),
        Some(&token),
        t0 + Duration::from_secs(10),
    );
    let (id, _) = welcome(&o, ws_id(3));
    assert_eq!(id, a);
    let w = of_type(&to(&o, ws_id(3)), "welcome")[0].clone();
    assert_eq!(w["resumed"], true);
    assert_eq!(w["rooms"], serde_json::json!(["lan", "r1"]));
    assert_eq!(of_type(&to(&o, ws_id(2)), "peer-joined").len(), 2);
    // After the grace period the (rotated) token is forgotten: a fresh id.
    let token = w["resume"].as_str().unwrap().to_string();
    s.disconnect(ws_id(3), t0 + Duration::from_secs(20));
    s.tick(t0 + Duration::from_secs(51));
    let (id2, _) = welcome(
        &s.connect(
            ws_id(4),
            "local".into(),
            Some(&token),
            t0 + Duration::from_secs(52),
        ),
        ws_id(4),
    );
    assert_ne!(id2, a);
}

#[test]
fn resume_while_attached_replaces_the_old_socket() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, token) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    let o = s.connect(ws_id(2), "local".into(), Some(&token), t0);
    assert!(o.iter().any(|x| matches!(
        x,
        Out::Close {
            conn: WsId(1),
            code: 4000,
            ..
        }
    )));
    assert_eq!(welcome(&o, ws_id(2)).0, a);
    assert_eq!(s.live_peers(), 1);
    // The old socket's late close changes nothing.
    assert!(s.disconnect(ws_id(1), t0).is_empty());
    assert_eq!(s.live_peers(), 1);
}

#[test]
fn relay_grant_only_for_peers_sharing_a_room() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, _) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    let (b, _) = welcome(&s.connect(ws_id(2), "local".into(), None, t0), ws_id(2));
    let (c, _) = welcome(
        &s.connect(ws_id(3), "v4:198.51.100.1".into(), None, t0),
        ws_id(3),
    );
    let o = s.message(ws_id(1), &format!(r#"{{"type":"relay","to":"{b}"}}"#), t0);
    let Some(Out::Relay(g)) = o.first() else {
        panic!("{o:?}")
    };
    assert_eq!(g.sides[0].0, ws_id(1));
    assert_eq!(g.sides[0].1, b);
    assert_eq!(g.sides[1].0, ws_id(2));
    assert_eq!(g.sides[1].1, a);
    assert_ne!(g.sides[0].2, g.sides[1].2);
    let o = s.message(ws_id(1), &format!(r#"{{"type":"relay","to":"{c}"}}"#), t0);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "not-in-shared-room");
    let mut off = RoomService::new(cfg(), false, StdRng::seed_from_u64(1));
    off.connect(ws_id(1), "local".into(), None, t0);
    let o = off.message(ws_id(1), r#"{"type":"relay","to":"x"}"#, t0);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "relay-unavailable");
}

/// A service that holds one live connection at most.
fn one_peer_service() -> RoomService {
    RoomService::new(
        SignalConfig {
            max_peers: 1,
            ..cfg()
        },
        true,
        StdRng::seed_from_u64(1),
    )
}

/// Found by fuzzing (fuzz/fuzz_targets/signal_messages.rs): a resume skipped the
/// `max_peers` check, so peers that disconnected and came back could exceed it.
#[test]
fn resume_of_a_detached_peer_respects_max_peers() {
    let mut s = one_peer_service();
    let t0 = Instant::now();
    let (_, token) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    s.disconnect(ws_id(1), t0);
    s.connect(ws_id(2), "local".into(), None, t0);
    let o = s.connect(ws_id(3), "local".into(), Some(&token), t0);
    assert!(matches!(
        o[..],
        [Out::Close {
            conn: WsId(3),
            code: 1013,
            ..
        }]
    ));
    assert_eq!(s.live_peers(), 1);
    // Once there is room the same token still resumes.
    s.disconnect(ws_id(2), t0);
    let o = s.connect(ws_id(4), "local".into(), Some(&token), t0);
    let w = of_type(&to(&o, ws_id(4)), "welcome")[0].clone();
    assert_eq!(w["resumed"], true);
}

#[test]
fn server_full_is_refused_with_1013() {
    let mut s = one_peer_service();
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    let o = s.connect(ws_id(2), "local".into(), None, t0);
    assert!(matches!(
        o[..],
        [Out::Close {
            conn: WsId(2),
            code: 1013,
            ..
        }]
    ));
}

#[test]
fn a_full_lan_room_is_not_joined() {
    let mut s = RoomService::new(
        SignalConfig {
            max_room_size: 2,
            ..cfg()
        },
        true,
        StdRng::seed_from_u64(3),
    );
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    s.connect(ws_id(2), "local".into(), None, t0);
    let o = s.connect(ws_id(3), "local".into(), None, t0);
    let m = to(&o, ws_id(3));
    assert_eq!(m[0]["type"], "welcome");
    assert_eq!(m[0]["rooms"], serde_json::json!([]));
    assert_eq!(m[1]["code"], "room-full");
    // Nobody in the full room heard of it.
    assert!(to(&o, ws_id(1)).is_empty() && to(&o, ws_id(2)).is_empty());
    // It can still use named rooms.
    let o = s.message(ws_id(3), r#"{"type":"join","room":"side"}"#, t0);
    assert_eq!(to(&o, ws_id(3))[0]["type"], "room");
}

fn ping_n(s: &mut RoomService, conn: WsId, n: usize, now: Instant) -> Vec<Value> {
    (0..n)
        .flat_map(|_| to(&s.message(conn, r#"{"type":"ping"}"#, now), conn))
        .collect()
}

fn closed_with(outs: &[Out], conn: WsId, code: u16) -> bool {
    outs.iter()
        .any(|o| matches!(o, Out::Close { conn: c, code: k, .. } if *c == conn && *k == code))
}

#[test]
fn refusals_are_reported_with_counts_at_most_once_a_second() {
    let mut s = RoomService::new(
        SignalConfig {
            rate_per_sec: 10,
            burst: 10,
            ..cfg()
        },
        true,
        StdRng::seed_from_u64(7),
    );
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    assert_eq!(of_type(&ping_n(&mut s, ws_id(1), 10, t0), "pong").len(), 10);
    // Refusing starts: one error naming the limit, counting this message.
    let m = ping_n(&mut s, ws_id(1), 1, t0);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["code"], "rate-limited");
    assert_eq!(m[0]["refused"], 1);
    let text = m[0]["message"].as_str().unwrap();
    assert!(
        text.contains("signal.rate_per_sec") && text.contains("10 messages/s"),
        "{text}"
    );
    // 14 more within the second: refused without a word each.
    assert!(ping_n(&mut s, ws_id(1), 14, t0 + Duration::from_millis(50)).is_empty());
    // A second after the error the next message carries the count since it: 14.
    let t1 = t0 + Duration::from_millis(1050);
    let m: Vec<Value> = ping_n(&mut s, ws_id(1), 30, t1);
    let errs = of_type(&m, "error");
    assert_eq!(errs.len(), 1, "{m:?}");
    assert_eq!(errs[0]["refused"], 14);
    // 10 tokens refilled by t1 passed; the other 20 were refused, not yet reported.
    assert_eq!(of_type(&m, "pong").len(), 10);
    // The client stops; the tick reports the rest and ends the episode.
    let o = s.tick(t0 + Duration::from_millis(2100));
    let m = to(&o, ws_id(1));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["refused"], 20);
    assert!(s.tick(t0 + Duration::from_secs(4)).is_empty());
    let st = s.stats();
    assert_eq!(st.rate_limited, 1 + 14 + 20);
    assert_eq!(st.refused[R_RATE], st.rate_limited);
    assert_eq!(st.flood_closed, 0);
    // A new episode starts with a new first error.
    let m = ping_n(&mut s, ws_id(1), 11, t0 + Duration::from_secs(10));
    assert_eq!(of_type(&m, "error")[0]["refused"], 1);
}

#[test]
fn a_sustained_flooder_is_closed_with_1008_after_the_error() {
    let mut s = svc(); // defaults: 50/s, burst 200
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    s.connect(ws_id(2), "local".into(), None, t0);
    // 5000 messages/s in 1 ms steps: the burst passes, then the error, then the close.
    let mut first_error = None;
    let mut closed_at = None;
    for i in 0..5000u64 {
        let now = t0 + Duration::from_micros(200 * i);
        let o = s.message(ws_id(1), r#"{"type":"ping"}"#, now);
        if first_error.is_none() && to(&o, ws_id(1)).iter().any(|m| m["code"] == "rate-limited") {
            first_error = Some(i);
        }
        if closed_with(&o, ws_id(1), 1008) {
            closed_at = Some(i);
            break;
        }
    }
    let (e, c) = (first_error.unwrap(), closed_at.unwrap());
    assert!(e >= 200 && e < c, "error at {e}, close at {c}");
    // Closed after 4 x burst refusals (plus the refill of those 0.2 ms steps), well within a second.
    assert!(c < 1100, "closed at message {c}");
    assert_eq!(s.stats().flood_closed, 1);
    assert_eq!(s.live_peers(), 1);
}

#[test]
fn a_renegotiation_and_150_candidates_pass_at_defaults() {
    let mut s = svc();
    let t0 = Instant::now();
    let (_, _) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    let (b, _) = welcome(&s.connect(ws_id(2), "local".into(), None, t0), ws_id(2));
    let sdp = format!(
        r#"{{"type":"signal","to":"{b}","data":{{"sdp":"{}"}}}}"#,
        "a".repeat(64 * 1024)
    );
    let mut got = 0;
    for i in 0..152 {
        let text = if i < 2 {
            sdp.clone()
        } else {
            format!(r#"{{"type":"signal","to":"{b}","data":{{"candidate":"c{i}"}}}}"#)
        };
        let o = s.message(ws_id(1), &text, t0 + Duration::from_millis(i * 5));
        assert!(
            to(&o, ws_id(1)).is_empty(),
            "message {i}: {:?}",
            to(&o, ws_id(1))
        );
        got += of_type(&to(&o, ws_id(2)), "signal").len();
    }
    assert_eq!(got, 152);
    assert_eq!(s.stats().rate_limited, 0);
}

#[test]
fn a_1_mib_signal_passes_at_defaults_and_the_limit_is_named() {
    let mut s = svc();
    let t0 = Instant::now();
    welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    let (b, _) = welcome(&s.connect(ws_id(2), "local".into(), None, t0), ws_id(2));
    let blob = "s".repeat(1 << 20);
    let text = format!(r#"{{"type":"signal","to":"{b}","data":"{blob}"}}"#);
    let o = s.message(ws_id(1), &text, t0);
    assert!(to(&o, ws_id(1)).is_empty());
    assert_eq!(to(&o, ws_id(2))[0]["data"].as_str().unwrap(), blob);
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2 << 20));
    let m = to(&s.message(ws_id(1), &big, t0), ws_id(1));
    assert_eq!(m[0]["code"], "too-large");
}

#[test]
fn resume_tokens_are_single_use() {
    let mut s = svc();
    let t0 = Instant::now();
    let (a, t1) = welcome(&s.connect(ws_id(1), "local".into(), None, t0), ws_id(1));
    s.disconnect(ws_id(1), t0);
    let o = s.connect(
        ws_id(2),
        "local".into(),
        Some(&t1),
        t0 + Duration::from_secs(1),
    );
    let (id, t2) = welcome(&o, ws_id(2));
    assert_eq!(id, a);
    assert_ne!(t2, t1, "a resume hands out a new token");
    // The used token is dead: a fresh peer, and the holder is not disturbed.
    let o = s.connect(
        ws_id(3),
        "local".into(),
        Some(&t1),
        t0 + Duration::from_secs(2),
    );
    let w = of_type(&to(&o, ws_id(3)), "welcome")[0].clone();
    assert_ne!(w["id"], a.as_str());
    assert_eq!(w["resumed"], false);
    assert!(!o
        .iter()
        .any(|x| matches!(x, Out::Close { conn: WsId(2), .. })));
    // The new token works once, even while attached (it replaces the socket).
    let o = s.connect(
        ws_id(4),
        "local".into(),
        Some(&t2),
        t0 + Duration::from_secs(3),
    );
    let (id, t3) = welcome(&o, ws_id(4));
    assert_eq!(id, a);
    assert!(closed_with(&o, ws_id(2), 4000));
    assert_ne!(t3, t2);
    let o = s.connect(
        ws_id(5),
        "local".into(),
        Some(&t2),
        t0 + Duration::from_secs(4),
    );
    assert_ne!(welcome(&o, ws_id(5)).0, a);
}

/// Refusals the driver reports (a binary frame; a relay session the relay could not
/// register, as at `relay_ws.max_sessions`) reach the sender and are counted by reason.
#[test]
fn binary_frames_and_unregistered_relays_are_refused_and_counted() {
    let mut s = svc();
    let t0 = Instant::now();
    s.connect(ws_id(1), "local".into(), None, t0);
    let o = s.binary(ws_id(1), t0);
    assert_eq!(to(&o, ws_id(1))[0]["code"], "binary-not-supported");
    let o = vec![s.relay_refused(ws_id(1), "peer-b", "the relay is full".into())];
    let m = to(&o, ws_id(1));
    assert_eq!(m[0]["code"], "relay-unavailable");
    assert_eq!(m[0]["to"], "peer-b");
    let invalid = REFUSAL_REASONS
        .iter()
        .position(|r| *r == "invalid")
        .unwrap();
    let relay = REFUSAL_REASONS
        .iter()
        .position(|r| *r == "relay_unavailable")
        .unwrap();
    assert_eq!(s.stats().refused[invalid], 1);
    assert_eq!(s.stats().refused[relay], 1);
}
