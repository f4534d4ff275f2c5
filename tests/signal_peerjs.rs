//! The PeerJS protocol over real sockets, as the `peer` npm server speaks it.

use crate::signal_common;

use signal_common::{close_code, get, next_json, send_text, start, ws};

#[tokio::test]
async fn peerjs_http_routes() {
    let svc = start("", "");
    let a = svc.local_addr();
    let info = tokio::task::spawn_blocking(move || {
        (
            get(a, "/peerjs", &[("Origin", "https://peer.app")]),
            get(a, "/peerjs/peerjs/id", &[]),
            get(a, "/peerjs/peerjs/peers", &[]),
        )
    })
    .await
    .unwrap();
    assert_eq!(info.0.status, 200);
    assert_eq!(info.0.json()["name"], "PeerJS Server");
    assert_eq!(
        info.0.header("access-control-allow-origin"),
        Some("https://peer.app")
    );
    assert_eq!(info.1.status, 200);
    assert_eq!(info.1.body.len(), 36, "uuid: {}", info.1.body);
    assert!(info
        .1
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(info.2.status, 401, "discovery is off by default");
}

#[tokio::test]
async fn open_forward_id_taken_and_expire() {
    let svc = start("", "[signal]\npeerjs_allow_discovery = true\n");
    let addr = svc.local_addr();
    let path = |id: &str, token: &str| {
        format!("/peerjs/peerjs?key=peerjs&id={id}&token={token}&version=1.5.5")
    };
    let mut a = ws(addr, &path("alice", "ta")).await;
    assert_eq!(next_json(&mut a).await, serde_json::json!({"type":"OPEN"}));
    let mut b = ws(addr, &path("bob", "tb")).await;
    assert_eq!(next_json(&mut b).await["type"], "OPEN");
    let peers = tokio::task::spawn_blocking(move || get(addr, "/peerjs/peerjs/peers", &[]))
        .await
        .unwrap();
    let mut ids: Vec<String> = serde_json::from_str(&peers.body).unwrap();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);
    // Forwarded with src from the server.
    send_text(
        &mut a,
        r#"{"type":"OFFER","src":"bob","dst":"bob","payload":{"sdp":"x","type":"data"}}"#,
    )
    .await;
    let m = next_json(&mut b).await;
    assert_eq!(m["type"], "OFFER");
    assert_eq!(m["src"], "alice");
    assert_eq!(m["payload"]["sdp"], "x");
    // Same id, other token: ID-TAKEN and closed; alice is unaffected.
    let mut thief = ws(addr, &path("alice", "stolen")).await;
    assert_eq!(next_json(&mut thief).await["type"], "ID-TAKEN");
    assert!(close_code(&mut thief).await.is_some());
    // Bad key and missing parameters: ERROR with the peer server's texts.
    let mut badkey = ws(addr, "/peerjs/peerjs?key=nope&id=x&token=y").await;
    let e = next_json(&mut badkey).await;
    assert_eq!(e["payload"]["msg"], "Invalid key provided");
    let mut noid = ws(addr, "/peerjs/peerjs?key=peerjs").await;
    let e = next_json(&mut noid).await;
    assert_eq!(
        e["payload"]["msg"],
        "No id, token, or key supplied to websocket server"
    );
    // Garbage is ignored and the connection keeps working.
    send_text(&mut a, "}{ not json").await;
    send_text(&mut a, r#"{"type":"HEARTBEAT"}"#).await;
    // A message for an absent peer is answered with EXPIRE after expire_timeout (5 s).
    send_text(&mut a, r#"{"type":"OFFER","dst":"carol","payload":{}}"#).await;
    let m = next_json(&mut a).await;
    assert_eq!(
        m,
        serde_json::json!({"type":"EXPIRE","src":"carol","dst":"alice"})
    );
    // Bob still served after all that.
    send_text(
        &mut a,
        r#"{"type":"CANDIDATE","dst":"bob","payload":{"c":1}}"#,
    )
    .await;
    assert_eq!(next_json(&mut b).await["type"], "CANDIDATE");
}

/// A reader that falls behind is closed with 1008 once what is queued for it passes the
/// byte budget (`signal.send_queue_bytes`), and counted; its sender keeps being served.
#[tokio::test]
async fn slow_reader_over_the_byte_budget_is_closed_and_counted() {
    let svc = start(
        "",
        "[signal]\nrate_per_sec = 100000\nburst = 100000\nsend_queue_bytes = 262144\n",
    );
    let addr = svc.local_addr();
    let mut slow = peer_ws(addr, "slow").await;
    assert_eq!(next_json(&mut slow).await["type"], "OPEN");
    let mut fast = peer_ws(addr, "fast").await;
    assert_eq!(next_json(&mut fast).await["type"], "OPEN");
    // `slow` reads nothing: the kernel's socket buffers fill (a few MB on loopback), then
    // its outbox, 60 KB at a time.
    let offer = format!(
        r#"{{"type":"OFFER","dst":"slow","payload":{{"sdp":"{}"}}}}"#,
        "x".repeat(60_000)
    );
    for _ in 0..1000 {
        send_text(&mut fast, &offer).await;
        if svc.stats().peerjs_slow_closed > 0 {
            break;
        }
    }
    assert_eq!(svc.stats().peerjs_slow_closed, 1);
    // After what was already in its socket, the slow reader finds the close and its reason.
    assert_eq!(close_code(&mut slow).await, Some(1008));
    // The sender was not touched.
    send_text(
        &mut fast,
        r#"{"type":"OFFER","dst":"fast","payload":{"n":1}}"#,
    )
    .await;
    loop {
        let m = next_json(&mut fast).await;
        if m["type"] == "OFFER" {
            assert_eq!(m["payload"]["n"], 1);
            break;
        }
    }
}

/// A 1 MiB OFFER passes the PeerJS socket intact; a frame over the socket's limit (2 MiB)
/// closes only its sender, with 1009. (`max_message_bytes` is raised here for the state
/// machine's own per-message check; the socket's limit is the default.)
#[tokio::test]
async fn one_mib_offer_relayed_and_an_oversized_frame_closes_only_its_sender() {
    let svc = start("", "[signal]\nmax_message_bytes = 2097152\n");
    let addr = svc.local_addr();
    let mut a = peer_ws(addr, "big-a").await;
    assert_eq!(next_json(&mut a).await["type"], "OPEN");
    let mut b = peer_ws(addr, "big-b").await;
    assert_eq!(next_json(&mut b).await["type"], "OPEN");
    let sdp: String = (0..1 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let offer = format!(r#"{{"type":"OFFER","dst":"big-b","payload":{{"sdp":"{sdp}"}}}}"#);
    send_text(&mut a, &offer).await;
    let m = next_json(&mut b).await;
    assert_eq!(m["src"], "big-a");
    assert_eq!(m["payload"]["sdp"].as_str(), Some(sdp.as_str()));
    // Past the socket's limit: the sender is closed with 1009 ...
    send_text(&mut a, &"y".repeat((2 << 20) + 1024)).await;
    assert_eq!(close_code(&mut a).await, Some(1009));
    // ... and the receiver is still served.
    let mut c = peer_ws(addr, "big-c").await;
    assert_eq!(next_json(&mut c).await["type"], "OPEN");
    send_text(
        &mut c,
        r#"{"type":"OFFER","dst":"big-b","payload":{"n":2}}"#,
    )
    .await;
    assert_eq!(next_json(&mut b).await["payload"]["n"], 2);
}

/// A raw PeerJS client socket with id `id` (token `t{id}`).
async fn peer_ws(addr: std::net::SocketAddr, id: &str) -> signal_common::Ws {
    ws(
        addr,
        &format!("/peerjs/peerjs?key=peerjs&id={id}&token=t{id}&version=1.5.5"),
    )
    .await
}
