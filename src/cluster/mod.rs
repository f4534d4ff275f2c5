//! Cluster mode (`[cluster]`, docs/cluster.md): several Tern nodes sharing one Redis act
//! as one service.
//!
//! Owns: the Redis connection and its reconnection (`conn.rs`, `driver.rs`), this node's
//! registry record and the view of the others (`registry.rs`), the per-user quota leases
//! (written from the TURN core's [`crate::turn::cluster_hook::ClusterHook`] snapshot), the
//! steering choice `/api/ice` and ALTERNATE-SERVER consult ([`ClusterView`]), the Redis
//! side of the native rooms' and the PeerJS realm's bus (`signal_bus.rs`: pub/sub,
//! member-list leases, resyncs, PeerJS id claims; the logic itself is in the sans-IO
//! machines, `crate::signal::bus`), and `tern cluster status`
//! (`status.rs`).
//!
//! Must not: run at all without `[cluster]` (the daemon starts nothing of it and installs
//! no hook); put Redis on a packet or request path (the driver is one task on its own
//! thread; the faces read snapshots it refreshes); hold the only copy of a node's truth
//! (each node is authoritative for its own allocations and peers, Redis holds leases that
//! expire with the node); buffer without bound while Redis is away (dirty quota users are
//! a set, rewritten whole on reconnect).

pub mod conn;
mod driver;
pub mod registry;
mod signal_bus;
pub mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::Config;
use crate::turn::cluster_hook::ClusterHook;
pub use driver::CountsFn;
pub use registry::NodeRecord;

/// What this node measures about itself each tick (read by the driver from the faces).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalLoad {
    pub allocations: u32,
    /// Relayed bytes so far, both directions (a counter; the driver takes the rate).
    pub relayed_bytes: u64,
    pub signal_peers: u64,
    pub draining: bool,
}

/// Counters for the metrics face (`tern_cluster_*`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub redis_up: AtomicBool,
    pub nodes: AtomicU64,
    pub connects: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Quota lease writes (a user's count set or removed), renewals and full rewrites.
    pub quota_writes: AtomicU64,
    pub quota_renewals: AtomicU64,
    pub quota_rewrites: AtomicU64,
    /// `/api/ice` and `/api/turn` answers naming another node.
    pub steered_ice: AtomicU64,
    /// Room bus messages published by this node and received from others.
    pub bus_published: AtomicU64,
    pub bus_received: AtomicU64,
    /// Other nodes' member lists re-read (a gap, a reconnect, a new node).
    pub bus_resyncs: AtomicU64,
    /// Room channels this node listens to (the rooms with a member here, the PeerJS realm).
    pub bus_room_channels: AtomicU64,
    /// Sharded pub/sub in use (Redis has it and `cluster.sharded_pubsub` allows).
    pub bus_sharded: AtomicBool,
    /// Bus messages dropped on this node: a full queue, or Redis unreachable.
    pub bus_dropped: Arc<AtomicU64>,
    /// Publish-to-receive time of bus messages from other nodes.
    pub bus_latency: std::sync::Mutex<crate::turn::stats::Histo<{ BUS_LATENCY_BOUNDS.len() }>>,
    /// Records read from Redis that did not decode (skipped), by [`BadRecord`].
    pub bad_records: [AtomicU64; BadRecord::ALL.len()],
    /// When each kind of bad record was last logged ([`ClusterStats::bad_record`]).
    bad_record_logged: std::sync::Mutex<[Option<std::time::Instant>; BadRecord::ALL.len()]>,
}

/// A record read from Redis that does not decode. Another node (an older or newer
/// version, a bug) or a person wrote it; it is skipped, counted
/// (`tern_cluster_bad_records_total{record}`) and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecord {
    /// A node's registry record (`{prefix}node:{id}`), read every tick.
    Node,
    /// An entry of a node's published member list (`{prefix}bus:…:members:{id}`).
    Member,
    /// A bus message's envelope (pub/sub).
    BusMessage,
}

impl BadRecord {
    pub const ALL: [BadRecord; 3] = [BadRecord::Node, BadRecord::Member, BadRecord::BusMessage];

    /// The `record` label.
    pub const fn label(self) -> &'static str {
        match self {
            BadRecord::Node => "node",
            BadRecord::Member => "member",
            BadRecord::BusMessage => "bus_message",
        }
    }
}

/// At most one warning per kind of bad record in this time: a bad registry record is read
/// again every tick until its node rewrites it or its lease ends.
const BAD_RECORD_LOG_EVERY: Duration = Duration::from_secs(60);

/// Upper bounds (seconds) of the cross-node delivery latency histogram.
pub const BUS_LATENCY_BOUNDS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl ClusterStats {
    /// A record at `key` did not decode (`err`): counted, and logged at warn level unless
    /// one of its kind was logged within [`BAD_RECORD_LOG_EVERY`].
    pub fn bad_record(&self, kind: BadRecord, key: &str, err: &dyn std::fmt::Display) {
        let total = self.bad_records[kind as usize].fetch_add(1, Ordering::Relaxed) + 1;
        let now = std::time::Instant::now();
        let mut logged = self
            .bad_record_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let last = &mut logged[kind as usize];
        if last.is_none_or(|t| now.duration_since(t) >= BAD_RECORD_LOG_EVERY) {
            *last = Some(now);
            tracing::warn!(
                record = kind.label(),
                key,
                total,
                "cluster: a record read from Redis does not decode ({err}); skipped \
                 (tern_cluster_bad_records_total counts every one; this is logged once a minute)"
            );
        }
    }

    /// A bus message published at `ts` (Unix µs) arrived now.
    pub fn observe_latency(&self, ts: u64) {
        let now = driver::unix_us();
        if ts == 0 || now < ts {
            return;
        }
        let secs = (now - ts) as f64 / 1e6;
        self.bus_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&BUS_LATENCY_BOUNDS, secs);
    }
}

/// The cluster as the faces see it: the live nodes from the last registry read and this
/// node's own health. Refreshed by the driver; read by the HTTP handlers without IO.
pub struct ClusterView {
    pub node_id: String,
    nodes: RwLock<Arc<Vec<NodeRecord>>>,
    self_healthy: AtomicBool,
    pub stats: ClusterStats,
    /// The native rooms' hub, for its count of bus commands it could not queue.
    rooms: std::sync::OnceLock<Arc<crate::signal::driver::Hub<crate::signal::rooms::RoomService>>>,
}

impl ClusterView {
    pub fn new(node_id: String) -> ClusterView {
        ClusterView {
            node_id,
            nodes: RwLock::new(Arc::new(Vec::new())),
            self_healthy: AtomicBool::new(true),
            stats: ClusterStats::default(),
            rooms: std::sync::OnceLock::new(),
        }
    }

    /// Bus commands the rooms' hub dropped because the driver's queue was full.
    pub fn hub_bus_dropped(&self) -> u64 {
        self.rooms
            .get()
            .map_or(0, |h| h.bus_dropped.load(Ordering::Relaxed))
    }

    /// Live nodes as last read (empty while Redis is unreachable).
    pub fn nodes(&self) -> Arc<Vec<NodeRecord>> {
        Arc::clone(&self.nodes.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn set_nodes(&self, nodes: Vec<NodeRecord>, self_healthy: bool) {
        self.stats
            .nodes
            .store(nodes.len() as u64, Ordering::Relaxed);
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(nodes);
        self.self_healthy.store(self_healthy, Ordering::Relaxed);
    }

    pub fn redis_up(&self) -> bool {
        self.stats.redis_up.load(Ordering::Relaxed)
    }

    /// The node new sessions should use instead of this one, if any: `None` while this
    /// node is healthy (itself first), or when no other node is healthy either.
    pub fn steer(&self, self_draining: bool) -> Option<NodeRecord> {
        if !self_draining && self.self_healthy.load(Ordering::Relaxed) {
            return None;
        }
        let nodes = self.nodes();
        let best = registry::healthy_others(&nodes, &self.node_id)
            .first()
            .map(|n| (*n).clone());
        if best.is_some() {
            self.stats.steered_ice.fetch_add(1, Ordering::Relaxed);
        }
        best
    }
}

/// How this node is reached, for its registry record (from the config and bound ports).
#[derive(Debug, Clone)]
pub struct Advertised {
    pub turn_host: String,
    pub turn_port: u16,
    pub turns_port: Option<u16>,
    pub turn_addr: Option<std::net::SocketAddr>,
    pub turns_addr: Option<std::net::SocketAddr>,
    pub tls_domain: Option<String>,
    pub http_url: String,
}

impl Advertised {
    /// From `cfg` (with `turn.listen` and `tls.listen` holding the bound addresses):
    /// `cluster.advertise_turn_host`, else `api.public_host`, else the first external or
    /// relay IP, else the first TURN listener's IP.
    pub fn from_config(cfg: &Config, turns_port: Option<u16>) -> Advertised {
        let c = &cfg.cluster;
        let t = &cfg.turn;
        let listen_ip = t
            .listen
            .first()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let host = if !c.advertise_turn_host.is_empty() {
            c.advertise_turn_host.clone()
        } else if !cfg.api.public_host.is_empty() {
            cfg.api.public_host.clone()
        } else if let Some(ip) = t
            .external_ip
            .first()
            .or(t.relay_ip.first())
            .copied()
            .or(listen_ip)
        {
            ip.to_string()
        } else {
            String::new()
        };
        let turn_port = t.listen.first().map_or(3478, |a| a.port());
        // ALTERNATE-SERVER needs an address: the host itself, or what it resolves to now.
        let ip = host.parse::<std::net::IpAddr>().ok().or_else(|| {
            use std::net::ToSocketAddrs;
            (host.as_str(), turn_port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| a.ip())
        });
        let is_name = host.parse::<std::net::IpAddr>().is_err() && !host.is_empty();
        Advertised {
            turn_addr: ip.map(|ip| (ip, turn_port).into()),
            turns_addr: ip.zip(turns_port).map(|(ip, p)| (ip, p).into()),
            tls_domain: is_name.then(|| host.clone()),
            turn_host: host,
            turn_port,
            turns_port,
            http_url: c.advertise_http_url.trim_end_matches('/').to_string(),
        }
    }
}

impl Advertised {
    /// This node's `/relay` as a peer on another node reaches it: `advertise_http_url`
    /// with a WebSocket scheme (None without one).
    pub fn relay_url(&self) -> Option<String> {
        let u = &self.http_url;
        let rest = u
            .strip_prefix("https://")
            .map(|r| ("wss://", r))
            .or_else(|| u.strip_prefix("http://").map(|r| ("ws://", r)));
        rest.map(|(scheme, r)| format!("{scheme}{r}/relay"))
    }
}

/// What the driver reads from the running faces each tick.
pub type LoadFn = Box<dyn Fn() -> LocalLoad + Send + Sync>;

/// The running cluster driver: one thread with a single-threaded runtime.
pub struct ClusterService {
    view: Arc<ClusterView>,
    hook: Arc<ClusterHook>,
    wake: Arc<tokio::sync::Notify>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClusterService {
    /// Starts the driver for `cfg.cluster` (which must be enabled). Connection failures are
    /// not errors: the node serves alone and the driver keeps retrying.
    pub fn start(
        cfg: &Config,
        advertised: Advertised,
        load: LoadFn,
        counts: CountsFn,
        rooms: Option<Arc<crate::signal::driver::Hub<crate::signal::rooms::RoomService>>>,
        peerjs: Option<Arc<crate::signal::driver::Hub<crate::signal::peerjs::PeerJsService>>>,
    ) -> Result<ClusterService, crate::config::ConfigError> {
        let info = conn::connection_info(&cfg.cluster, None).map_err(|m| {
            crate::config::ConfigError::Invalid {
                key: "cluster.redis_url".into(),
                message: m,
            }
        })?;
        let id = cfg.cluster.node_id();
        let view = Arc::new(ClusterView::new(id.clone()));
        let hook = Arc::new(ClusterHook::new());
        let wake = Arc::new(tokio::sync::Notify::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let max_allocations = match cfg.cluster.max_allocations {
            0 => cfg.turn.total_quota,
            n => n,
        };
        let lease_ms = u64::from(cfg.cluster.lease_secs) * 1000;
        let relay_url = advertised.relay_url();
        let d = driver::Driver {
            info,
            url: conn::redacted_url(&cfg.cluster.redis_url),
            keys: registry::Keys::new(&cfg.cluster.key_prefix),
            lease: Duration::from_secs(cfg.cluster.lease_secs.into()),
            advertised,
            max_allocations,
            max_relay_bytes_per_sec: cfg.cluster.max_relay_bytes_per_sec,
            sharded_pubsub: cfg.cluster.sharded_pubsub,
            view: Arc::clone(&view),
            hook: Arc::clone(&hook),
            wake: Arc::clone(&wake),
            load,
            counts,
            bus: rooms.map(|hub| {
                let _ = view.rooms.set(Arc::clone(&hub));
                let (tx, rx) = tokio::sync::mpsc::channel(signal_bus::CMD_QUEUE);
                hub.with_core(|m| {
                    m.enable_bus(driver::unix_us());
                    if let Some(u) = relay_url {
                        m.set_relay_url(u);
                    }
                });
                hub.set_bus(tx);
                signal_bus::SignalBus::new(
                    hub,
                    rx,
                    id.clone(),
                    registry::Keys::new(&cfg.cluster.key_prefix),
                    Arc::clone(&view),
                    lease_ms,
                )
            }),
            peerjs: peerjs.map(|hub| {
                let (tx, rx) = tokio::sync::mpsc::channel(signal_bus::CMD_QUEUE);
                hub.with_core(|m| m.enable_bus(driver::unix_us()));
                hub.set_bus(tx);
                signal_bus::SignalBus::new(
                    hub,
                    rx,
                    id.clone(),
                    registry::Keys::new(&cfg.cluster.key_prefix),
                    Arc::clone(&view),
                    lease_ms,
                )
            }),
        };
        let thread = std::thread::Builder::new()
            .name("tern-cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: cannot start its runtime");
                        return;
                    }
                };
                rt.block_on(d.run(stop_rx));
            })
            .map_err(|e| crate::config::ConfigError::Invalid {
                key: "cluster".into(),
                message: format!("cannot start the cluster thread: {e}"),
            })?;
        tracing::info!(node_id = %id, redis = %conn::redacted_url(&cfg.cluster.redis_url), "cluster mode on");
        Ok(ClusterService {
            view,
            hook,
            wake,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn view(&self) -> Arc<ClusterView> {
        Arc::clone(&self.view)
    }

    /// The TURN core's hook (install with `Shared::set_cluster`).
    pub fn hook(&self) -> Arc<ClusterHook> {
        Arc::clone(&self.hook)
    }

    /// Announce now rather than at the next tick (drain started).
    pub fn announce_now(&self) {
        self.wake.notify_one();
    }

    /// Removes this node's record and quota leases (when Redis answers within a second)
    /// and stops the driver.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClusterService {
    fn drop(&mut self) {
        self.stop_now();
    }
}
