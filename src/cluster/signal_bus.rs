//! The Redis side of the cluster bus (`crate::signal::bus`), one instance per
//! [`BusMachine`] (the native rooms, the PeerJS realm): a subscriber connection whose
//! pushes (RESP3) land in a bounded queue, listening to this node's channel
//! (`{prefix}bus:{CHANNEL}:node:{node}`) and to the channel of each room with a member here
//! (`{prefix}bus:{CHANNEL}:{room}`, subscribed and unsubscribed as the machine says);
//! publishing the machine's [`BusCmd`]s; this node's member list as a lease
//! (`{prefix}members:{node}`, hash peer id → JSON: whole each tick when it changed, and the
//! entry a join or leave changes written just before that event is published, so a node
//! that subscribes to the room and then reads the list misses nothing); resyncs of other
//! nodes (or of one room) from theirs; and the PeerJS id claims (`SET NX PX`, renewed each
//! tick, compare-and-delete on release).
//!
//! Sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7) when the server has it and
//! `cluster.sharded_pubsub` allows, else plain `PUBLISH`/`SUBSCRIBE` on the same channel
//! names: decided at each connect.
//!
//! Bounded everywhere: the machine's commands and the pushes each go through a fixed-size
//! queue; what does not fit is dropped and shows up as a sequence gap, which the receiver
//! repairs by reading the publisher's member list (and a dropped command's client is told:
//! `Machine::bus_refused`). While Redis is away, commands are
//! dropped (the machine refuses cross-node signals meanwhile) and the member list is
//! rewritten whole on reconnect.
//!
//! Per wake-up the driver takes what is queued (up to [`BATCH`]): runs of publishes go out
//! as one pipeline, in queue order (each sequence stays ordered), and pushes are
//! applied under one lock. A batch whose outcome is unknown when Redis is lost is refused
//! with the queue.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, PushInfo, PushKind};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use super::registry::Keys;
use super::BadRecord;
use crate::signal::bus::{BusCmd, BusMachine, Chan, Envelope, Member};
use crate::signal::driver::Hub;

/// Pushes (incoming bus messages) queued before the driver takes them.
const PUSH_QUEUE: usize = 8192;
/// Room machine commands queued before the driver takes them.
pub const CMD_QUEUE: usize = 8192;
/// Most commands (or pushes) the driver takes per wakeup: the publishes among them go out
/// as one pipeline (one write, one round trip) and the pushes are applied under one lock,
/// instead of one awaited round trip (or one lock) per message.
const BATCH: usize = 256;

/// Deletes a PeerJS id's claim only when this node still holds it.
const RELEASE_LUA: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

pub(super) struct SignalBus<M: BusMachine> {
    pub hub: Arc<Hub<M>>,
    pub cmds: mpsc::Receiver<BusCmd>,
    pub node: String,
    pub keys: Keys,
    sub: Option<MultiplexedConnection>,
    pushes: Option<mpsc::Receiver<PushInfo>>,
    /// Other live nodes as of the last registry read (their members are known).
    known: BTreeSet<String>,
    /// Member list version last written to Redis (None: write it whole next tick).
    published: Option<u64>,
    view: Arc<super::ClusterView>,
    /// The PeerJS claims' lease.
    lease_ms: u64,
    /// Commands taken from the queue and not yet known to be carried out: refused with
    /// the rest of the queue when Redis is lost (or a round trip timed out) meanwhile.
    inflight: Vec<BusCmd>,
    /// Sharded pub/sub on the current connection.
    sharded: bool,
    /// Room channels subscribed on the current connection (bounded by the rooms with a
    /// member here).
    rooms: BTreeSet<String>,
    /// Sharded only: a room channel left that the subscriber connection still carries
    /// (see [`Self::unsubscribe_room`]); replaced at the next reconcile.
    stale_shards: bool,
    /// How to open a subscriber connection (kept from the last connect).
    sub_info: Option<(ConnectionInfo, Duration)>,
}

/// One step of a batch of commands, in queue order: a run of consecutive publishes (one
/// pipeline, executed by Redis in this order, so each node's sequence numbers arrive in
/// order), or one other command (its answer is needed before the next).
#[derive(Debug, PartialEq)]
enum Step {
    Publishes(std::ops::Range<usize>),
    One(usize),
}

fn plan(cmds: &[BusCmd]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut i = 0;
    while i < cmds.len() {
        let start = i;
        while i < cmds.len() && matches!(cmds[i], BusCmd::Publish { .. }) {
            i += 1;
        }
        if i > start {
            steps.push(Step::Publishes(start..i));
        } else {
            steps.push(Step::One(i));
            i += 1;
        }
    }
    steps
}

/// A bus channel's Redis name.
fn channel<M: BusMachine>(keys: &Keys, to: &Chan) -> String {
    match to {
        Chan::Room(room) => keys.channel(&format!("{}:{room}", M::CHANNEL)),
        Chan::Node(node) => keys.channel(&format!("{}:node:{node}", M::CHANNEL)),
    }
}

impl<M: BusMachine> SignalBus<M> {
    /// A node's published member list (the rooms' keeps its original name).
    fn members_key(&self, node: &str) -> String {
        if M::CHANNEL == "rooms" {
            self.keys.members(node)
        } else {
            self.keys.members(&format!("{}:{node}", M::CHANNEL))
        }
    }

    pub fn new(
        hub: Arc<Hub<M>>,
        cmds: mpsc::Receiver<BusCmd>,
        node: String,
        keys: Keys,
        view: Arc<super::ClusterView>,
        lease_ms: u64,
    ) -> SignalBus<M> {
        SignalBus {
            hub,
            cmds,
            node,
            keys,
            sub: None,
            pushes: None,
            known: BTreeSet::new(),
            published: None,
            view,
            lease_ms,
            inflight: Vec::new(),
            sharded: false,
            rooms: BTreeSet::new(),
            stale_shards: false,
            sub_info: None,
        }
    }

    /// `SUBSCRIBE`-like command `verb` ("SUBSCRIBE" or "UNSUBSCRIBE") on `chan`, sharded
    /// when the connection is. One channel per command: its one confirmation is the reply.
    async fn subscription(&mut self, verb: &str, chan: &str) -> redis::RedisResult<()> {
        let Some(c) = self.sub.as_mut() else {
            return Err((redis::ErrorKind::Io, "no subscriber connection").into());
        };
        let verb = if self.sharded {
            format!("S{verb}")
        } else {
            verb.to_string()
        };
        redis::cmd(&verb).arg(chan).query_async::<()>(c).await
    }

    /// Listens to `room`'s channel (once per connection).
    async fn subscribe_room(&mut self, room: &str) -> redis::RedisResult<()> {
        let chan = channel::<M>(&self.keys, &Chan::Room(room.to_string()));
        if self.rooms.insert(room.to_string()) {
            self.subscription("SUBSCRIBE", &chan).await?;
            self.view
                .stats
                .bus_room_channels
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stops listening to `room`'s channel. Sharded, no `SUNSUBSCRIBE` is sent: the redis
    /// crate (1.8) does not take its confirmation push as the command's reply on a
    /// multiplexed connection (redis-rs issue 2533), so every later reply would go to the
    /// wrong request until a timeout drops the connection. Instead the subscriber
    /// connection is replaced by one carrying only the wanted channels at the next
    /// reconcile; until then the room's traffic still arrives and is ignored by the
    /// machine (no member here).
    async fn unsubscribe_room(&mut self, room: &str) -> redis::RedisResult<()> {
        let chan = channel::<M>(&self.keys, &Chan::Room(room.to_string()));
        if self.rooms.remove(room) {
            self.view
                .stats
                .bus_room_channels
                .fetch_sub(1, Ordering::Relaxed);
            if self.sharded {
                self.stale_shards = true;
            } else {
                self.subscription("UNSUBSCRIBE", &chan).await?;
            }
        }
        Ok(())
    }

    /// A fresh subscriber connection whose pushes go to a new bounded queue.
    async fn open_subscriber(
        &self,
    ) -> redis::RedisResult<(MultiplexedConnection, mpsc::Receiver<PushInfo>)> {
        let Some((info, timeout)) = self.sub_info.clone() else {
            return Err((redis::ErrorKind::Io, "no subscriber connection").into());
        };
        let (tx, rx) = mpsc::channel::<PushInfo>(PUSH_QUEUE);
        let dropped = Arc::clone(&self.view.stats.bus_dropped);
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Full queue: the message is dropped here and its receiver sees a gap.
            .set_push_sender(move |p: PushInfo| {
                if tx.try_send(p).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let client = redis::Client::open(info)?;
        let c = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        Ok((c, rx))
    }

    /// Sharded: swaps the subscriber connection for one carrying this node's channel and
    /// the rooms still wanted. The new one subscribes before the old one goes, so nothing
    /// is missed; a message both carry is a duplicate, dropped by its sequence number.
    async fn replace_subscriber(&mut self) -> redis::RedisResult<()> {
        let (c, rx) = self.open_subscriber().await?;
        let old = (self.sub.replace(c), self.pushes.replace(rx));
        self.stale_shards = false;
        let own = channel::<M>(&self.keys, &Chan::Node(self.node.clone()));
        self.subscription("SUBSCRIBE", &own).await?;
        let rooms: Vec<String> = self.rooms.iter().cloned().collect();
        for room in rooms {
            let chan = channel::<M>(&self.keys, &Chan::Room(room));
            self.subscription("SUBSCRIBE", &chan).await?;
        }
        // Pushes still queued from the old connection are applied before it goes.
        if let (_, Some(mut old_rx)) = old {
            let mut left = Vec::new();
            while let Ok(p) = old_rx.try_recv() {
                left.push(p);
            }
            if !left.is_empty() {
                self.pushes(left);
            }
        }
        Ok(())
    }

    /// Brings the room subscriptions in line with the machine's rooms (each tick): a
    /// Subscribe or Unsubscribe the hub could not queue is made up for here.
    pub async fn reconcile_rooms(
        &mut self,
        c: &mut MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let want: BTreeSet<String> = self.hub.with_core(|m| m.bus_rooms()).into_iter().collect();
        let extra: Vec<String> = self.rooms.difference(&want).cloned().collect();
        for room in extra {
            self.unsubscribe_room(&room).await?;
        }
        let missing: Vec<String> = want.difference(&self.rooms).cloned().collect();
        for room in missing {
            self.command(c, BusCmd::Subscribe { room }).await?;
        }
        if self.stale_shards {
            self.replace_subscriber().await?;
        }
        Ok(())
    }

    /// Forgets the current connection's room subscriptions (for the gauge).
    fn clear_rooms(&mut self) {
        let n = self.rooms.len() as u64;
        self.rooms.clear();
        self.view
            .stats
            .bus_room_channels
            .fetch_sub(n, Ordering::Relaxed);
    }

    /// After a (re)connect: subscribe on a connection of its own, then forget what was
    /// known so every live node is resynchronised at the next tick.
    pub async fn connected(
        &mut self,
        info: &ConnectionInfo,
        timeout: Duration,
        sharded: bool,
    ) -> redis::RedisResult<()> {
        self.sub_info = Some((info.clone(), timeout));
        let (c, rx) = self.open_subscriber().await?;
        self.clear_rooms();
        self.stale_shards = false;
        self.sub = Some(c);
        self.pushes = Some(rx);
        self.sharded = sharded;
        let own = channel::<M>(&self.keys, &Chan::Node(self.node.clone()));
        self.subscription("SUBSCRIBE", &own).await?;
        for room in self.hub.with_core(|m| m.bus_rooms()) {
            self.subscribe_room(&room).await?;
        }
        self.known.clear();
        self.published = None;
        self.hub.drive(|m| m.bus_state(true));
        Ok(())
    }

    /// Redis lost: cross-node signals are refused until it is back.
    pub fn lost(&mut self) {
        self.sub = None;
        self.pushes = None;
        self.clear_rooms();
        self.hub.drive(|m| m.bus_state(false));
        // Nothing can be published meanwhile: what is queued (and what was in flight, maybe
        // published or not) is refused (the machine tells the clients concerned), taken
        // first so that refusals cannot queue more here.
        let mut queued = std::mem::take(&mut self.inflight);
        while let Ok(cmd) = self.cmds.try_recv() {
            queued.push(cmd);
        }
        for cmd in queued {
            self.view.stats.bus_dropped.fetch_add(1, Ordering::Relaxed);
            self.hub
                .drive(|m| m.bus_refused(cmd, std::time::Instant::now()));
        }
    }

    /// Adds this node's member list (whole when it changed) and its renewal to `p`.
    /// Returns the version written, to confirm after the pipeline succeeded.
    pub fn add_members(&self, p: &mut redis::Pipeline, lease_ms: u64) -> u64 {
        let key = self.members_key(&self.node);
        let (version, members) = self.hub.with_core(|m| m.bus_members());
        if M::CHANNEL == "peerjs" {
            // The claims are renewed (and rewritten after Redis lost them) by this node.
            for m in &members {
                p.cmd("SET")
                    .arg(self.keys.peerjs_id(&m.id))
                    .arg(&self.node)
                    .arg("PX")
                    .arg(lease_ms)
                    .ignore();
            }
        }
        if self.published != Some(version) {
            p.cmd("DEL").arg(&key).ignore();
            if !members.is_empty() {
                let mut h = redis::cmd("HSET");
                h.arg(&key);
                for m in &members {
                    h.arg(&m.id)
                        .arg(serde_json::to_string(m).unwrap_or_default());
                }
                p.add_command(h).ignore();
            }
        }
        p.cmd("PEXPIRE").arg(&key).arg(lease_ms).ignore();
        version
    }

    pub fn members_written(&mut self, version: u64) {
        self.published = Some(version);
    }

    /// After the registry read: nodes new to us are resynchronised, nodes gone (crashed or
    /// stopped) leave every room.
    pub async fn nodes_seen(
        &mut self,
        c: &mut MultiplexedConnection,
        ids: &[String],
    ) -> redis::RedisResult<()> {
        let now: BTreeSet<String> = ids.iter().filter(|n| **n != self.node).cloned().collect();
        for gone in self.known.difference(&now) {
            self.hub.drive(|m| m.bus_snapshot(gone, None, &[]));
        }
        let new: Vec<String> = now.difference(&self.known).cloned().collect();
        for n in new {
            self.resync(c, &n, None).await?;
        }
        self.known = now;
        Ok(())
    }

    /// Re-reads `node`'s member list (its members in `room` only, when given).
    async fn resync(
        &mut self,
        c: &mut MultiplexedConnection,
        node: &str,
        room: Option<&str>,
    ) -> redis::RedisResult<()> {
        let raw: FxHashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.members_key(node))
            .query_async(c)
            .await?;
        self.view.stats.bus_resyncs.fetch_add(1, Ordering::Relaxed);
        let mut members: Vec<Member> = Vec::with_capacity(raw.len());
        for (field, j) in &raw {
            match serde_json::from_str(j) {
                Ok(m) => members.push(m),
                Err(e) => {
                    let key = format!("{} {field}", self.members_key(node));
                    self.view.stats.bad_record(BadRecord::Member, &key, &e);
                }
            }
        }
        self.hub.drive(|m| m.bus_snapshot(node, room, &members));
        Ok(())
    }

    /// Carries out a batch of commands from the room machine, in order: each run of
    /// publishes as one pipeline. On an error (or when the caller's timeout drops this
    /// future) the batch stays in `inflight` for [`SignalBus::lost`] to refuse.
    pub async fn commands(
        &mut self,
        c: &mut MultiplexedConnection,
        cmds: Vec<BusCmd>,
    ) -> redis::RedisResult<()> {
        self.inflight = cmds;
        let steps = plan(&self.inflight);
        for step in steps {
            match step {
                Step::Publishes(r) => {
                    let n = r.len() as u64;
                    let mut p = redis::pipe();
                    self.add_directory(&mut p, &self.inflight[r.clone()]);
                    let verb = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
                    let ts = super::driver::unix_us();
                    for cmd in &self.inflight[r] {
                        let BusCmd::Publish { to, ep, seq, ev } = cmd else {
                            continue;
                        };
                        let env = Envelope {
                            node: self.node.clone(),
                            ep: *ep,
                            seq: *seq,
                            ev: ev.clone(),
                            ts,
                        };
                        let text = serde_json::to_string(&env).unwrap_or_default();
                        p.cmd(verb)
                            .arg(channel::<M>(&self.keys, to))
                            .arg(text)
                            .ignore();
                    }
                    p.query_async::<()>(c).await?;
                    self.view
                        .stats
                        .bus_published
                        .fetch_add(n, Ordering::Relaxed);
                }
                Step::One(i) => {
                    let cmd = self.inflight[i].clone();
                    self.command(c, cmd).await?;
                }
            }
        }
        self.inflight.clear();
        Ok(())
    }

    /// Adds to `p` the member-list entries the membership events among `cmds` change,
    /// as they are now (published before the events, so a node reading the list after
    /// subscribing sees every member whose join it did not hear).
    fn add_directory(&self, p: &mut redis::Pipeline, cmds: &[BusCmd]) {
        let ids: Vec<&str> = cmds
            .iter()
            .filter_map(|c| match c {
                BusCmd::Publish { ev, .. } => ev.member(),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        let key = self.members_key(&self.node);
        let entries: Vec<(&str, Option<Member>)> = self
            .hub
            .with_core(|m| ids.iter().map(|id| (*id, m.bus_member(id))).collect());
        for (id, m) in entries {
            match m {
                Some(m) => {
                    let json = serde_json::to_string(&m).unwrap_or_default();
                    p.cmd("HSET").arg(&key).arg(id).arg(json).ignore();
                }
                None => {
                    p.cmd("HDEL").arg(&key).arg(id).ignore();
                }
            }
        }
        p.cmd("PEXPIRE").arg(&key).arg(self.lease_ms).ignore();
    }

    /// Carries out one command other than a publish.
    async fn command(
        &mut self,
        c: &mut MultiplexedConnection,
        cmd: BusCmd,
    ) -> redis::RedisResult<()> {
        match cmd {
            BusCmd::Publish { .. } => Ok(()),
            BusCmd::Resync { node, room } => {
                if self.known.contains(&node) {
                    self.resync(c, &node, room.as_deref()).await?;
                }
                Ok(())
            }
            BusCmd::Subscribe { room } => {
                // Listen first, then read: a join published meanwhile is either heard or
                // already in its node's list.
                self.subscribe_room(&room).await?;
                let nodes: Vec<String> = self.known.iter().cloned().collect();
                for n in nodes {
                    self.resync(c, &n, Some(&room)).await?;
                }
                Ok(())
            }
            BusCmd::Unsubscribe { room } => self.unsubscribe_room(&room).await,
            BusCmd::Claim { id } => {
                let key = self.keys.peerjs_id(&id);
                let lease_ms = self.lease_ms;
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms)
                    .query_async(c)
                    .await?;
                // Not set: ours already (a claim renewed across a reconnect) or another's.
                let ok = set.is_some()
                    || redis::cmd("GET")
                        .arg(&key)
                        .query_async::<Option<String>>(c)
                        .await?
                        .is_some_and(|n| n == self.node);
                self.hub.drive(|m| m.claim_result(&id, ok));
                Ok(())
            }
            BusCmd::Release { id } => {
                redis::cmd("EVAL")
                    .arg(RELEASE_LUA)
                    .arg(1)
                    .arg(self.keys.peerjs_id(&id))
                    .arg(&self.node)
                    .query_async::<i64>(c)
                    .await?;
                Ok(())
            }
        }
    }

    /// A batch of pushes from the subscriber connection, applied under one lock; false
    /// when the subscriber connection closed (the pushes before it are applied).
    pub fn pushes(&mut self, batch: Vec<PushInfo>) -> bool {
        let mut open = true;
        let mut events = Vec::with_capacity(batch.len());
        for p in batch {
            match p.kind {
                PushKind::Message | PushKind::SMessage => {
                    let env = match p.data.get(1).map(decode) {
                        Some(Ok(env)) => env,
                        Some(Err(e)) => {
                            let chan = match p.data.first() {
                                Some(redis::Value::BulkString(b)) => {
                                    String::from_utf8_lossy(b).into_owned()
                                }
                                _ => String::new(),
                            };
                            let stats = &self.view.stats;
                            stats.bad_record(BadRecord::BusMessage, &chan, &e);
                            continue;
                        }
                        None => continue,
                    };
                    if env.node != self.node {
                        self.view.stats.observe_latency(env.ts);
                        events.push(env);
                    }
                }
                // The subscriber connection closed: reconnect.
                PushKind::Disconnection => {
                    open = false;
                    break;
                }
                _ => {}
            }
        }
        if !events.is_empty() {
            self.view
                .stats
                .bus_received
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            let now = std::time::Instant::now();
            self.hub.drive(|m| {
                let mut outs = Vec::new();
                for env in events {
                    outs.extend(m.bus_event(&env.node, env.ep, env.seq, env.ev, now));
                }
                outs
            });
        }
        open
    }

    /// The next pushes or commands, whichever come first, with whatever more of the same
    /// kind is already queued, up to [`BATCH`] (None: the subscriber is gone).
    pub async fn next(&mut self) -> Option<Input> {
        let pushes = self.pushes.as_mut()?;
        tokio::select! {
            p = pushes.recv() => p.map(|p| Input::Pushes(drain(pushes, p))),
            c = self.cmds.recv() => c.map(|c| Input::Cmds(drain(&mut self.cmds, c))),
        }
    }
}

/// `first` and what else `rx` holds now, up to [`BATCH`].
fn drain<T>(rx: &mut mpsc::Receiver<T>, first: T) -> Vec<T> {
    let mut v = Vec::with_capacity(rx.len().min(BATCH - 1) + 1);
    v.push(first);
    while v.len() < BATCH {
        match rx.try_recv() {
            Ok(x) => v.push(x),
            Err(_) => break,
        }
    }
    v
}

/// A bus message's envelope, read straight from the push's bytes.
fn decode(payload: &redis::Value) -> Result<Envelope, String> {
    match payload {
        redis::Value::BulkString(b) => serde_json::from_slice(b).map_err(|e| e.to_string()),
        redis::Value::SimpleString(s) => serde_json::from_str(s).map_err(|e| e.to_string()),
        other => Err(format!("not a string: {other:?}")),
    }
}

pub(super) enum Input {
    Pushes(Vec<PushInfo>),
    Cmds(Vec<BusCmd>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::bus::BusEvent;

    fn publish(seq: u64) -> BusCmd {
        BusCmd::Publish {
            to: Chan::Room("room:a".into()),
            ep: 1,
            seq,
            ev: BusEvent::Left {
                room: "room:a".into(),
                id: format!("p{seq}"),
            },
        }
    }

    #[test]
    fn plan_keeps_queue_order_with_publishes_grouped() {
        let cmds = vec![
            publish(1),
            publish(2),
            publish(3),
            BusCmd::Claim { id: "x".into() },
            publish(4),
            BusCmd::Resync {
                node: "b".into(),
                room: None,
            },
            BusCmd::Release { id: "x".into() },
            publish(5),
            publish(6),
        ];
        assert_eq!(
            plan(&cmds),
            vec![
                Step::Publishes(0..3),
                Step::One(3),
                Step::Publishes(4..5),
                Step::One(5),
                Step::One(6),
                Step::Publishes(7..9),
            ]
        );
        assert_eq!(plan(&[]), Vec::<Step>::new());
    }

    #[tokio::test]
    async fn drain_takes_what_is_queued_in_order_up_to_the_batch() {
        let (tx, mut rx) = mpsc::channel(BATCH * 2);
        for i in 1..=(BATCH + 10) {
            tx.try_send(i).unwrap();
        }
        let first = rx.recv().await.unwrap();
        let a = drain(&mut rx, first);
        assert_eq!(a, (1..=BATCH).collect::<Vec<_>>());
        let first = rx.recv().await.unwrap();
        let b = drain(&mut rx, first);
        assert_eq!(b, (BATCH + 1..=BATCH + 10).collect::<Vec<_>>());
    }

    #[test]
    fn decode_reads_bulk_bytes_and_refuses_garbage() {
        let env = Envelope {
            node: "a".into(),
            ep: 3,
            seq: 7,
            ev: BusEvent::Left {
                room: "room:a".into(),
                id: "p".into(),
            },
            ts: 1,
        };
        let bytes = serde_json::to_vec(&env).unwrap();
        assert_eq!(decode(&redis::Value::BulkString(bytes)), Ok(env));
        assert!(decode(&redis::Value::BulkString(b"{nope".to_vec())).is_err());
        assert!(decode(&redis::Value::Int(3)).is_err());
    }
}
