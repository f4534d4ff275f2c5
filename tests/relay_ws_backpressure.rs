//! A receiver that stops reading must stall its sender, not grow server memory: measured
//! on the real `tern serve` process (/proc/PID/status VmRSS).

use crate::common;
use crate::signal_common;

use std::time::Duration;

use common::{Tern, TernOpts};
use futures_util::{SinkExt, StreamExt};
use signal_common::{next_json, send_text, ws};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_stalls_sender_and_memory_stays_bounded() {
    let tern = tokio::task::spawn_blocking(|| {
        Tern::start(TernOpts {
            api: Some(String::new()),
            extra_sections: "[relay_ws]\nmax_frame_bytes = 65536\nbuffer_bytes = 1048576\n".into(),
            ..TernOpts::new(31200)
        })
    })
    .await
    .unwrap();
    let addr = tern.api_addr();
    let mut a = ws(addr, "/ws").await;
    next_json(&mut a).await;
    next_json(&mut a).await;
    let mut b = ws(addr, "/ws").await;
    let b_id = next_json(&mut b).await["id"].as_str().unwrap().to_string();
    next_json(&mut b).await;
    next_json(&mut a).await;
    send_text(&mut a, &format!(r#"{{"type":"relay","to":"{b_id}"}}"#)).await;
    let ta = next_json(&mut a).await["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let tb = next_json(&mut b).await["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ra = ws(addr, &format!("/relay?ticket={ta}")).await;
    let mut rb = ws(addr, &format!("/relay?ticket={tb}")).await;

    let before = tern.rss_kib();
    const FRAME: usize = 64 << 10;
    const CAP: usize = 512 << 20; // bounded: stop after 512 MiB even if nothing stalls
    let frame = vec![0xabu8; FRAME];
    let mut sent = 0usize;
    while sent < CAP {
        // B reads nothing. A stalls once every buffer on the path is full.
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            ra.send(Message::Binary(frame.clone().into())),
        )
        .await;
        match r {
            Ok(Ok(())) => sent += FRAME,
            Ok(Err(e)) => panic!("send failed: {e}"),
            Err(_) => break,
        }
    }
    let after = tern.rss_kib();
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "stalled after {:.1} MiB sent; RSS {before} KiB -> {after} KiB (+{growth_mib:.1} MiB)",
        sent as f64 / 1048576.0
    );
    // Backpressure: the sender stalled long before the cap (relay buffer 1 MiB plus
    // kernel socket buffers on both hops).
    assert!(sent < 64 << 20, "sender was never slowed: {sent} bytes");
    // Memory: the relay holds at most buffer_bytes (1 MiB) per direction plus a frame or
    // two in the WebSocket codecs; allocator slack included, far below what was sent.
    assert!(growth_mib < 16.0, "server RSS grew {growth_mib:.1} MiB");

    // B starts reading: everything A sent arrives, nothing was dropped.
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), rb.next())
                .await
                .expect("relay stalled after the reader resumed");
            match m {
                Some(Ok(Message::Binary(b))) => got += b.len(),
                Some(Ok(Message::Close(_))) | None => return got,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e}"),
            }
        }
    });
    // The pending send completes once B drains; then A leaves.
    ra.send(Message::Binary(frame.clone().into()))
        .await
        .unwrap();
    sent += FRAME;
    ra.close(None).await.unwrap();
    let got = reader.await.unwrap();
    // The send that timed out may already have been queued in the client's buffer.
    assert!(
        got == sent || got == sent + FRAME,
        "sent {sent}, received {got}"
    );
}
