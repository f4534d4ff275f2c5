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

fn peer_path(id: &str, token: &str) -> String {
    format!("/peerjs/peerjs?key=peerjs&id={id}&token={token}&version=1.5.5")
}

async fn open_peer(addr: std::net::SocketAddr, id: &str) -> signal_common::Ws {
    let mut s = ws(addr, &peer_path(id, &format!("tok-{id}"))).await;
    assert_eq!(next_json(&mut s).await["type"], "OPEN");
    s
}

/// Reads until a Close frame: (its code, its reason).
async fn close_frame(s: &mut signal_common::Ws) -> Option<(u16, String)> {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match signal_common::next_msg(s).await {
            Some(Message::Close(f)) => return f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some(_) => continue,
            None => return None,
        }
    }
}

#[tokio::test]
async fn offers_of_64_kib_and_1_mib_and_150_candidates_pass_at_defaults() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let mut a = open_peer(addr, "alice").await;
    let mut b = open_peer(addr, "bob").await;
    for size in [64 * 1024, 1 << 20] {
        let sdp = "a".repeat(size);
        send_text(
            &mut a,
            &format!(
                r#"{{"type":"OFFER","dst":"bob","payload":{{"sdp":{{"type":"offer","sdp":"{sdp}"}},"type":"data","connectionId":"dc_1"}}}}"#
            ),
        )
        .await;
        let m = next_json(&mut b).await;
        assert_eq!(m["type"], "OFFER");
        assert_eq!(m["src"], "alice");
        assert_eq!(
            m["payload"]["sdp"]["sdp"].as_str().unwrap(),
            sdp,
            "{size} bytes intact"
        );
    }
    for i in 0..150 {
        send_text(
            &mut a,
            &format!(
                r#"{{"type":"CANDIDATE","dst":"bob","payload":{{"candidate":{{"candidate":"candidate:{i} 1 udp 1 127.0.0.1 {i} typ host"}},"type":"data","connectionId":"dc_1"}}}}"#
            ),
        )
        .await;
    }
    for i in 0..150 {
        let m = next_json(&mut b).await;
        assert_eq!(m["type"], "CANDIDATE", "candidate {i}");
    }
    send_text(&mut a, r#"{"type":"ANSWER","dst":"bob","payload":{}}"#).await;
    assert_eq!(
        next_json(&mut b).await["type"],
        "ANSWER",
        "alice still connected"
    );
    let st = svc.stats();
    assert_eq!(st.peerjs.refused, [0; 8]);
    assert_eq!(st.peerjs.forwarded, 153);
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_only_its_sender_with_1009() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let mut a = open_peer(addr, "alice").await;
    let mut b = open_peer(addr, "bob").await;
    let mut c = open_peer(addr, "carol").await;
    // Over signal.peerjs_max_message_bytes (2 MiB): closed with 1009 and a reason.
    let big = format!(
        r#"{{"type":"OFFER","dst":"bob","payload":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    send_text(&mut a, &big).await;
    let (code, reason) = close_frame(&mut a).await.unwrap();
    assert_eq!(code, 1009);
    assert!(reason.contains("peerjs_max_message_bytes"), "{reason}");
    // (Far over it, past four times the limit, the codec refuses the frame before
    // buffering it, also with 1009: signal_ws.rs checks that path with a small limit.)
    // Everyone else is served.
    send_text(
        &mut c,
        r#"{"type":"OFFER","dst":"bob","payload":{"sdp":"ok"}}"#,
    )
    .await;
    let m = next_json(&mut b).await;
    assert_eq!(m["src"], "carol");
    assert_eq!(svc.stats().peerjs.refused[1], 1);
}

#[tokio::test]
async fn a_sender_past_its_rate_is_closed_with_a_reason_not_left_waiting() {
    let svc = start("", "[signal]\npeerjs_rate_per_sec = 5\npeerjs_burst = 20\n");
    let addr = svc.local_addr();
    let mut a = open_peer(addr, "alice").await;
    let mut b = open_peer(addr, "bob").await;
    for i in 0..40 {
        let m = format!(r#"{{"type":"CANDIDATE","dst":"bob","payload":{{"n":{i}}}}}"#);
        if futures_util::SinkExt::send(
            &mut a,
            tokio_tungstenite::tungstenite::Message::Text(m.into()),
        )
        .await
        .is_err()
        {
            break;
        }
    }
    let (code, reason) = close_frame(&mut a).await.unwrap();
    assert_eq!(code, 1008);
    assert!(reason.contains("signal.peerjs_rate_per_sec"), "{reason}");
    // What was accepted arrived, in order; the rest was refused with the close, none
    // vanished while the sender stayed connected.
    let st = svc.stats();
    let mut got = 0;
    while got < st.peerjs.forwarded {
        let m = next_json(&mut b).await;
        assert_eq!(m["payload"]["n"], got);
        got += 1;
    }
    assert!((20..40).contains(&got), "{got}");
    assert_eq!(st.peerjs.refused[0], 1);
    // The client may reconnect with its id and token.
    let mut again = ws(addr, &peer_path("alice", "tok-alice")).await;
    assert_eq!(next_json(&mut again).await["type"], "OPEN");
}

#[test]
fn messages_to_unknown_ids_are_refused_past_the_byte_budget_and_rss_stays_bounded() {
    use crate::common::{scrape, Tern, TernOpts};
    // A daemon of its own, so its RSS is not shared with other tests.
    let tern = Tern::start(TernOpts {
        api: Some(String::new()),
        metrics: true,
        relay_ports: 10,
        ..TernOpts::new(29800)
    });
    let addr = tern.api_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let payload = "q".repeat(60_000);
    let round = |round: usize| {
        let payload = payload.clone();
        rt.block_on(async move {
            // 20 connections x 200 messages of 60 KB, each to an id nobody holds.
            let mut tasks = Vec::new();
            for c in 0..20 {
                let payload = payload.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = open_peer(addr, &format!("sender{round}x{c}")).await;
                    for i in 0..200 {
                        let m = format!(
                            r#"{{"type":"OFFER","dst":"ghost{round}x{c}x{i}","payload":"{payload}"}}"#
                        );
                        send_text(&mut s, &m).await;
                    }
                    // Every refused message is answered with EXPIRE at once.
                    let mut expired = 0;
                    while let Ok(m) = tokio::time::timeout(
                        std::time::Duration::from_millis(1500),
                        next_json(&mut s),
                    )
                    .await
                    {
                        assert_eq!(m["type"], "EXPIRE");
                        expired += 1;
                    }
                    (s, expired)
                }));
            }
            let mut socks = Vec::new();
            let mut expired = 0;
            for t in tasks {
                let (s, e) = t.await.unwrap();
                socks.push(s);
                expired += e;
            }
            (socks, expired)
        })
    };
    let rss0 = tern.rss_kib();
    let (socks, expired) = round(0);
    let rss1 = tern.rss_kib();
    let m = scrape::get(tern.metrics_port, "/metrics").1;
    let queued = scrape::value(&m, "tern_peerjs_queued_bytes", &[]);
    let refused_sender = scrape::value(
        &m,
        "tern_signal_refused_total",
        &[("protocol", "peerjs"), ("reason", "queue_sender_bytes")],
    );
    let refused_total = scrape::value(
        &m,
        "tern_signal_refused_total",
        &[("protocol", "peerjs"), ("reason", "queue_total_bytes")],
    );
    eprintln!(
        "queued {queued} B, refused {refused_sender} (sender) + {refused_total} (total), \
         {expired} EXPIRE at once, RSS {rss0} -> {rss1} KiB"
    );
    assert!(queued <= f64::from(64 << 20), "{queued}");
    assert!(refused_sender + refused_total >= 2000.0);
    // Each refused message got its EXPIRE at once (queued ones may expire meanwhile too).
    assert!(expired as f64 >= refused_sender + refused_total);
    // 240 MB offered; at most 64 MiB held.
    assert!(rss1 < rss0 + 120 * 1024, "RSS grew {} KiB", rss1 - rss0);
    // The queues expire after 5 s: the bytes are given back and a second round does not
    // grow the daemon further.
    drop(socks);
    let m = scrape::scrape_until(tern.metrics_port, "queues drained", |m| {
        scrape::value(m, "tern_peerjs_queued_bytes", &[]) == 0.0
    });
    assert_eq!(scrape::value(&m, "tern_peerjs_queued_bytes", &[]), 0.0);
    let (_socks, _) = round(1);
    let rss2 = tern.rss_kib();
    eprintln!("second round: RSS {rss2} KiB");
    assert!(rss2 < rss0 + 140 * 1024, "RSS grew {} KiB", rss2 - rss0);
}

/// A reader that falls behind is closed with 1008 once what is queued for it passes the
/// byte budget (`signal.send_queue_bytes`), and counted; its sender keeps being served.
#[tokio::test]
async fn slow_reader_over_the_byte_budget_is_closed_and_counted() {
    let svc = start(
        "",
        "[signal]\npeerjs_rate_per_sec = 100000\npeerjs_burst = 100000\nsend_queue_bytes = 262144\n",
    );
    let addr = svc.local_addr();
    let mut slow = open_peer(addr, "slow").await;
    let mut fast = open_peer(addr, "fast").await;
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
