//! One side of a relay session: socket → pipe to the other side, pipe → socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};

use super::{Chunk, RelayHub, SessionSlot};
use crate::config::RelayWsConfig;
use crate::rate::TokenBucket;

/// Framing overhead charged per frame so empty frames still use buffer budget.
const FRAME_OVERHEAD: usize = 64;

/// Longest one frame may wait for the receiver's socket before the session is ended.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one connected side owns: its outgoing pipe (with the byte budget that bounds it),
/// its incoming pipe, and a share of the session slot.
pub struct RelaySide {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
    budget_max: usize,
    pub(super) rx: mpsc::UnboundedReceiver<Chunk>,
    bucket: Option<TokenBucket>,
    pub(super) slot: Arc<SessionSlot>,
}

impl RelaySide {
    pub(super) fn new(
        tx: mpsc::UnboundedSender<Chunk>,
        budget: Arc<Semaphore>,
        rx: mpsc::UnboundedReceiver<Chunk>,
        slot: Arc<SessionSlot>,
        cfg: &RelayWsConfig,
    ) -> Self {
        let bucket = (cfg.session_bytes_per_sec > 0).then(|| {
            let rate = cfg.session_bytes_per_sec as f64;
            TokenBucket::new(rate, rate.max(cfg.max_frame_bytes as f64), Instant::now())
        });
        Self {
            tx,
            budget,
            budget_max: cfg.buffer_bytes,
            rx,
            bucket,
            slot,
        }
    }
}

enum ReadEnd {
    /// The client closed or the connection dropped.
    Gone,
    /// The other side left: our pipe has no receiver any more.
    PeerGone,
    /// A frame past `max_frame_bytes` (RFC 6455 §7.4.1: 1009).
    TooBig,
    /// A text frame: the relay carries binary frames only (1003).
    Text,
}

fn is_capacity(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Runs one side until either side leaves; frames flow in order, bounded by the budget.
pub async fn run_side(hub: Arc<RelayHub>, side: RelaySide, socket: WebSocket) {
    let RelaySide {
        tx,
        budget,
        budget_max,
        mut rx,
        mut bucket,
        slot,
    } = side;
    let (mut sink, mut stream) = socket.split();
    let hub_r = Arc::clone(&hub);
    let reader = async move {
        loop {
            let msg = match stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    if is_capacity(e) {
                        hub_r.stats.oversized_frames.fetch_add(1, Ordering::Relaxed);
                        return ReadEnd::TooBig;
                    }
                    return ReadEnd::Gone;
                }
                None => return ReadEnd::Gone,
            };
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(_) => return ReadEnd::Text,
                Message::Close(_) => return ReadEnd::Gone,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            let cost = (data.len() + FRAME_OVERHEAD).min(budget_max) as u32;
            // Backpressure: wait for buffer budget before reading the next frame.
            let Ok(permit) = Arc::clone(&budget).acquire_many_owned(cost).await else {
                return ReadEnd::PeerGone;
            };
            let mut wait = hub_r.global_delay(data.len());
            if let Some(b) = bucket.as_mut() {
                wait = wait.max(b.take_with_delay(data.len() as f64, Instant::now()));
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if tx.send((data, permit)).is_err() {
                return ReadEnd::PeerGone;
            }
        }
    };
    let hub_w = Arc::clone(&hub);
    let writer = async {
        while let Some((data, permit)) = rx.recv().await {
            let n = data.len() as u64;
            // A receiver that never reads would otherwise hold the session open forever.
            let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Binary(data))).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
            drop(permit);
            hub_w.stats.bytes_forwarded.fetch_add(n, Ordering::Relaxed);
            hub_w.stats.frames_forwarded.fetch_add(1, Ordering::Relaxed);
        }
        // The other side left and everything it sent has been delivered.
        let (code, reason) = slot.peer_gone();
        close(&mut sink, code, reason).await;
    };
    let mut reader = Box::pin(reader);
    let end = {
        tokio::pin!(writer);
        tokio::select! {
            end = &mut reader => Some(end),
            _ = &mut writer => None,
        }
    };
    match end {
        Some(ReadEnd::TooBig) => close(&mut sink, 1009, "frame too large").await,
        Some(ReadEnd::Text) => close(&mut sink, 1003, "binary frames only").await,
        Some(ReadEnd::PeerGone) => {
            let (code, reason) = slot.peer_gone();
            close(&mut sink, code, reason).await
        }
        Some(ReadEnd::Gone) => {}
        None => {
            // We sent Close; give the client a moment to answer, then drop the connection.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }
}

async fn close(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    code: u16,
    reason: &'static str,
) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}
