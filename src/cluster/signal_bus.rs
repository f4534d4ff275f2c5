//! The Redis side of the cluster bus (`crate::signal::bus`), one instance per
//! [`BusMachine`] (the native rooms, the PeerJS realm): a subscriber connection on
//! `{prefix}bus:{CHANNEL}` whose pushes (RESP3) land in a bounded queue, publishing the
//! machine's [`BusCmd`]s, this node's member list as a lease (`{prefix}members:{node}`,
//! hash peer id → JSON), resyncs of other nodes from theirs, and the PeerJS id claims
//! (`SET NX PX`, renewed each tick, compare-and-delete on release).
//!
//! Bounded everywhere: the machine's commands and the pushes each go through a fixed-size
//! queue; what does not fit is dropped and shows up as a sequence gap, which the receiver
//! repairs by reading the publisher's member list (and a dropped command's client is told:
//! `Machine::bus_refused`). While Redis is away, commands are
//! dropped (the machine refuses cross-node signals meanwhile) and the member list is
//! rewritten whole on reconnect.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, PushInfo, PushKind};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use super::registry::Keys;
use crate::signal::bus::{BusCmd, BusMachine, Envelope, Member};
use crate::signal::driver::Hub;

/// Pushes (incoming bus messages) queued before the driver takes them.
const PUSH_QUEUE: usize = 8192;
/// Room machine commands queued before the driver takes them.
pub const CMD_QUEUE: usize = 8192;

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
}

fn channel<M: BusMachine>(keys: &Keys) -> String {
    keys.channel(M::CHANNEL)
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
        }
    }

    /// After a (re)connect: subscribe on a connection of its own, then forget what was
    /// known so every live node is resynchronised at the next tick.
    pub async fn connected(
        &mut self,
        info: &ConnectionInfo,
        timeout: Duration,
    ) -> redis::RedisResult<()> {
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
        let client = redis::Client::open(info.clone())?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        c.subscribe(channel::<M>(&self.keys)).await?;
        self.sub = Some(c);
        self.pushes = Some(rx);
        self.known.clear();
        self.published = None;
        self.hub.drive(|m| m.bus_state(true));
        Ok(())
    }

    /// Redis lost: cross-node signals are refused until it is back.
    pub fn lost(&mut self) {
        self.sub = None;
        self.pushes = None;
        self.hub.drive(|m| m.bus_state(false));
        // Nothing can be published meanwhile: what is queued is refused (the machine tells
        // the clients concerned), taken first so that refusals cannot queue more here.
        let mut queued = Vec::new();
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
            self.hub.drive(|m| m.bus_snapshot(gone, &[]));
        }
        let new: Vec<String> = now.difference(&self.known).cloned().collect();
        for n in new {
            self.resync(c, &n).await?;
        }
        self.known = now;
        Ok(())
    }

    async fn resync(
        &mut self,
        c: &mut MultiplexedConnection,
        node: &str,
    ) -> redis::RedisResult<()> {
        let raw: FxHashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.members_key(node))
            .query_async(c)
            .await?;
        self.view.stats.bus_resyncs.fetch_add(1, Ordering::Relaxed);
        let members: Vec<Member> = raw
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        self.hub.drive(|m| m.bus_snapshot(node, &members));
        Ok(())
    }

    /// Carries out one command from the room machine.
    pub async fn command(
        &mut self,
        c: &mut MultiplexedConnection,
        cmd: BusCmd,
    ) -> redis::RedisResult<()> {
        match cmd {
            BusCmd::Publish { seq, ev } => {
                let env = Envelope {
                    node: self.node.clone(),
                    seq,
                    ev,
                    ts: super::driver::unix_us(),
                };
                let text = serde_json::to_string(&env).unwrap_or_default();
                redis::cmd("PUBLISH")
                    .arg(channel::<M>(&self.keys))
                    .arg(text)
                    .query_async::<i64>(c)
                    .await?;
                self.view
                    .stats
                    .bus_published
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            BusCmd::Resync { node } => {
                if self.known.contains(&node) {
                    self.resync(c, &node).await?;
                }
                Ok(())
            }
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

    /// One push from the subscriber connection.
    pub fn push(&mut self, p: PushInfo) -> bool {
        match p.kind {
            PushKind::Message => {
                let Some(payload) = p.data.get(1) else {
                    return true;
                };
                let Ok(text) = redis::from_redis_value_ref::<String>(payload) else {
                    return true;
                };
                let Ok(env) = serde_json::from_str::<Envelope>(&text) else {
                    tracing::debug!("cluster: unreadable bus message ignored");
                    return true;
                };
                if env.node != self.node {
                    self.view.stats.bus_received.fetch_add(1, Ordering::Relaxed);
                    self.view.stats.observe_latency(env.ts);
                    self.hub.drive(|m| m.bus_event(&env.node, env.seq, env.ev));
                }
                true
            }
            // The subscriber connection closed: reconnect.
            PushKind::Disconnection => false,
            _ => true,
        }
    }

    /// The next push or command, whichever comes first (None: the subscriber is gone).
    pub async fn next(&mut self) -> Option<Input> {
        let pushes = self.pushes.as_mut()?;
        tokio::select! {
            p = pushes.recv() => p.map(Input::Push),
            c = self.cmds.recv() => c.map(Input::Cmd),
        }
    }
}

pub(super) enum Input {
    Push(PushInfo),
    Cmd(BusCmd),
}
