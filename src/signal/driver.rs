//! The thin IO driver shared by the native and PeerJS services: one state machine behind a
//! mutex, one bounded send queue per WebSocket, a 1 s tick. All protocol decisions are the
//! state machine's; this file only moves frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::peerjs::PeerJsService;
use super::protocol::{ErrorCode, ServerMsg};
use super::rooms::{relay_ticket_text, RoomService};
use super::{ConnId, Out};
use crate::relay_ws::RelayHub;

/// The calls a driver makes into a signaling state machine.
pub trait Machine: Send + 'static {
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) -> Vec<Out>;
    fn binary(&mut self, conn: ConnId, data: &[u8], now: Instant) -> Vec<Out>;
    fn alive(&mut self, conn: ConnId, now: Instant);
    fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Out>;
    fn tick(&mut self, now: Instant) -> Vec<Out>;
}

impl Machine for RoomService {
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) -> Vec<Out> {
        RoomService::message(self, conn, text, now)
    }
    fn binary(&mut self, conn: ConnId, _data: &[u8], now: Instant) -> Vec<Out> {
        self.alive(conn, now);
        vec![Out::Send {
            conn,
            text: ServerMsg::Error {
                code: ErrorCode::BinaryNotSupported,
                message: "signaling uses JSON text frames".into(),
                to: None,
            }
            .to_text(),
        }]
    }
    fn alive(&mut self, conn: ConnId, now: Instant) {
        RoomService::alive(self, conn, now)
    }
    fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Out> {
        RoomService::disconnect(self, conn, now)
    }
    fn tick(&mut self, now: Instant) -> Vec<Out> {
        RoomService::tick(self, now)
    }
}

impl Machine for PeerJsService {
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) -> Vec<Out> {
        PeerJsService::message(self, conn, text, now)
    }
    fn binary(&mut self, conn: ConnId, data: &[u8], now: Instant) -> Vec<Out> {
        // The `peer` server parses binary frames as JSON text too.
        match std::str::from_utf8(data) {
            Ok(t) => PeerJsService::message(self, conn, t, now),
            Err(_) => Vec::new(),
        }
    }
    fn alive(&mut self, _conn: ConnId, _now: Instant) {}
    fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Out> {
        PeerJsService::disconnect(self, conn, now)
    }
    fn tick(&mut self, now: Instant) -> Vec<Out> {
        PeerJsService::tick(self, now)
    }
}

/// Longest a single frame may take to go out before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

enum Frame {
    Text(String),
    Ping,
    Close(u16, &'static str),
}

struct Inner<M> {
    core: M,
    senders: HashMap<ConnId, mpsc::Sender<Frame>>,
}

/// A state machine and the send queues of its connections.
pub struct Hub<M> {
    inner: Mutex<Inner<M>>,
    next_conn: AtomicU64,
    send_queue: usize,
    relay: Option<Arc<RelayHub>>,
    relay_ticket_ttl: u32,
    /// Cluster mode: where [`Out::Bus`] commands go (the cluster driver; bounded).
    bus: std::sync::OnceLock<mpsc::Sender<super::bus::BusCmd>>,
    /// Bus commands dropped because the cluster driver's queue was full (receivers see the
    /// gap in the sequence and resync).
    pub bus_dropped: AtomicU64,
}

impl<M: Machine> Hub<M> {
    pub fn new(
        core: M,
        send_queue: usize,
        relay: Option<Arc<RelayHub>>,
        relay_ticket_ttl: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                core,
                senders: HashMap::new(),
            }),
            next_conn: AtomicU64::new(1),
            send_queue,
            relay,
            relay_ticket_ttl,
            bus: std::sync::OnceLock::new(),
            bus_dropped: AtomicU64::new(0),
        })
    }

    /// Cluster mode: bus commands from now on go to `tx`.
    pub fn set_bus(&self, tx: mpsc::Sender<super::bus::BusCmd>) {
        let _ = self.bus.set(tx);
    }

    /// Feeds an input that is not a connection's (a bus event) and carries out the result.
    pub fn drive(&self, f: impl FnOnce(&mut M) -> Vec<Out>) {
        let mut g = self.lock();
        let outs = f(&mut g.core);
        self.dispatch(&mut g, outs);
    }

    /// Runs `f` on the state machine (for HTTP routes that read it).
    pub fn with_core<R>(&self, f: impl FnOnce(&mut M) -> R) -> R {
        f(&mut self.lock().core)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<M>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns the 1 s tick on the current runtime; it stops when the hub is dropped.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                let Some(hub) = weak.upgrade() else { return };
                let mut g = hub.lock();
                let outs = g.core.tick(Instant::now());
                hub.dispatch(&mut g, outs);
            }
        });
    }

    /// Carries out commands; a connection whose queue is full is dropped (and the state
    /// machine told), so one slow client cannot grow server memory.
    fn dispatch(&self, g: &mut Inner<M>, outs: Vec<Out>) {
        let mut work = outs;
        while !work.is_empty() {
            let mut dropped = Vec::new();
            for o in work.drain(..) {
                match o {
                    Out::Send { conn, text } => {
                        Self::push(g, conn, Frame::Text(text), &mut dropped);
                    }
                    Out::Ping { conn } => Self::push(g, conn, Frame::Ping, &mut dropped),
                    Out::Close { conn, code, reason } => {
                        if let Some(tx) = g.senders.remove(&conn) {
                            let _ = tx.try_send(Frame::Close(code, reason));
                        }
                    }
                    Out::Relay(grant) => self.grant_relay(g, grant, &mut dropped),
                    Out::Bus(cmd) => {
                        let sent = self.bus.get().is_some_and(|tx| tx.try_send(cmd).is_ok());
                        if !sent {
                            self.bus_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            let now = Instant::now();
            for conn in dropped {
                tracing::debug!(conn, "signaling client too slow, dropping it");
                work.extend(g.core.disconnect(conn, now));
            }
        }
    }

    fn push(g: &mut Inner<M>, conn: ConnId, f: Frame, dropped: &mut Vec<ConnId>) {
        if let Some(tx) = g.senders.get(&conn) {
            if tx.try_send(f).is_err() {
                g.senders.remove(&conn);
                dropped.push(conn);
            }
        }
    }

    fn grant_relay(
        &self,
        g: &mut Inner<M>,
        grant: super::rooms::RelayGrant,
        dropped: &mut Vec<ConnId>,
    ) {
        let [(ca, peer_b, ta), (cb, peer_a, tb)] = grant.sides;
        let registered = match &self.relay {
            Some(r) => r
                .register(grant.session, [&ta, &tb], Instant::now())
                .map_err(|e| e.to_string()),
            None => Err("the WebSocket relay is disabled on this server".into()),
        };
        match registered {
            Ok(()) => {
                let ttl = self.relay_ticket_ttl;
                Self::push(
                    g,
                    ca,
                    Frame::Text(relay_ticket_text(&peer_b, &ta, ttl)),
                    dropped,
                );
                Self::push(
                    g,
                    cb,
                    Frame::Text(relay_ticket_text(&peer_a, &tb, ttl)),
                    dropped,
                );
            }
            Err(message) => {
                let text = ServerMsg::Error {
                    code: ErrorCode::RelayUnavailable,
                    message,
                    to: Some(&peer_b),
                }
                .to_text();
                Self::push(g, ca, Frame::Text(text), dropped);
            }
        }
    }

    /// Drives one WebSocket: `connect` registers it with the state machine; then frames in
    /// go to the machine and its commands come back out, until either side closes.
    pub async fn run(
        self: Arc<Self>,
        socket: WebSocket,
        connect: impl FnOnce(&mut M, ConnId, Instant) -> Vec<Out>,
    ) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Frame>(self.send_queue);
        {
            let mut g = self.lock();
            g.senders.insert(conn, tx);
            let outs = connect(&mut g.core, conn, Instant::now());
            self.dispatch(&mut g, outs);
        }
        let (mut sink, mut stream) = socket.split();
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let (msg, last) = match f {
                    Frame::Text(t) => (Message::Text(t.into()), false),
                    Frame::Ping => (Message::Ping(Default::default()), false),
                    Frame::Close(code, reason) => (
                        Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })),
                        true,
                    ),
                };
                // A client that stops reading must not pin this task and its socket forever.
                let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await;
                if !matches!(sent, Ok(Ok(()))) || last {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let mut writer = writer;
        let mut writer_done = false;
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = &mut writer => {
                    writer_done = true;
                    break;
                }
            };
            let now = Instant::now();
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let mut g = self.lock();
                    let outs = g.core.message(conn, t.as_str(), now);
                    self.dispatch(&mut g, outs);
                }
                Some(Ok(Message::Binary(b))) => {
                    let mut g = self.lock();
                    let outs = g.core.binary(conn, &b, now);
                    self.dispatch(&mut g, outs);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => self.lock().core.alive(conn, now),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    let too_big = matches!(
                        e.into_inner().downcast_ref::<tungstenite::Error>(),
                        Some(tungstenite::Error::Capacity(_))
                    );
                    if too_big {
                        let mut g = self.lock();
                        if let Some(tx) = g.senders.remove(&conn) {
                            let _ = tx.try_send(Frame::Close(1009, "message too large"));
                        }
                    }
                    break;
                }
            }
        }
        {
            let mut g = self.lock();
            g.senders.remove(&conn);
            let outs = g.core.disconnect(conn, Instant::now());
            self.dispatch(&mut g, outs);
        }
        if writer_done {
            // We sent Close: finish the closing handshake (RFC 6455 §7.1.1) by reading, and
            // discarding, until the client's Close. Dropping the socket with unread input
            // would make the kernel send RST, and the client could lose our Close frame
            // (and with it the close code) or the error message before it.
            let drain = async {
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        // Let a queued Close go out, but never wait on a dead client for long.
        if !writer_done
            && tokio::time::timeout(Duration::from_secs(5), &mut writer)
                .await
                .is_err()
        {
            writer.abort();
        }
    }
}
