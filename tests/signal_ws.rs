//! Native signaling on `/ws` and the PeerJS protocol over real WebSockets.

use crate::signal_common;

use signal_common::{close_code, get, native, next_json, ping_pong, send_text, start, ws};

#[tokio::test]
async fn two_clients_signal_through_their_lan_room() {
    let svc = start("", "");
    let a_addr = svc.local_addr();
    let mut a = ws(a_addr, "/ws").await;
    let wa = next_json(&mut a).await;
    assert_eq!(wa["type"], "welcome");
    assert_eq!(wa["rooms"][0], "lan");
    let a_id = wa["id"].as_str().unwrap().to_string();
    assert_eq!(next_json(&mut a).await["type"], "room");
    let mut b = ws(a_addr, "/ws").await;
    let wb = next_json(&mut b).await;
    let b_id = wb["id"].as_str().unwrap().to_string();
    let room = next_json(&mut b).await;
    // Loopback clients share the local room.
    assert_eq!(room["peers"][0]["id"], a_id.as_str());
    let joined = next_json(&mut a).await;
    assert_eq!(joined["type"], "peer-joined");
    assert_eq!(joined["peer"]["id"], b_id.as_str());
    // An SDP offer from A reaches B with `from` set by the server.
    send_text(
        &mut a,
        &format!(r#"{{"type":"signal","to":"{b_id}","data":{{"sdp":"v=0 offer"}}}}"#),
    )
    .await;
    let m = next_json(&mut b).await;
    assert_eq!(m["type"], "signal");
    assert_eq!(m["from"], a_id.as_str());
    assert_eq!(m["data"]["sdp"], "v=0 offer");
    // A client cannot set `from` itself.
    send_text(
        &mut b,
        &format!(r#"{{"type":"signal","to":"{a_id}","from":"{a_id}","data":1}}"#),
    )
    .await;
    assert_eq!(next_json(&mut b).await["code"], "bad-message");
    // B leaves: A is told.
    drop(b);
    let left = next_json(&mut a).await;
    assert_eq!(left["type"], "peer-left");
    assert_eq!(left["id"], b_id.as_str());
}

#[tokio::test]
async fn resume_token_keeps_the_peer_id() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let mut a = ws(addr, "/ws").await;
    let wa = next_json(&mut a).await;
    let (a_id, token) = (
        wa["id"].as_str().unwrap().to_string(),
        wa["resume"].as_str().unwrap().to_string(),
    );
    next_json(&mut a).await;
    let (mut b, _) = native(addr).await;
    next_json(&mut a).await; // peer-joined
    drop(a);
    assert_eq!(next_json(&mut b).await["type"], "peer-left");
    let mut a2 = ws(addr, &format!("/ws?resume={token}")).await;
    let w = next_json(&mut a2).await;
    assert_eq!(w["id"], a_id.as_str());
    assert_eq!(w["resumed"], true);
    assert_ne!(
        w["resume"],
        token.as_str(),
        "a resume hands out a new token"
    );
    let j = next_json(&mut b).await;
    assert_eq!(j["type"], "peer-joined");
    assert_eq!(j["peer"]["id"], a_id.as_str());
}

/// A `/ws` client offering `protocols` in Sec-WebSocket-Protocol; returns the socket and
/// the protocol the server selected.
async fn ws_with_protocols(
    addr: std::net::SocketAddr,
    protocols: &str,
) -> (signal_common::Ws, Option<String>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (s, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_string());
    (s, chosen)
}

#[tokio::test]
async fn a_used_resume_token_fails_the_second_time() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let (a, w) = native(addr).await;
    let (a_id, t1) = (
        w["id"].as_str().unwrap().to_string(),
        w["resume"].as_str().unwrap().to_string(),
    );
    drop(a);
    // Resume outside the URL: the subprotocol `resume.TOKEN`, beside `tern` (the one the
    // server selects, so the token is never echoed).
    let (mut a2, chosen) = ws_with_protocols(addr, &format!("tern, resume.{t1}")).await;
    assert_eq!(chosen.as_deref(), Some("tern"));
    let w = next_json(&mut a2).await;
    assert_eq!(w["id"], a_id.as_str());
    assert_eq!(w["resumed"], true);
    let t2 = w["resume"].as_str().unwrap().to_string();
    assert_ne!(t2, t1);
    // The used token, in either form, no longer takes the id (nor closes its holder).
    for path in [format!("/ws?resume={t1}")] {
        let mut thief = ws(addr, &path).await;
        let w = next_json(&mut thief).await;
        assert_eq!(w["resumed"], false);
        assert_ne!(w["id"], a_id.as_str());
    }
    let (mut thief, _) = ws_with_protocols(addr, &format!("tern, resume.{t1}")).await;
    let w = next_json(&mut thief).await;
    assert_eq!(w["resumed"], false);
    assert_ne!(w["id"], a_id.as_str());
    // The holder is still connected and served.
    ping_pong(&mut a2).await;
    // The fresh token works once.
    drop(a2);
    let (mut a3, _) = ws_with_protocols(addr, &format!("tern, resume.{t2}")).await;
    let w = next_json(&mut a3).await;
    assert_eq!(w["id"], a_id.as_str());
    assert_eq!(w["resumed"], true);
}

/// Reads frames for `secs` seconds: (JSON messages, close code if the server closed).
async fn read_for(ws: &mut signal_common::Ws, secs: f64) -> (Vec<serde_json::Value>, Option<u16>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut msgs = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return (msgs, None),
            Ok(Some(Ok(Message::Text(t)))) => msgs.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => return (msgs, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (msgs, None),
        }
    }
}

#[tokio::test]
async fn a_sender_over_its_rate_learns_the_count_refused() {
    let svc = start("", "[signal]\nrate_per_sec = 2\nburst = 10\n");
    let addr = svc.local_addr();
    let (mut a, _) = native(addr).await;
    for _ in 0..30 {
        send_text(&mut a, r#"{"type":"ping"}"#).await;
    }
    let (msgs, closed) = read_for(&mut a, 3.5).await;
    assert_eq!(closed, None, "{msgs:?}");
    let errors: Vec<&serde_json::Value> = msgs.iter().filter(|m| m["type"] == "error").collect();
    let pongs = msgs.iter().filter(|m| m["type"] == "pong").count();
    // The first error names the limit and counts the message that started it; a later one
    // (at most one a second) carries the rest.
    assert_eq!(errors[0]["code"], "rate-limited");
    assert_eq!(errors[0]["refused"], 1);
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .contains("signal.rate_per_sec"));
    assert!(errors.len() >= 2 && errors.len() <= 4, "{errors:?}");
    let refused: u64 = errors.iter().map(|e| e["refused"].as_u64().unwrap()).sum();
    assert_eq!(
        pongs as u64 + refused,
        30,
        "every message answered or counted: {msgs:?}"
    );
    let st = svc.stats();
    assert_eq!(st.signal.rate_limited, refused);
    assert_eq!(st.signal.refused[0], refused);
}

#[tokio::test]
async fn a_sustained_flooder_is_closed_with_1008_after_one_error() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let svc = start("", "");
    let addr = svc.local_addr();
    let (mut good, _) = native(addr).await;
    let (flood, _) = native(addr).await;
    let (mut tx, mut rx) = flood.split();
    // 5000 messages a second for at most 8 s, stopping when the server closes.
    let sender = tokio::spawn(async move {
        let mut iv = tokio::time::interval(std::time::Duration::from_millis(10));
        for _ in 0..800 {
            iv.tick().await;
            for _ in 0..50 {
                if tx
                    .send(Message::Text(r#"{"type":"ping"}"#.into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut errors = 0;
    let mut code = None;
    while let Ok(Some(m)) =
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.next()).await
    {
        match m {
            Ok(Message::Text(t)) if t.as_str().contains("rate-limited") => errors += 1,
            Ok(Message::Close(f)) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    sender.abort();
    assert_eq!(code, Some(1008));
    // One error when refusing started (a count at most once a second after it, should a
    // loaded machine make the flood slow): not one per refused batch.
    assert!(
        (1..=3).contains(&errors),
        "{errors} errors before the close"
    );
    assert_eq!(svc.stats().signal.flood_closed, 1);
    // The other client is still served.
    ping_pong(&mut good).await;
}

#[tokio::test]
async fn a_1_mib_signal_and_150_candidates_pass_at_defaults() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let (mut a, _) = native(addr).await;
    let (mut b, wb) = native(addr).await;
    let b_id = wb["id"].as_str().unwrap().to_string();
    assert_eq!(next_json(&mut a).await["type"], "peer-joined");
    let sdp = "o".repeat(1 << 20);
    send_text(
        &mut a,
        &format!(r#"{{"type":"signal","to":"{b_id}","data":{{"sdp":"{sdp}"}}}}"#),
    )
    .await;
    let m = next_json(&mut b).await;
    assert_eq!(m["data"]["sdp"].as_str().unwrap(), sdp);
    // A renegotiation, then 150 trickled candidates at once.
    for i in 0..151 {
        let data = if i == 0 {
            r#"{"sdp":"v=0 renegotiation"}"#.to_string()
        } else {
            format!(r#"{{"candidate":"candidate:{i} 1 udp 1 127.0.0.1 {i} typ host"}}"#)
        };
        send_text(
            &mut a,
            &format!(r#"{{"type":"signal","to":"{b_id}","data":{data}}}"#),
        )
        .await;
    }
    for i in 0..151 {
        let m = next_json(&mut b).await;
        assert_eq!(m["type"], "signal", "message {i}: {m}");
    }
    send_text(&mut a, r#"{"type":"ping"}"#).await;
    assert_eq!(
        next_json(&mut a).await["type"],
        "pong",
        "no error came before"
    );
    assert_eq!(svc.stats().signal.rate_limited, 0);
}

#[tokio::test]
async fn bad_input_gets_errors_and_others_keep_being_served() {
    let svc = start(
        "",
        "[signal]\nrate_per_sec = 20\nburst = 20\nmax_message_bytes = 65536\n",
    );
    let addr = svc.local_addr();
    let (mut good, _) = native(addr).await;
    let (mut bad, _) = native(addr).await;
    next_json(&mut good).await; // peer-joined
    send_text(&mut bad, "{this is not json").await;
    assert_eq!(next_json(&mut bad).await["code"], "bad-json");
    send_text(&mut bad, r#"{"type":"teleport"}"#).await;
    assert_eq!(next_json(&mut bad).await["code"], "unknown-type");
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100_000));
    send_text(&mut bad, &big).await;
    assert_eq!(next_json(&mut bad).await["code"], "too-large");
    // Far past the limit: the socket is closed with 1009 before the server buffers it.
    let huge = "y".repeat(600_000);
    send_text(&mut bad, &huge).await;
    assert_eq!(close_code(&mut bad).await, Some(1009));
    // A flooding connection is warned, then closed with 1008.
    let (mut flood, _) = native(addr).await;
    let mut saw_limit = false;
    for _ in 0..200 {
        use futures_util::SinkExt;
        if flood
            .send(tokio_tungstenite::tungstenite::Message::Text(
                r#"{"type":"ping"}"#.into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let code = loop {
        match signal_common::next_msg(&mut flood).await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                if t.as_str().contains("rate-limited") {
                    saw_limit = true;
                }
            }
            Some(tokio_tungstenite::tungstenite::Message::Close(f)) => {
                break f.map(|f| u16::from(f.code))
            }
            Some(_) => {}
            None => break None,
        }
    };
    assert!(saw_limit);
    assert_eq!(code, Some(1008));
    // The well-behaved client is still served.
    ping_pong(&mut good).await;
    // Counted for the metrics face.
    let st = svc.stats();
    assert!(st.signal.bad_messages >= 3, "{st:?}");
    assert!(st.signal.rate_limited >= 1, "{st:?}");
    let _ = get;
}

/// A `/ws` client claiming `xff` in X-Forwarded-For.
async fn ws_via_proxy(addr: std::net::SocketAddr, xff: &str) -> signal_common::Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", xff.parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

#[tokio::test]
async fn lan_rooms_follow_forwarded_addresses_only_from_trusted_proxies() {
    // 127.0.0.0/8 is the trusted proxy: the forwarded address decides the LAN room.
    let svc = start("trusted_proxies = [\"127.0.0.0/8\"]\n", "");
    let addr = svc.local_addr();
    let mut a = ws_via_proxy(addr, "203.0.113.10").await;
    next_json(&mut a).await;
    assert_eq!(next_json(&mut a).await["peers"], serde_json::json!([]));
    // Another public address: another LAN room.
    let mut b = ws_via_proxy(addr, "198.51.100.20").await;
    next_json(&mut b).await;
    assert_eq!(next_json(&mut b).await["peers"], serde_json::json!([]));
    // Same public address as A (a spoofed left-most hop is ignored): A's room.
    let mut c = ws_via_proxy(addr, "192.0.2.99, 203.0.113.10").await;
    let c_id = next_json(&mut c).await["id"].as_str().unwrap().to_string();
    assert_eq!(
        next_json(&mut c).await["peers"].as_array().unwrap().len(),
        1
    );
    assert_eq!(next_json(&mut a).await["peer"]["id"], c_id.as_str());
    // IPv6 clients in one /64 share a room.
    let mut d = ws_via_proxy(addr, "2001:db8:5:6::1").await;
    next_json(&mut d).await;
    next_json(&mut d).await;
    let mut e = ws_via_proxy(addr, "2001:db8:5:6:ffff::2").await;
    next_json(&mut e).await;
    assert_eq!(
        next_json(&mut e).await["peers"].as_array().unwrap().len(),
        1
    );
    drop(svc);

    // Without trusted proxies the header is ignored: every loopback client is "local".
    let svc = start("", "");
    let addr = svc.local_addr();
    let mut a = ws_via_proxy(addr, "203.0.113.10").await;
    next_json(&mut a).await;
    next_json(&mut a).await;
    let mut b = ws_via_proxy(addr, "198.51.100.20").await;
    next_json(&mut b).await;
    assert_eq!(
        next_json(&mut b).await["peers"].as_array().unwrap().len(),
        1
    );
}
