//! `/relay`: tickets from signaling, 50 MiB in order with a SHA-256 check, bounded memory
//! when a receiver stops reading, 1009 past the frame limit.

use crate::common;
use crate::signal_common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use signal_common::{close_code, next_json, send_text, start, ws, Ws};
use tokio_tungstenite::tungstenite::Message;

/// Two signaling peers; A asks for a relay to B; returns both tickets.
async fn tickets(addr: std::net::SocketAddr) -> (Ws, Ws, String, String) {
    let mut a = ws(addr, "/ws").await;
    next_json(&mut a).await;
    next_json(&mut a).await;
    let mut b = ws(addr, "/ws").await;
    let b_id = next_json(&mut b).await["id"].as_str().unwrap().to_string();
    next_json(&mut b).await;
    next_json(&mut a).await; // peer-joined
    send_text(&mut a, &format!(r#"{{"type":"relay","to":"{b_id}"}}"#)).await;
    let ta = next_json(&mut a).await;
    let tb = next_json(&mut b).await;
    assert_eq!(ta["type"], "relay-ticket");
    assert_eq!(tb["type"], "relay-ticket");
    assert_eq!(ta["peer"], b_id.as_str());
    (
        a,
        b,
        ta["ticket"].as_str().unwrap().to_string(),
        tb["ticket"].as_str().unwrap().to_string(),
    )
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    // Deterministic, non-repeating content so reordering or loss changes the digest.
    let mut v = Vec::with_capacity(len);
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_through_the_relay_with_sha256() {
    // Through the real daemon.
    let tern = tokio::task::spawn_blocking(|| {
        common::Tern::start(common::TernOpts {
            api: Some(String::new()),
            ..common::TernOpts::new(31600)
        })
    })
    .await
    .unwrap();
    let addr = tern.api_addr();
    let (_sa, _sb, ta, tb) = tickets(addr).await;
    let mut ra = ws(addr, &format!("/relay?ticket={ta}")).await;
    let mut rb = ws(addr, &format!("/relay?ticket={tb}")).await;
    const TOTAL: usize = 50 << 20;
    const FRAME: usize = 64 << 10;
    let sender = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut sent = 0usize;
        let mut i = 0;
        while sent < TOTAL {
            let chunk = pattern(i, FRAME.min(TOTAL - sent));
            h.update(&chunk);
            sent += chunk.len();
            ra.send(Message::Binary(chunk.into())).await.unwrap();
            i += 1;
        }
        // A leaves: B must get everything, then a clean close.
        ra.close(None).await.unwrap();
        h.finalize()
    });
    let mut h = Sha256::new();
    let mut got = 0usize;
    let code = loop {
        let m = tokio::time::timeout(Duration::from_secs(60), rb.next())
            .await
            .expect("relay stalled")
            .expect("stream open")
            .expect("frame");
        match m {
            Message::Binary(b) => {
                got += b.len();
                h.update(&b);
            }
            Message::Close(f) => break f.map(|f| u16::from(f.code)),
            _ => {}
        }
    };
    let sent_digest = sender.await.unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(h.finalize(), sent_digest);
    assert_eq!(code, Some(1000));
    let mut tern = tern;
    assert!(tern.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_for_those_two_only_and_single_use() {
    let svc = start("", "");
    let addr = svc.local_addr();
    let (_sa, _sb, ta, _tb) = tickets(addr).await;
    let _ra = ws(addr, &format!("/relay?ticket={ta}")).await;
    // Used ticket and made-up ticket: refused before the upgrade.
    let r = tokio::task::spawn_blocking(move || {
        let h = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade, close"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        (
            signal_common::get(addr, &format!("/relay?ticket={ta}"), &h),
            signal_common::get(addr, "/relay?ticket=guess", &h),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.0.status, 403);
    assert_eq!(r.1.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_with_1009_and_peer_is_told() {
    let svc = start("", "[relay_ws]\nmax_frame_bytes = 65536\n");
    let addr = svc.local_addr();
    let (_sa, _sb, ta, tb) = tickets(addr).await;
    let mut ra = ws(addr, &format!("/relay?ticket={ta}")).await;
    let mut rb = ws(addr, &format!("/relay?ticket={tb}")).await;
    ra.send(Message::Binary(vec![7u8; 1000].into()))
        .await
        .unwrap();
    match signal_common::next_msg(&mut rb).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 1000),
        other => panic!("{other:?}"),
    }
    ra.send(Message::Binary(vec![0u8; 70_000].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ra).await, Some(1009));
    // The session ends cleanly for the other side too.
    assert_eq!(close_code(&mut rb).await, Some(1000));
}
