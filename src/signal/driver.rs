//! The thin IO driver shared by the native and PeerJS services: one state machine behind a
//! mutex, one outbox per WebSocket, a 1 s tick. All protocol decisions are the state
//! machine's; this file only moves frames.
//!
//! One task per connection does all of that connection's IO: it reads frames and feeds them
//! to the machine, and it writes what others queued in its outbox, everything queued at
//! once (one `writev` for a burst of frames, not one per frame and no hand-off to a second
//! task). Framing is [`super::ws`]'s: reads go into a buffer on the polling thread's stack,
//! so an idle connection keeps its socket, a small decoder and its task state only. The machine's commands are queued while its lock is held, so
//! every connection sees events in the order the machine decided them; queuing is a short
//! push, and the lock is never held across IO. The outbox is bounded in frames and bytes: a
//! reader that falls behind is closed (1008) and counted, so a slow client cannot grow
//! server memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use hyper_util::rt::TokioIo;
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::peerjs::PeerJsService;
use super::rooms::{relay_ticket_text, RoomService};
use super::{ws, Out, Text, WsId};
use crate::relay_ws::RelayHub;

/// The calls a driver makes into a signaling state machine.
pub trait Machine: Send + 'static {
    fn message(&mut self, conn: WsId, text: &str, now: Instant) -> Vec<Out>;
    fn binary(&mut self, conn: WsId, data: &[u8], now: Instant) -> Vec<Out>;
    fn alive(&mut self, conn: WsId, now: Instant);
    fn disconnect(&mut self, conn: WsId, now: Instant) -> Vec<Out>;
    fn tick(&mut self, now: Instant) -> Vec<Out>;
    /// Cluster mode: a bus command the cluster driver's queue had no room for; the machine
    /// tells the client concerned (never a silent drop).
    fn bus_refused(&mut self, _cmd: super::bus::BusCmd, _now: Instant) -> Vec<Out> {
        Vec::new()
    }
    /// A granted relay session could not be registered: tell (and count) the asking side.
    /// Only the native machine grants relays.
    fn relay_refused(&mut self, _conn: WsId, _to: &str, _message: String) -> Vec<Out> {
        Vec::new()
    }
}

impl Machine for RoomService {
    fn message(&mut self, conn: WsId, text: &str, now: Instant) -> Vec<Out> {
        RoomService::message(self, conn, text, now)
    }
    fn binary(&mut self, conn: WsId, _data: &[u8], now: Instant) -> Vec<Out> {
        RoomService::binary(self, conn, now)
    }
    fn relay_refused(&mut self, conn: WsId, to: &str, message: String) -> Vec<Out> {
        vec![RoomService::relay_refused(self, conn, to, message)]
    }
    fn alive(&mut self, conn: WsId, now: Instant) {
        RoomService::alive(self, conn, now)
    }
    fn disconnect(&mut self, conn: WsId, now: Instant) -> Vec<Out> {
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
    fn message(&mut self, conn: WsId, text: &str, now: Instant) -> Vec<Out> {
        PeerJsService::message(self, conn, text, now)
    }
    fn binary(&mut self, conn: WsId, data: &[u8], now: Instant) -> Vec<Out> {
        // The `peer` server parses binary frames as JSON text too.
        match std::str::from_utf8(data) {
            Ok(t) => PeerJsService::message(self, conn, t, now),
            Err(_) => Vec::new(),
        }
    }
    fn alive(&mut self, _conn: WsId, _now: Instant) {}
    fn disconnect(&mut self, conn: WsId, now: Instant) -> Vec<Out> {
        PeerJsService::disconnect(self, conn, now)
    }
    fn tick(&mut self, now: Instant) -> Vec<Out> {
        PeerJsService::tick(self, now)
    }
    fn bus_refused(&mut self, cmd: super::bus::BusCmd, now: Instant) -> Vec<Out> {
        PeerJsService::bus_refused(self, cmd, now)
    }
}

/// Longest a blocked write may go without progress before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the closing handshake may take (our Close out, the client's back).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read per `read` call, into a buffer on the polling thread's stack: nothing is
/// kept per connection between reads but a split message ([`ws::Decoder`]).
const READ_CHUNK: usize = 16 * 1024;

/// Frames per `writev` (each is a header and a payload slice).
const WRITE_FRAMES: usize = 32;

/// What one connection may have queued and not yet written: past either bound it is
/// closed with 1008 (see [`Hub::dropped_slow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBudget {
    pub frames: usize,
    pub bytes: usize,
}

/// The close sent to a connection whose outbox went over its [`SendBudget`].
const OVER_BUDGET: (u16, &str) = (1008, "send queue over budget: reading too slowly");

/// A server frame waiting to be written.
enum Frame {
    Text(Text),
    Ping,
    /// The answer to a client's ping, with its payload (§5.5.3).
    Pong(bytes::Bytes),
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

    /// A Close frame's payload (code and reason), built when it is written.
    fn close_payload(&self) -> Option<([u8; 125], usize)> {
        match self {
            Frame::Close(code, reason) => Some(ws::close_payload(*code, reason)),
            _ => None,
        }
    }

    /// The opcode and payload; a Close's payload is `close` (see [`Self::close_payload`]).
    fn parts<'a>(&'a self, close: &'a [u8]) -> (u8, &'a [u8]) {
        match self {
            Frame::Text(t) => (ws::OP_TEXT, t.as_str().as_bytes()),
            Frame::Ping => (ws::OP_PING, &[]),
            Frame::Pong(p) => (ws::OP_PONG, p),
            Frame::Close(..) => (ws::OP_CLOSE, close),
        }
    }

    /// Bytes on the wire: header and payload.
    fn wire_len(&self) -> usize {
        let close = self.close_payload().unwrap_or(([0; 125], 0));
        let (op, p) = self.parts(&close.0[..close.1]);
        ws::frame_header(op, p.len()).1 + p.len()
    }
}

/// One connection's queue of outgoing frames: filled under the hub's lock by whichever task
/// routes to it, emptied by the connection's own task.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Queued>,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// A Close is queued: nothing after it goes out.
    closed: bool,
    /// The connection's task, while it waits with nothing queued.
    waker: Option<Waker>,
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
        let ok = close || fits;
        if ok {
            q.closed = close;
            q.bytes += cost;
            q.frames.push_back(f);
        } else {
            // Never read in time: send why, not the backlog.
            q.frames.clear();
            q.bytes = 0;
            q.frames
                .push_back(Frame::Close(OVER_BUDGET.0, OVER_BUDGET.1));
            q.closed = true;
        }
        // The task is woken once per burst: a task that finds frames takes them all.
        let waker = q.waker.take();
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
        ok
    }

    /// Takes everything queued into `into` (empty), swapping buffers so that neither side
    /// allocates while frames keep coming; with nothing queued, `waker` is woken by the next
    /// push, and both buffers are freed: an idle connection keeps no queue capacity (a
    /// burst then costs one allocation, against ~150 bytes held by every idle peer).
    fn take(&self, into: &mut VecDeque<Frame>, waker: &Waker) {
        let mut q = self.lock();
        if q.frames.is_empty() {
            if !q.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                q.waker = Some(waker.clone());
            }
            if q.frames.capacity() > 0 {
                q.frames = VecDeque::new();
            }
            if into.capacity() > 0 {
                *into = VecDeque::new();
            }
            return;
        }
        std::mem::swap(&mut q.frames, into);
        q.bytes = 0;
    }
}

/// A frame decoded from a connection, for the machine.
enum In<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// A ping or pong: proof of life only.
    Alive,
}

/// How a connection's main loop ended.
enum End {
    /// The socket failed, reached EOF or stalled: nothing more to say.
    Gone,
    /// The client sent Close (with this code): it is answered.
    PeerClosed(Option<u16>),
    /// Our queued Close went out: the client's is awaited.
    WeClosed,
    /// The client broke the protocol or a limit: closed with the fault's code. True when
    /// the client's Close came already (read past a refused message).
    Fault(ws::Fault, bool),
}

/// One WebSocket's IO state, kept for as long as it is connected: the socket, the decoder
/// (no buffer while idle) and the frames being written.
struct Conn<S> {
    io: S,
    dec: ws::Decoder,
    /// Frames taken from the outbox and not yet fully written.
    batch: VecDeque<Frame>,
    /// Bytes of `batch`'s first frame already written.
    sent: usize,
    /// Written since the last flush (TLS buffers).
    unflushed: bool,
    /// Running while a write is blocked: past it the connection is given up (a client that
    /// stops reading must not pin its socket forever). Allocated only then.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Writes `batch` with as few `writev` calls as the socket allows, then flushes. Ready
    /// with true once a Close frame went out (nothing after it is written).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while !self.batch.is_empty() {
            let mut heads = [([0u8; 10], 0usize); WRITE_FRAMES];
            let mut payloads: [&[u8]; WRITE_FRAMES] = [&[]; WRITE_FRAMES];
            let close = (self.batch.iter().take(WRITE_FRAMES))
                .find_map(Frame::close_payload)
                .unwrap_or(([0; 125], 0));
            let mut n = 0;
            for f in self.batch.iter().take(WRITE_FRAMES) {
                let (op, p) = f.parts(&close.0[..close.1]);
                heads[n] = ws::frame_header(op, p.len());
                payloads[n] = p;
                n += 1;
                if op == ws::OP_CLOSE {
                    break;
                }
            }
            let mut iov = [io::IoSlice::new(&[]); 2 * WRITE_FRAMES];
            let mut m = 0;
            let mut skip = self.sent;
            for k in 0..n {
                for part in [&heads[k].0[..heads[k].1], payloads[k]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov[m] = io::IoSlice::new(&part[skip..]);
                    skip = 0;
                    m += 1;
                }
            }
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..m]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.stall = None;
            self.unflushed = true;
            let mut done = self.sent + written;
            while let Some(f) = self.batch.front() {
                let len = f.wire_len();
                if done < len {
                    break;
                }
                done -= len;
                if matches!(self.batch.pop_front(), Some(Frame::Close(..))) {
                    self.batch.clear();
                    self.sent = 0;
                    ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                    return Poll::Ready(Ok(true));
                }
            }
            self.sent = done;
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(false))
    }

    /// A blocked write: true once it has made no progress for [`WRITE_TIMEOUT`].
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let t = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        t.as_mut().poll(cx).is_ready()
    }

    /// Reads what the socket has (into a stack buffer) and decodes it, handing each message
    /// to `on`; Ready when the connection ends (EOF, error, the client's Close, a fault).
    fn poll_read(&mut self, cx: &mut Context<'_>, on: &mut impl FnMut(ws::Event<'_>)) -> Poll<End> {
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        loop {
            let mut rb = ReadBuf::uninit(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)) {
                Err(_) => return Poll::Ready(End::Gone),
                Ok(()) if rb.filled().is_empty() => return Poll::Ready(End::Gone),
                Ok(()) => {}
            }
            let mut closed = None;
            let r = self.dec.feed(rb.filled_mut(), &mut |e| match e {
                ws::Event::Close(c) => closed = Some(c.map(|(code, _)| code)),
                e => on(e),
            });
            if let Err(f) = r {
                return Poll::Ready(End::Fault(f, closed.is_some()));
            }
            if let Some(code) = closed {
                return Poll::Ready(End::PeerClosed(code));
            }
        }
    }

    /// Writes what is left of a frame begun, then `close`, within [`CLOSE_TIMEOUT`].
    async fn send_close(&mut self, close: Frame) -> bool {
        // A frame partly written must be finished: the stream has no other boundary.
        self.batch.truncate(usize::from(self.sent > 0));
        self.batch.push_back(close);
        let write = std::future::poll_fn(|cx| self.poll_write(cx));
        matches!(
            tokio::time::timeout(CLOSE_TIMEOUT, write).await,
            Ok(Ok(true))
        )
    }

    /// After our Close: reads, discarding, until the client's Close (RFC 6455 §7.1.1), EOF
    /// or [`CLOSE_TIMEOUT`]. Dropping the socket with unread input would make the kernel
    /// send RST, and the client could lose our Close frame (and its code) or what came
    /// before it.
    async fn await_close(&mut self) {
        let drain = std::future::poll_fn(|cx| self.poll_read(cx, &mut |_| {}));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }

    /// The closing handshake for how the main loop ended.
    async fn finish(mut self, end: End) {
        match end {
            End::Gone => {}
            End::WeClosed => self.await_close().await,
            End::PeerClosed(code) => {
                // Echo the client's code (§5.5.1); the server then closes TCP first.
                let echo = Frame::Close(code.unwrap_or(1000), "");
                if self.send_close(echo).await {
                    let shut = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, shut).await;
                }
            }
            End::Fault(f, peer_closed) => {
                let (code, reason) = f.close();
                if self.send_close(Frame::Close(code, reason)).await && !peer_closed {
                    self.await_close().await;
                }
            }
        }
    }
}

struct Inner<M> {
    core: M,
    outboxes: FxHashMap<WsId, Arc<Outbox>>,
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
            let mut more = Vec::new();
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
                        more.extend(self.grant_relay(g, grant, &mut dropped, &mut refused));
                    }
                    Out::CancelRelay { ticket, reason } => {
                        if let Some(r) = &self.relay {
                            r.cancel(&ticket, reason);
                        }
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
                tracing::debug!(%conn, "signaling client over its send budget, closing it");
                work.extend(g.core.disconnect(conn, now));
            }
            work.extend(more);
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

    fn push(&self, g: &mut Inner<M>, conn: WsId, f: Frame, dropped: &mut Vec<WsId>) {
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
        dropped: &mut Vec<WsId>,
        refused: &mut Vec<super::bus::BusCmd>,
    ) -> Vec<Out> {
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
                            refused.push(back);
                            return Vec::new();
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
            Err(message) => return g.core.relay_refused(ca, &peer_b, message),
        }
        Vec::new()
    }

    /// Feeds one frame from `conn` to the machine and queues what it answers.
    fn receive(&self, conn: WsId, msg: In<'_>) {
        let now = Instant::now();
        let mut g = self.lock();
        let outs = match msg {
            In::Text(t) => g.core.message(conn, t, now),
            In::Binary(b) => g.core.binary(conn, b, now),
            In::Alive => {
                g.core.alive(conn, now);
                return;
            }
        };
        self.dispatch(&mut g, outs);
    }

    /// Registers a new connection with the machine (`connect`, which may queue its first
    /// frames): its id and its outbox.
    pub fn open(
        &self,
        connect: impl FnOnce(&mut M, WsId, Instant) -> Vec<Out>,
    ) -> (WsId, Arc<Outbox>) {
        let conn = WsId::new(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let outbox = Arc::new(Outbox::default());
        let mut g = self.lock();
        g.outboxes.insert(conn, Arc::clone(&outbox));
        let outs = connect(&mut g.core, conn, Instant::now());
        self.dispatch(&mut g, outs);
        (conn, outbox)
    }

    /// Serves a WebSocket upgraded by `upgrade` on its own task (see [`Self::task`]).
    pub fn spawn(
        self: Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        limit: usize,
        connect: impl FnOnce(&mut M, WsId, Instant) -> Vec<Out> + Send + 'static,
    ) {
        tokio::spawn(self.task(upgrade, limit, connect));
    }

    /// A connection's whole task: once the 101 is out, `connect` registers the socket with
    /// the machine, then [`Self::serve`] runs it. Its state is what every connected peer
    /// keeps (`tests::idle_task_is_small`).
    // Not an `async fn`: with the block the arguments are moved in once, and the task's
    // state is 448 bytes instead of 456 (measured by the test).
    #[allow(clippy::manual_async_fn)]
    fn task(
        self: Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        limit: usize,
        connect: impl FnOnce(&mut M, WsId, Instant) -> Vec<Out> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let Ok(socket) = upgrade.await else { return };
            let (conn, outbox) = self.open(connect);
            self.serve(conn, outbox, TokioIo::new(socket), limit).await;
        }
    }

    /// Drives one open WebSocket (RFC 6455 framing from [`ws`]; messages of up to `limit`
    /// bytes): frames in go to the machine, queued frames go out, until either side closes.
    /// Reading goes on while a write is blocked; what is queued meanwhile stays bounded by
    /// the send budget.
    pub async fn serve<S>(&self, conn: WsId, outbox: Arc<Outbox>, io: S, limit: usize)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut c = Conn {
            io,
            dec: ws::Decoder::new(limit),
            batch: VecDeque::new(),
            sent: 0,
            unflushed: false,
            stall: None,
        };
        let end = std::future::poll_fn(|cx| self.poll_conn(conn, &outbox, &mut c, cx)).await;
        {
            let mut g = self.lock();
            g.outboxes.remove(&conn);
            let outs = g.core.disconnect(conn, Instant::now());
            self.dispatch(&mut g, outs);
        }
        // Boxed, like every rarely-running part: its state (timers) would otherwise be part
        // of what every idle connection keeps (see `tests::idle_task_is_small`).
        Box::pin(c.finish(end)).await;
    }

    fn poll_conn<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: WsId,
        outbox: &Outbox,
        c: &mut Conn<S>,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        loop {
            // Writing first: what is queued is older than what is unread.
            if c.batch.is_empty() && !c.unflushed {
                outbox.take(&mut c.batch, cx.waker());
            }
            if c.batch.is_empty() && !c.unflushed {
                break;
            }
            match c.poll_write(cx) {
                Poll::Ready(Ok(true)) => return Poll::Ready(End::WeClosed),
                // Written: the loop takes more, or finds none and frees the buffers.
                Poll::Ready(Ok(false)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                Poll::Pending => {
                    if c.stalled(cx) {
                        return Poll::Ready(End::Gone);
                    }
                    break;
                }
            }
        }
        c.poll_read(cx, &mut |e| match e {
            ws::Event::Text(t) => self.receive(conn, In::Text(t)),
            ws::Event::Binary(b) => self.receive(conn, In::Binary(b)),
            ws::Event::Ping(p) => {
                if !outbox.push(Frame::Pong(bytes::Bytes::copy_from_slice(p)), self.budget) {
                    self.dropped_slow.fetch_add(1, Ordering::Relaxed);
                }
                self.receive(conn, In::Alive);
            }
            ws::Event::Pong => self.receive(conn, In::Alive),
            ws::Event::Close(_) => {}
        })
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
