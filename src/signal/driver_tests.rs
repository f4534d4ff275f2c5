//! The driver over an in-memory socket, against a real WebSocket client (tungstenite) and
//! against raw frames: ping/pong, fragments, the close handshake both ways, limits.

use super::*;
use crate::config::SignalConfig;
use futures_util::{SinkExt, StreamExt};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn output_size<A, R>(_: &impl FnOnce(A) -> R) -> usize {
    std::mem::size_of::<R>()
}

/// Every connected peer keeps its task's state for as long as it is connected, idle or
/// not: the whole task (awaiting the upgrade, then `serve` with the socket, decoder and
/// write state) must stay small. Timers and closing futures are boxed when they run.
#[test]
fn idle_task_is_small() {
    type Conn = (
        Arc<Hub<PeerJsService>>,
        hyper::upgrade::OnUpgrade,
        std::collections::HashMap<String, String>,
    );
    let task = |(hub, up, q): Conn| {
        hub.task(up, 1 << 20, move |core, conn, now| {
            core.connect(conn, q.get("key").map(String::as_str), None, None, now)
        })
    };
    let size = output_size(&task);
    assert!(size <= 448, "a connection's task is {size} bytes");
}

const BUDGET: SendBudget = SendBudget {
    frames: 256,
    bytes: 1 << 20,
};

/// An idle connection holds no frame-queue capacity on either side of the take/swap, also
/// after several bursts (each side held a `VecDeque` of ~150 B per idle peer before).
#[test]
fn an_idle_outbox_keeps_no_queue_capacity() {
    let outbox = Outbox::default();
    let budget = SendBudget {
        frames: 64,
        bytes: 1 << 20,
    };
    let waker = std::task::Waker::noop();
    let mut batch = VecDeque::new();
    for _ in 0..3 {
        assert!(outbox.push(Frame::Ping, budget));
        assert!(outbox.push(Frame::Ping, budget));
        outbox.take(&mut batch, waker);
        assert_eq!(batch.len(), 2);
        // As the writer leaves it once everything went out.
        batch.clear();
    }
    outbox.take(&mut batch, waker);
    assert_eq!(batch.capacity(), 0);
    assert_eq!(outbox.lock().frames.capacity(), 0);
    // Still woken by the next push.
    assert!(outbox.lock().waker.is_some());
}

fn rooms() -> Arc<Hub<RoomService>> {
    let svc = RoomService::new(SignalConfig::default(), false, StdRng::seed_from_u64(1));
    Hub::new(svc, BUDGET, None, 60)
}

fn peerjs() -> Arc<Hub<PeerJsService>> {
    let svc = PeerJsService::new(SignalConfig::default(), StdRng::seed_from_u64(1));
    Hub::new(svc, BUDGET, None, 60)
}

use rand::rngs::StdRng;

/// A native connection served over an in-memory pipe: the client's end.
fn serve_native(hub: &Arc<Hub<RoomService>>, limit: usize) -> DuplexStream {
    let (client, server) = tokio::io::duplex(1 << 16);
    let hub = Arc::clone(hub);
    tokio::spawn(async move {
        let (conn, ob) = hub.open(|core, conn, now| core.connect(conn, "lan".into(), None, now));
        hub.serve(conn, ob, server, limit).await;
    });
    client
}

/// A client frame: masked, as browsers send them.
fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    crate::signal::ws::tests::masked(opcode, fin, payload, [9, 8, 7, 6])
}

/// Reads one server frame: (opcode, payload); None at EOF. Checks it is unmasked and final.
async fn read_frame(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    assert_eq!(h[0] & 0xF0, 0x80, "FIN, no RSV");
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    let len = match h[1] {
        126 => usize::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap() as usize,
        n => usize::from(n),
    };
    let mut p = vec![0; len];
    s.read_exact(&mut p).await.unwrap();
    Some((h[0] & 0x0F, p))
}

/// Reads frames until a data frame whose JSON has this `type`.
async fn read_type(s: &mut DuplexStream, t: &str) -> serde_json::Value {
    loop {
        let (op, p) = read_frame(s).await.expect("connection open");
        if op == ws::OP_TEXT {
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            if v["type"] == t {
                return v;
            }
        }
    }
}

async fn expect_close(s: &mut DuplexStream) -> (u16, String) {
    loop {
        let (op, p) = read_frame(s).await.expect("a Close before EOF");
        if op == ws::OP_CLOSE {
            return (
                u16::from_be_bytes([p[0], p[1]]),
                String::from_utf8(p[2..].to_vec()).unwrap(),
            );
        }
    }
}

#[tokio::test]
async fn a_real_client_pings_talks_and_closes() {
    let hub = peerjs();
    let (client, server) = tokio::io::duplex(1 << 16);
    let h = Arc::clone(&hub);
    let served = tokio::spawn(async move {
        let (conn, ob) = h.open(|core, conn, now| {
            core.connect(conn, Some("peerjs"), Some("alice"), Some("t"), now)
        });
        h.serve(conn, ob, server, 1 << 20).await;
    });
    let mut c = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let open = c.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().contains("OPEN"), "{open:?}");
    c.send(Message::Ping(b"hello".to_vec().into()))
        .await
        .unwrap();
    match c.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"hello"),
        other => panic!("{other:?}"),
    }
    // A 300 KiB message to itself arrives intact (written in several `writev`s).
    let big = "z".repeat(300 << 10);
    let msg = format!(r#"{{"type":"OFFER","dst":"alice","payload":"{big}"}}"#);
    c.send(Message::Text(msg.into())).await.unwrap();
    let got = c.next().await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(got.to_text().unwrap()).unwrap();
    assert_eq!(v["payload"].as_str().unwrap().len(), big.len());
    assert_eq!(hub.with_core(|c| c.ids()), vec!["alice".to_string()]);
    // The client closes: the server answers with the same code, then ends the connection.
    c.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match c.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("{other:?}"),
    }
    assert!(c.next().await.is_none(), "then EOF");
    served.await.unwrap();
    assert!(
        hub.with_core(|c| c.ids()).is_empty(),
        "the machine was told"
    );
}

#[tokio::test]
async fn fragments_with_control_frames_between_them_arrive_whole() {
    let hub = rooms();
    let mut s = serve_native(&hub, 1 << 16);
    read_type(&mut s, "welcome").await;
    let mut bytes = masked(ws::OP_TEXT, false, br#"{"ty"#);
    bytes.extend(masked(ws::OP_PING, true, b"mid"));
    bytes.extend(masked(ws::OP_CONT, false, br#"pe":"pi"#));
    bytes.extend(masked(ws::OP_PONG, true, b""));
    bytes.extend(masked(ws::OP_CONT, true, br#"ng"}"#));
    // Byte by byte: every header and payload split over reads.
    for b in bytes {
        s.write_all(&[b]).await.unwrap();
        tokio::task::yield_now().await;
    }
    loop {
        let (op, p) = read_frame(&mut s).await.unwrap();
        if op == ws::OP_PONG {
            assert_eq!(p, b"mid");
            break;
        }
    }
    read_type(&mut s, "pong").await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_with_1009_and_the_handshake_completes() {
    let hub = rooms();
    let mut s = serve_native(&hub, 1024);
    read_type(&mut s, "welcome").await;
    // 5000 bytes against a limit of 1024: refused at the header, the payload skipped.
    s.write_all(&masked(ws::OP_TEXT, true, &[b'x'; 5000]))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut s).await.0, 1009);
    // The server waits for the client's Close, then closes the stream.
    s.write_all(&masked(ws::OP_CLOSE, true, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest))
        .await
        .expect("closed at the client's Close, not after the timeout")
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(hub.with_core(|c| c.live_peers()), 0);
}

#[tokio::test]
async fn bad_utf8_is_1007_and_an_unmasked_frame_1002() {
    let hub = rooms();
    let mut s = serve_native(&hub, 1024);
    read_type(&mut s, "welcome").await;
    s.write_all(&masked(ws::OP_TEXT, true, &[b'{', 0xff, b'}']))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut s).await.0, 1007);
    let mut s = serve_native(&hub, 1024);
    read_type(&mut s, "welcome").await;
    s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let (code, reason) = expect_close(&mut s).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("masked"), "{reason}");
}

#[tokio::test]
async fn a_close_from_the_machine_goes_out_after_what_was_queued_before_it() {
    let hub = peerjs();
    let (client, server) = tokio::io::duplex(1 << 16);
    let h = Arc::clone(&hub);
    tokio::spawn(async move {
        // No token: the machine answers with an error and closes.
        let (conn, ob) =
            h.open(|core, conn, now| core.connect(conn, Some("peerjs"), Some("bob"), None, now));
        h.serve(conn, ob, server, 1 << 20).await;
    });
    let mut c = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let first = c.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("ERROR"), "{first:?}");
    match c.next().await {
        Some(Ok(Message::Close(Some(_)))) => {}
        other => panic!("{other:?}"),
    }
    // tungstenite answers the Close; the server then ends the stream.
    assert!(c.next().await.is_none());
}
