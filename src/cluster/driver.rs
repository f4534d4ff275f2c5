//! The cluster driver: one task that owns the Redis connection. Each tick (a third of the
//! lease, at most a second) it announces this node's record, writes the quota leases that
//! changed (renewing the rest), and reads the live nodes and their quota counts into the
//! snapshots the faces read. A user's quota lease has two ends: the node's (the hashes
//! expire one lease after the node stops renewing them: a crashed node frees its users'
//! quota within a lease) and the user's own (the deadline each Allocate and Refresh sets to
//! the allocation's expiry: other nodes stop counting the user when it passes). On any Redis error it drops the connection, says so once,
//! clears the remote snapshot (local quota applies, `/api/ice` names this node) and
//! reconnects with capped exponential backoff; the first tick after a reconnect rewrites
//! this node's record and leases whole, so a Redis restarted empty is repopulated within
//! one tick.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::ConnectionInfo;
use rustc_hash::FxHashMap;

use super::registry::{self, Keys, NodeRecord};
use super::signal_bus::{Input, SignalBus};
use super::{Advertised, BadRecord, ClusterView, LoadFn};
use crate::signal::bus::BusMachine;
use crate::signal::peerjs::PeerJsService;
use crate::signal::rooms::RoomService;
use crate::turn::cluster_hook::ClusterHook;

/// One Redis round trip (connect, a pipeline) waits at most this long.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between reconnects; shorter with a short lease (a third of it), so a Redis
/// restarted empty is repopulated within one lease.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Local per-user allocation counts (`None`: every user; else these users).
pub type CountsFn = Box<dyn Fn(Option<&[String]>) -> Vec<(String, u32)> + Send + Sync>;

pub(super) struct Driver {
    pub info: ConnectionInfo,
    /// `redis_url` without credentials, for the log.
    pub url: String,
    pub keys: Keys,
    pub lease: Duration,
    pub advertised: Advertised,
    pub max_allocations: u32,
    pub max_relay_bytes_per_sec: u64,
    /// `cluster.sharded_pubsub`: use SPUBLISH/SSUBSCRIBE when the server has them.
    pub sharded_pubsub: bool,
    pub view: Arc<ClusterView>,
    pub hook: Arc<ClusterHook>,
    pub wake: Arc<tokio::sync::Notify>,
    pub load: LoadFn,
    pub counts: CountsFn,
    /// Native rooms across nodes (when the HTTP face runs).
    pub bus: Option<SignalBus<RoomService>>,
    /// PeerJS ids and messages across nodes (when the HTTP face runs).
    pub peerjs: Option<SignalBus<PeerJsService>>,
}

/// The next bus input, or never when signaling is not on the bus.
async fn next_input<M: BusMachine>(bus: &mut Option<SignalBus<M>>) -> Option<Input> {
    match bus {
        Some(b) => b.next().await,
        None => std::future::pending().await,
    }
}

pub(super) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Per-tick state kept across ticks.
#[derive(Default)]
struct TickState {
    /// Rewrite the record and every lease whole (after a (re)connect or a lost key).
    rewrite: bool,
    last_bytes: Option<(Instant, u64)>,
}

/// One push or command for a bus; false when its connection is gone.
async fn bus_input<M: BusMachine>(
    b: &mut SignalBus<M>,
    c: &mut MultiplexedConnection,
    input: Option<Input>,
) -> bool {
    match input {
        Some(Input::Pushes(p)) => b.pushes(p),
        Some(Input::Cmds(cmds)) => matches!(
            tokio::time::timeout(IO_TIMEOUT, b.commands(c, cmds)).await,
            Ok(Ok(()))
        ),
        None => false,
    }
}

impl Driver {
    fn backoff_max(&self) -> Duration {
        BACKOFF_MAX.min(self.lease / 3).max(BACKOFF_MIN)
    }

    fn tick_every(&self) -> Duration {
        (self.lease / 3).min(Duration::from_secs(1))
    }

    pub async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let mut conn: Option<MultiplexedConnection> = None;
        let mut backoff = BACKOFF_MIN;
        // Down until the first connect; the first failure is logged like an outage.
        let mut outage_logged = false;
        let mut ever_up = false;
        let mut st = TickState {
            rewrite: true,
            last_bytes: None,
        };
        loop {
            if conn.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        self.view.stats.connects.fetch_add(1, Ordering::Relaxed);
                        if ever_up {
                            tracing::info!(redis = %self.url, "cluster: Redis reachable again; re-announcing this node");
                        } else {
                            tracing::info!(redis = %self.url, "cluster: connected to Redis");
                        }
                        ever_up = true;
                        outage_logged = false;
                        backoff = BACKOFF_MIN;
                        st.rewrite = true;
                        conn = Some(c);
                    }
                    Err(e) => {
                        self.lost(&e, &mut outage_logged);
                        if self.sleep_or_stop(jitter(backoff), &mut stop).await {
                            return;
                        }
                        backoff = (backoff * 2).min(self.backoff_max());
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match tokio::time::timeout(IO_TIMEOUT, self.tick(c, &mut st)).await {
                Ok(Ok(())) => self.view.stats.redis_up.store(true, Ordering::Relaxed),
                Ok(Err(e)) => {
                    conn = None;
                    self.lost(&e.to_string(), &mut outage_logged);
                    continue;
                }
                Err(_) => {
                    conn = None;
                    self.lost("no answer in time", &mut outage_logged);
                    continue;
                }
            }
            // Between ticks: bus traffic, a wake-up (drain) or the stop.
            let deadline = tokio::time::Instant::now() + self.tick_every();
            loop {
                let (input, pj) = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.wake.notified() => break,
                    _ = &mut stop => {
                        if let Some(c) = conn.as_mut() {
                            self.withdraw(c).await;
                        }
                        return;
                    }
                    i = next_input(&mut self.bus) => (i, false),
                    i = next_input(&mut self.peerjs) => (i, true),
                };
                let Some(c) = conn.as_mut() else { break };
                let ok = if pj {
                    match self.peerjs.as_mut() {
                        Some(b) => bus_input(b, c, input).await,
                        None => break,
                    }
                } else {
                    match self.bus.as_mut() {
                        Some(b) => bus_input(b, c, input).await,
                        None => break,
                    }
                };
                if !ok {
                    conn = None;
                    self.lost("bus connection lost", &mut outage_logged);
                    break;
                }
            }
        }
    }

    /// A command connection, and the bus subscription when signaling is on.
    async fn connect(&mut self) -> Result<MultiplexedConnection, String> {
        let c = match tokio::time::timeout(IO_TIMEOUT, super::conn::connect(&self.info, IO_TIMEOUT))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connect timed out".into()),
        };
        let mut c = c;
        let sharded = self.sharded_pubsub && has_sharded_pubsub(&mut c).await?;
        self.view
            .stats
            .bus_sharded
            .store(sharded, Ordering::Relaxed);
        if let Some(b) = self.bus.as_mut() {
            match tokio::time::timeout(IO_TIMEOUT, b.connected(&self.info, IO_TIMEOUT, sharded))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("subscribe timed out".into()),
            }
        }
        if let Some(b) = self.peerjs.as_mut() {
            match tokio::time::timeout(IO_TIMEOUT, b.connected(&self.info, IO_TIMEOUT, sharded))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("subscribe timed out".into()),
            }
        }
        Ok(c)
    }

    /// Waits `d`; true when asked to stop meanwhile.
    async fn sleep_or_stop(
        &self,
        d: Duration,
        stop: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop => true,
        }
    }

    /// Redis is unreachable: one log line per outage, the metric, and the snapshots cleared
    /// so every face works alone (local quota, this node's own URLs). Dirty quota users are
    /// dropped: the next connect rewrites the leases whole, so nothing piles up meanwhile.
    fn lost(&mut self, why: &str, logged: &mut bool) {
        if let Some(b) = self.bus.as_mut() {
            b.lost();
        }
        if let Some(b) = self.peerjs.as_mut() {
            b.lost();
        }
        self.view.stats.redis_up.store(false, Ordering::Relaxed);
        self.view.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.hook.set_remote(FxHashMap::default());
        self.hook.set_alternates(Default::default());
        self.view.set_nodes(Vec::new(), true);
        let _ = self.hook.take_dirty();
        if !*logged {
            *logged = true;
            tracing::warn!(
                redis = %self.url,
                error = why,
                "cluster: Redis unreachable; this node serves its own peers and allocations, \
                 the local user quota applies, cross-node requests are refused; reconnecting \
                 with backoff"
            );
        }
    }

    fn record(&self, st: &mut TickState) -> NodeRecord {
        let load = (self.load)();
        let now = Instant::now();
        let rate = match st.last_bytes {
            Some((t, b)) if now > t => {
                let secs = now.duration_since(t).as_secs_f64();
                (load.relayed_bytes.saturating_sub(b) as f64 / secs) as u64
            }
            _ => 0,
        };
        st.last_bytes = Some((now, load.relayed_bytes));
        let a = &self.advertised;
        NodeRecord {
            id: self.view.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            turn_host: a.turn_host.clone(),
            turn_port: a.turn_port,
            turns_port: a.turns_port,
            turn_addr: a.turn_addr,
            turns_addr: a.turns_addr,
            tls_domain: a.tls_domain.clone(),
            http_url: a.http_url.clone(),
            allocations: load.allocations,
            max_allocations: self.max_allocations,
            relay_bytes_per_sec: rate,
            max_relay_bytes_per_sec: self.max_relay_bytes_per_sec,
            signal_peers: load.signal_peers,
            draining: load.draining,
            updated_unix_ms: unix_ms(),
        }
    }

    /// One announce-and-read round: two pipelines.
    async fn tick(
        &mut self,
        c: &mut MultiplexedConnection,
        st: &mut TickState,
    ) -> redis::RedisResult<()> {
        let rec = self.record(st);
        let self_healthy = rec.healthy();
        let id = &self.view.node_id;
        let now = rec.updated_unix_ms;
        let lease_ms = self.lease.as_millis() as u64;
        let json = serde_json::to_string(&rec).unwrap_or_default();
        let quota_key = self.keys.quota(id);
        let lease_key = self.keys.quota_lease(id);
        let deadline = |u: &str| {
            let now_i = Instant::now();
            self.hook.lease(u).map_or(now + lease_ms, |t| {
                now + t.saturating_duration_since(now_i).as_millis() as u64
            })
        };

        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(self.keys.node(id))
            .arg(json)
            .arg("PX")
            .arg(lease_ms)
            .ignore();
        p.cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(now + lease_ms)
            .arg(id)
            .ignore();
        p.cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.nodes())
            .arg("-inf")
            .arg(now)
            .ignore();
        let stats = &self.view.stats;
        let rewrite = st.rewrite;
        if rewrite {
            // Whole: the dirty marks taken so far are covered by the full copy.
            let _ = self.hook.take_dirty();
            let all = (self.counts)(None);
            self.hook
                .retain_leases(&all.iter().map(|(u, _)| u.as_str()).collect());
            p.cmd("DEL").arg(&quota_key).ignore();
            p.cmd("DEL").arg(&lease_key).ignore();
            if !all.is_empty() {
                let mut h = redis::cmd("HSET");
                h.arg(&quota_key);
                let mut z = redis::cmd("ZADD");
                z.arg(&lease_key);
                for (u, n) in &all {
                    h.arg(u).arg(*n);
                    z.arg(deadline(u)).arg(u);
                }
                p.add_command(h).ignore();
                p.add_command(z).ignore();
                p.cmd("PEXPIRE").arg(&quota_key).arg(lease_ms).ignore();
                p.cmd("PEXPIRE").arg(&lease_key).arg(lease_ms).ignore();
            }
            stats.quota_rewrites.fetch_add(1, Ordering::Relaxed);
        } else {
            let dirty = self.hook.take_dirty();
            if !dirty.is_empty() {
                for (u, n) in (self.counts)(Some(&dirty)) {
                    if n == 0 {
                        self.hook.forget_lease(&u);
                        p.cmd("HDEL").arg(&quota_key).arg(&u).ignore();
                        p.cmd("ZREM").arg(&lease_key).arg(&u).ignore();
                    } else {
                        p.cmd("HSET").arg(&quota_key).arg(&u).arg(n).ignore();
                        p.cmd("ZADD")
                            .arg(&lease_key)
                            .arg(deadline(&u))
                            .arg(&u)
                            .ignore();
                    }
                }
                stats
                    .quota_writes
                    .fetch_add(dirty.len() as u64, Ordering::Relaxed);
            }
        }
        // Renewal; 0 means the hash is gone (Redis restarted empty, or no users): then the
        // next tick rewrites it whole if this node has users.
        let members = self.bus.as_ref().map(|b| b.add_members(&mut p, lease_ms));
        let pj_members = self
            .peerjs
            .as_ref()
            .map(|b| b.add_members(&mut p, lease_ms));
        p.cmd("PEXPIRE").arg(&lease_key).arg(lease_ms).ignore();
        p.cmd("PEXPIRE").arg(&quota_key).arg(lease_ms);
        p.cmd("ZRANGE").arg(self.keys.nodes()).arg(0).arg(-1);
        let (renewed, ids): (i64, Vec<String>) = p.atomic().query_async(c).await?;
        if let (Some(b), Some(v)) = (self.bus.as_mut(), members) {
            b.members_written(v);
        }
        if let (Some(b), Some(v)) = (self.peerjs.as_mut(), pj_members) {
            b.members_written(v);
        }
        stats.quota_renewals.fetch_add(1, Ordering::Relaxed);
        st.rewrite = renewed == 0 && !(self.counts)(None).is_empty();

        // The live nodes' records and the others' quota counts.
        let mut p = redis::pipe();
        let others: Vec<&String> = ids.iter().filter(|n| *n != id).collect();
        p.cmd("MGET");
        for n in &ids {
            p.arg(self.keys.node(n));
        }
        if ids.is_empty() {
            p.arg(self.keys.node(id));
        }
        for n in &others {
            p.cmd("HGETALL").arg(self.keys.quota(n));
            // The users whose lease there has not passed.
            p.cmd("ZRANGEBYSCORE")
                .arg(self.keys.quota_lease(n))
                .arg(now)
                .arg("+inf");
        }
        let mut vals: Vec<redis::Value> = p.query_async(c).await?;
        let records: Vec<Option<String>> = if vals.is_empty() {
            Vec::new()
        } else {
            redis::from_redis_value(vals.remove(0))?
        };
        // MGET answers in the order asked: `ids`, or this node's own key alone.
        let read: Vec<&str> = if ids.is_empty() {
            vec![id.as_str()]
        } else {
            ids.iter().map(String::as_str).collect()
        };
        let mut nodes: Vec<NodeRecord> = Vec::with_capacity(records.len());
        for (n, rec) in read.into_iter().zip(records) {
            match rec.map(|j| serde_json::from_str::<NodeRecord>(&j)) {
                Some(Ok(r)) => nodes.push(r),
                Some(Err(e)) => stats.bad_record(BadRecord::Node, &self.keys.node(n), &e),
                None => {}
            }
        }
        let mut remote: FxHashMap<String, u32> = FxHashMap::default();
        let mut vals = vals.into_iter();
        while let (Some(c), Some(l)) = (vals.next(), vals.next()) {
            let counts: FxHashMap<String, u32> = redis::from_redis_value(c)?;
            let live: rustc_hash::FxHashSet<String> = redis::from_redis_value(l)?;
            for (u, n) in counts {
                if live.contains(&u) {
                    *remote.entry(u).or_insert(0) += n;
                }
            }
        }
        self.hook.set_remote(remote);
        self.hook.set_alternates(registry::alternates(&nodes, id));
        self.view.set_nodes(nodes, self_healthy);
        if let Some(b) = self.bus.as_mut() {
            b.nodes_seen(c, &ids).await?;
            b.reconcile_rooms(c).await?;
        }
        if let Some(b) = self.peerjs.as_mut() {
            b.nodes_seen(c, &ids).await?;
            b.reconcile_rooms(c).await?;
        }
        Ok(())
    }

    /// Graceful stop: this node's record and leases go at once rather than at lease end.
    async fn withdraw(&self, c: &mut MultiplexedConnection) {
        let id = &self.view.node_id;
        let mut p = redis::pipe();
        p.cmd("DEL").arg(self.keys.node(id)).ignore();
        p.cmd("DEL").arg(self.keys.quota(id)).ignore();
        p.cmd("DEL").arg(self.keys.quota_lease(id)).ignore();
        p.cmd("DEL").arg(self.keys.members(id)).ignore();
        p.cmd("ZREM").arg(self.keys.nodes()).arg(id).ignore();
        let r: Result<redis::RedisResult<()>, _> =
            tokio::time::timeout(Duration::from_secs(1), p.query_async(c)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::info!(
                "cluster: could not remove this node's record; it expires with its lease"
            );
        }
    }
}

/// Whether the server knows `SPUBLISH` (Redis 7 and Valkey): `COMMAND INFO` answers nil
/// for a command it does not have.
async fn has_sharded_pubsub(c: &mut MultiplexedConnection) -> Result<bool, String> {
    let mut cmd = redis::cmd("COMMAND");
    cmd.arg("INFO").arg("SPUBLISH");
    match tokio::time::timeout(IO_TIMEOUT, cmd.query_async::<redis::Value>(c)).await {
        Ok(Ok(redis::Value::Array(v))) => Ok(v.first().is_some_and(|x| *x != redis::Value::Nil)),
        Ok(Ok(_)) => Ok(false),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("COMMAND INFO timed out".into()),
    }
}

/// `d` ± 20 %, so nodes that lost Redis together do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random::<f64>() * 0.4 + 0.8;
    d.mul_f64(f)
}
