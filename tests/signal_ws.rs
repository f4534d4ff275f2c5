//! Native signaling on `/ws` and the PeerJS protocol over real WebSockets.

use crate::signal_common;

use signal_common::{close_code, get, next_json, send_text, start, ws};

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
    let mut b = ws(addr, "/ws").await;
    next_json(&mut b).await;
    next_json(&mut b).await;
    next_json(&mut a).await; // peer-joined
    drop(a);
    assert_eq!(next_json(&mut b).await["type"], "peer-left");
    let mut a2 = ws(addr, &format!("/ws?resume={token}")).await;
    let w = next_json(&mut a2).await;
    assert_eq!(w["id"], a_id.as_str());
    assert_eq!(w["resumed"], true);
    let j = next_json(&mut b).await;
    assert_eq!(j["type"], "peer-joined");
    assert_eq!(j["peer"]["id"], a_id.as_str());
}

#[tokio::test]
async fn bad_input_gets_errors_and_others_keep_being_served() {
    let svc = start("", "[signal]\nrate_per_sec = 20\nburst = 20\n");
    let addr = svc.local_addr();
    let mut good = ws(addr, "/ws").await;
    next_json(&mut good).await;
    next_json(&mut good).await;
    let mut bad = ws(addr, "/ws").await;
    next_json(&mut bad).await;
    next_json(&mut bad).await;
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
    let mut flood = ws(addr, "/ws").await;
    next_json(&mut flood).await;
    next_json(&mut flood).await;
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
    send_text(&mut good, r#"{"type":"ping"}"#).await;
    loop {
        let m = next_json(&mut good).await;
        match m["type"].as_str().unwrap() {
            "peer-joined" | "peer-left" => continue,
            "pong" => break,
            other => panic!("unexpected {other}"),
        }
    }
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
