//! The thin IO driver shared by the native and PeerJS services: one state machine behind a
//! mutex, one outbox per WebSocket, a 1 s tick. All protocol decisions are the state
//! machine's; this file only moves frames.
//!
//! One task per connection does all of that connection's IO: it reads frames and feeds them
//! to the machine, and it writes what others queued in its outbox, everything queued at
//! once and then one flush (one `write` for a burst of frames, not one per frame and no
//! hand-off to a second task). The machine's commands are queued while its lock is held, so
//! every connection sees events in the order the machine decided them; queuing is a short
//! push, and the lock is never held across IO. The outbox is bounded in frames and bytes: a
//! reader that falls behind is closed (1008) and counted, so a slow client cannot grow
//! server memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, Notify};

use super::peerjs::PeerJsService;
use super::protocol::{ErrorCode, ServerMsg};
use super::rooms::{relay_ticket_text, RoomService};
use super::{ConnId, Out, Text};
use crate::relay_ws::RelayHub;

/// The calls a driver makes into a signaling state machine.
pub trait Machine: Send + 'static {
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) -> Vec<Out>;
    fn binary(&mut self, conn: ConnId, data: &[u8], now: Instant) -> Vec<Out>;
    fn alive(&mut self, conn: ConnId, now: Instant);
    fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Out>;
    fn tick(&mut self, now: Instant) -> Vec<Out>;
    /// Cluster mode: a bus command the cluster driver's queue had no room for; the machine
    /// tells the client concerned (never a silent drop).
    fn bus_refused(&mut self, _cmd: super::bus::BusCmd, _now: Instant) -> Vec<Out> {
        Vec::new()
    }
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
            .to_text()
            .into(),
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
    fn bus_refused(&mut self, cmd: super::bus::BusCmd, _now: Instant) -> Vec<Out> {
        RoomService::bus_refused(self, cmd)
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
    fn bus_refused(&mut self, cmd: super::bus::BusCmd, now: Instant) -> Vec<Out> {
        PeerJsService::bus_refused(self, cmd, now)
    }
}

/// Longest a burst of frames may take to go out before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one connection may have queued and not yet written: past either bound it is
/// closed with 1008 (see [`Hub::dropped_slow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBudget {
    pub frames: usize,
    pub bytes: usize,
}

/// The close sent to a connection whose outbox went over its [`SendBudget`].
const OVER_BUDGET: (u16, &str) = (1008, "send queue over budget: reading too slowly");

enum Frame {
    Text(Text),
    Ping,
    Close(u16, &'static str),
}

impl Frame {
    /// Bytes counted against the budget (control frames count as a small frame).
    fn cost(&self) -> usize {
        match self {
            Frame::Text(t) => t.len().max(16),
            _ => 16,
        }
    }

    fn message(self) -> Message {
        match self {
            Frame::Text(t) => Message::Text(t),
            Frame::Ping => Message::Ping(Default::default()),
            Frame::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            })),
        }
    }
}

/// One connection's queue of outgoing frames: filled under the hub's lock by whichever task
/// routes to it, emptied by the connection's own task.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queued>,
    wake: Notify,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// A Close is queued: nothing after it goes out.
    closed: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `f`; false when that takes the outbox over `budget` (the connection is then
    /// closed with [`OVER_BUDGET`] in place of what it had queued).
    fn push(&self, f: Frame, budget: SendBudget) -> bool {
        let mut q = self.lock();
        if q.closed {
            return true;
        }
        let cost = f.cost();
        let close = matches!(f, Frame::Close(..));
        let fits = q.frames.len() < budget.frames && q.bytes + cost <= budget.bytes;
        let was_empty = q.frames.is_empty();
        if !close && !fits {
            // Never read in time: send why, not the backlog.
            q.frames.clear();
            q.bytes = 0;
            q.frames
                .push_back(Frame::Close(OVER_BUDGET.0, OVER_BUDGET.1));
            q.closed = true;
            drop(q);
            self.wake.notify_one();
            return false;
        }
        q.closed = close;
        q.bytes += cost;
        q.frames.push_back(f);
        drop(q);
        // The task is woken once per burst: a non-empty outbox is already being written.
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Takes everything queued into `into` (empty), swapping buffers so that neither side
    /// allocates in a steady stream.
    fn take(&self, into: &mut VecDeque<Frame>) {
        let mut q = self.lock();
        std::mem::swap(&mut q.frames, into);
        q.bytes = 0;
    }
}

struct Inner<M> {
    core: M,
    outboxes: FxHashMap<ConnId, Arc<Outbox>>,
}

/// A state machine and the outboxes of its connections.
pub struct Hub<M> {
    inner: Mutex<Inner<M>>,
    next_conn: AtomicU64,
    budget: SendBudget,
    dropped_slow: AtomicU64,
    relay: Option<Arc<RelayHub>>,
    relay_ticket_ttl: u32,
    /// Cluster mode: where [`Out::Bus`] commands go (the cluster driver; bounded).
    bus: std::sync::OnceLock<mpsc::Sender<super::bus::BusCmd>>,
    /// Bus commands dropped because the cluster driver's queue was full (receivers see the
    /// gap in the sequence and resync).
    pub bus_dropped: AtomicU64,
}

/// How writing a burst ended.
enum Wrote {
    Open,
    /// A Close frame went out.
    Closed,
    Failed,
}

impl<M: Machine> Hub<M> {
    pub fn new(
        core: M,
        budget: SendBudget,
        relay: Option<Arc<RelayHub>>,
        relay_ticket_ttl: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                core,
                outboxes: FxHashMap::default(),
            }),
            next_conn: AtomicU64::new(1),
            budget,
            dropped_slow: AtomicU64::new(0),
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

    /// Connections closed because their outbox went over the send budget.
    pub fn dropped_slow(&self) -> u64 {
        self.dropped_slow.load(Ordering::Relaxed)
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

    /// Queues the machine's commands; a connection over its send budget is closed and the
    /// machine told, which may queue more.
    fn dispatch(&self, g: &mut Inner<M>, outs: Vec<Out>) {
        let mut work = outs;
        while !work.is_empty() {
            let mut dropped = Vec::new();
            let mut refused = Vec::new();
            for o in work.drain(..) {
                match o {
                    Out::Send { conn, text } => self.push(g, conn, Frame::Text(text), &mut dropped),
                    Out::Ping { conn } => self.push(g, conn, Frame::Ping, &mut dropped),
                    Out::Close { conn, code, reason } => {
                        if let Some(ob) = g.outboxes.remove(&conn) {
                            ob.push(Frame::Close(code, reason), self.budget);
                        }
                    }
                    Out::Relay(grant) => {
                        refused.extend(self.grant_relay(g, grant, &mut dropped));
                    }
                    Out::Bus(cmd) => refused.extend(self.to_bus(cmd)),
                }
            }
            let now = Instant::now();
            for cmd in refused {
                work.extend(g.core.bus_refused(cmd, now));
            }
            for conn in dropped {
                self.dropped_slow.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn, "signaling client over its send budget, closing it");
                work.extend(g.core.disconnect(conn, now));
            }
        }
    }

    /// Queues `cmd` for the cluster driver; gives it back when the queue is full.
    fn to_bus(&self, cmd: super::bus::BusCmd) -> Option<super::bus::BusCmd> {
        let tx = self.bus.get()?;
        let back = tx.try_send(cmd).err().map(|e| e.into_inner());
        if back.is_some() {
            self.bus_dropped.fetch_add(1, Ordering::Relaxed);
        }
        back
    }

    fn push(&self, g: &mut Inner<M>, conn: ConnId, f: Frame, dropped: &mut Vec<ConnId>) {
        if let Some(ob) = g.outboxes.get(&conn) {
            if !ob.push(f, self.budget) {
                g.outboxes.remove(&conn);
                dropped.push(conn);
            }
        }
    }

    /// Registers a granted session and hands out its tickets; gives back the bus command
    /// carrying a remote side's ticket when the queue to the cluster driver is full (the
    /// requester then gets the machine's refusal instead of a ticket).
    fn grant_relay(
        &self,
        g: &mut Inner<M>,
        grant: super::rooms::RelayGrant,
        dropped: &mut Vec<ConnId>,
    ) -> Option<super::bus::BusCmd> {
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
                match grant.remote {
                    // The other side is on another node: its ticket goes out on the bus.
                    Some(cmd) => {
                        if let Some(back) = self.to_bus(cmd) {
                            return Some(back);
                        }
                    }
                    None => {
                        let b = relay_ticket_text(&peer_a, &tb, ttl).into();
                        self.push(g, cb, Frame::Text(b), dropped);
                    }
                }
                let a = relay_ticket_text(&peer_b, &ta, ttl).into();
                self.push(g, ca, Frame::Text(a), dropped);
            }
            Err(message) => {
                let text = ServerMsg::Error {
                    code: ErrorCode::RelayUnavailable,
                    message,
                    to: Some(&peer_b),
                }
                .to_text();
                self.push(g, ca, Frame::Text(text.into()), dropped);
            }
        }
        None
    }

    /// Feeds one frame from `conn` to the machine and queues what it answers.
    fn receive(&self, conn: ConnId, msg: &Message) {
        let now = Instant::now();
        let mut g = self.lock();
        let outs = match msg {
            Message::Text(t) => g.core.message(conn, t.as_str(), now),
            Message::Binary(b) => g.core.binary(conn, b, now),
            Message::Ping(_) | Message::Pong(_) => {
                g.core.alive(conn, now);
                return;
            }
            Message::Close(_) => return,
        };
        self.dispatch(&mut g, outs);
    }

    /// Writes `batch` (then empty) with one flush; stops at a Close.
    async fn write(socket: &mut WebSocket, batch: &mut VecDeque<Frame>) -> Wrote {
        let mut closed = false;
        let burst = async {
            while let Some(f) = batch.pop_front() {
                closed = matches!(f, Frame::Close(..));
                socket.feed(f.message()).await?;
                if closed {
                    break;
                }
            }
            socket.flush().await
        };
        // A client that stops reading must not pin this task and its socket forever.
        let sent = tokio::time::timeout(WRITE_TIMEOUT, burst).await;
        batch.clear();
        match sent {
            Ok(Ok(())) if closed => Wrote::Closed,
            Ok(Ok(())) => Wrote::Open,
            _ => Wrote::Failed,
        }
    }

    /// Drives one WebSocket: `connect` registers it with the state machine; then frames in
    /// go to the machine and queued frames go out, until either side closes.
    pub async fn run(
        self: Arc<Self>,
        mut socket: WebSocket,
        connect: impl FnOnce(&mut M, ConnId, Instant) -> Vec<Out>,
    ) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::default());
        {
            let mut g = self.lock();
            g.outboxes.insert(conn, Arc::clone(&outbox));
            let outs = connect(&mut g.core, conn, Instant::now());
            self.dispatch(&mut g, outs);
        }
        let mut batch = VecDeque::new();
        // Whether we sent Close (the client's answer is then awaited below).
        let mut we_closed = false;
        loop {
            tokio::select! {
                // Writing first: what is queued is older than what is unread.
                biased;
                () = outbox.wake.notified() => {
                    outbox.take(&mut batch);
                    // Boxed, like every rarely-running branch here: a burst's future (its
                    // timer most of all) would otherwise be part of the task's state that
                    // every idle connection keeps (see `tests::idle_task_is_small`).
                    match Box::pin(Self::write(&mut socket, &mut batch)).await {
                        Wrote::Open => {}
                        Wrote::Closed => {
                            we_closed = true;
                            break;
                        }
                        Wrote::Failed => break,
                    }
                    // An idle connection keeps no queue capacity.
                    if batch.capacity() > 64 {
                        batch = VecDeque::new();
                    }
                }
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(m)) => self.receive(conn, &m),
                    Some(Err(e)) => {
                        let too_big = matches!(
                            e.into_inner().downcast_ref::<tungstenite::Error>(),
                            Some(tungstenite::Error::Capacity(_))
                        );
                        if too_big {
                            // Only this sender is closed; what it had queued is dropped.
                            self.lock().outboxes.remove(&conn);
                            batch.clear();
                            batch.push_back(Frame::Close(1009, "message too large"));
                            let _ = Box::pin(Self::write(&mut socket, &mut batch)).await;
                        }
                        break;
                    }
                },
            }
        }
        {
            let mut g = self.lock();
            g.outboxes.remove(&conn);
            let outs = g.core.disconnect(conn, Instant::now());
            self.dispatch(&mut g, outs);
        }
        if we_closed {
            // We sent Close: finish the closing handshake (RFC 6455 §7.1.1) by reading, and
            // discarding, until the client's Close. Dropping the socket with unread input
            // would make the kernel send RST, and the client could lose our Close frame
            // (and with it the close code) or the error message before it.
            let drain = async {
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            };
            let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), drain)).await;
        } else {
            // The client closed (or the socket failed): answer its Close, never waiting on a
            // dead client for long.
            let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), socket.close())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every connected peer keeps its task's state for as long as it is connected, idle or
    /// not: the state of `Hub::run` (which holds the 368-byte WebSocket) must stay small.
    /// Inlining a write burst's future (its timer) again makes it 1176 bytes.
    #[test]
    fn idle_task_is_small() {
        let run = |(hub, socket): (Arc<Hub<PeerJsService>>, WebSocket)| {
            hub.run(socket, |_core, _conn, _now| Vec::new())
        };
        let size = output_size(&run);
        assert!(size <= 1024, "Hub::run's future is {size} bytes");
    }
}
