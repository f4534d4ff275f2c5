//! Typed configuration: built-in defaults, then the TOML file (`--config`), then environment
//! variables (`TERN_SECTION__KEY=value`), then `--set section.key=value` flags.
//!
//! Owns parsing, layering and validation (`tern check-config`). It must not open sockets or
//! start anything; validation errors name the offending key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Errors found while loading or validating the configuration. Each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("--set {arg}: {message}")]
    Flag { arg: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole daemon configuration, one section per face (DESIGN.md, "Naming").
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub turn: TurnConfig,
    pub api: ApiConfig,
    pub signal: SignalConfig,
    pub relay_ws: RelayWsConfig,
    pub metrics: MetricsConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
    pub daemon: DaemonConfig,
    pub usage: UsageConfig,
    pub cluster: ClusterConfig,
}

/// A static long-term credential (RFC 8489 §9.2). Either `password` or `key`
/// (hex MD5 of `user:realm:password`, as coturn's `turnadmin -k` prints) must be set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// An alternate TURN server reached over TLS (RFC 8489 §14.15, §14.16): its address for
/// ALTERNATE-SERVER and the name its certificate carries, for ALTERNATE-DOMAIN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsAlternate {
    pub addr: SocketAddr,
    pub domain: String,
}

/// `[turn]`: the STUN/TURN face (RFC 8489, RFC 8656).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Addresses for the UDP and TCP listeners (both transports on each).
    pub listen: Vec<SocketAddr>,
    /// Local addresses relay sockets bind to. Empty: the detected primary address.
    pub relay_ip: Vec<IpAddr>,
    /// Addresses advertised in XOR-RELAYED-ADDRESS instead of the relay address
    /// (1:1 NAT, like coturn's `external-ip`). Either one per relay_ip, in the same order, or empty.
    pub external_ip: Vec<IpAddr>,
    pub min_port: u16,
    pub max_port: u16,
    pub realm: String,
    /// TURN REST API shared secrets (coturn `static-auth-secret`); all are accepted, so a
    /// new one can be added before the old one is removed.
    pub auth_secrets: Vec<String>,
    /// Files holding one secret per line (blank lines and `#` comments ignored).
    pub secret_file: Vec<PathBuf>,
    /// Separator between expiry timestamp and user id in REST usernames.
    pub username_separator: String,
    pub users: Vec<StaticUser>,
    /// An allocation cannot be refreshed past its REST credential's expiry.
    pub strict_expiry: bool,
    pub default_lifetime_secs: u32,
    pub max_lifetime_secs: u32,
    /// Allocations one user may hold at once (RFC 8656 §7.2 486 Allocation Quota Reached).
    pub user_quota: u32,
    /// Allocations the whole server may hold at once (508 Insufficient Capacity past it).
    pub total_quota: u32,
    /// Peer ranges allowed even though the default policy denies them (e.g. "127.0.0.0/8").
    pub allowed_peer_ranges: Vec<IpNet>,
    /// Extra peer ranges to deny.
    pub denied_peer_ranges: Vec<IpNet>,
    /// Unauthenticated requests answered per second per source IP (401 answers included),
    /// across all workers (each worker enforces its share).
    pub unauth_rate_per_sec: u32,
    pub unauth_burst: u32,
    /// A TCP connection that has not completed a message for this long is closed (not one
    /// holding an allocation; data sent to the client and spliced RFC 6062 bytes count).
    pub tcp_idle_timeout_secs: u32,
    /// Open TCP connections per client IP.
    pub tcp_max_per_ip: u32,
    /// Worker threads (0: one per core).
    pub workers: usize,
    /// SO_RCVBUF / SO_SNDBUF for listener and relay sockets.
    pub socket_buffer_bytes: usize,
    /// SOFTWARE attribute on responses; empty to omit.
    pub software: String,
    /// Servers a client is sent to (300 Try Alternate with ALTERNATE-SERVER, RFC 8489 §10)
    /// when this one is at capacity or draining, round-robin, per client transport. Only
    /// alternates of the client's address family are offered; with none, 508.
    pub alternate_udp: Vec<SocketAddr>,
    pub alternate_tcp: Vec<SocketAddr>,
    pub alternate_tls: Vec<TlsAlternate>,
    /// The TCP listeners on `listen` also accept TLS, told apart by the first byte (0x16 is
    /// a TLS handshake record), so one port (e.g. 443) carries `turn:` over TCP and `turns:`.
    /// Needs `[tls]` cert_file and key_file.
    pub sniff_tls: bool,
    /// Allow RFC 6062 TCP allocations (REQUESTED-TRANSPORT TCP over a TCP/TLS control
    /// connection). coturn's `no-tcp-relay` is the opposite switch.
    pub tcp_relay: bool,
    /// Peer TCP connections (pending and bound) one TCP allocation may hold at once; past it
    /// Connect gets 508 and incoming peer connections are refused.
    pub tcp_relay_max_connections: u32,
    /// Relayed bytes per second one relayed address may carry, each direction apart
    /// (coturn's `max-bps`); 0: no cap. Datagrams past it are dropped (counted under
    /// `tern_relay_dropped_packets_total{reason="bandwidth"}`); an RFC 6062 TCP relay reads
    /// more slowly instead.
    pub max_bytes_per_sec: u64,
    /// Kernel fast path for established channel bindings (docs/fastpath.md): "off"
    /// (default), "tc" (a BPF classifier on the ingress of each interface in
    /// `kernel_fast_path_interfaces`), "xdp" (an XDP program there, native else generic
    /// mode, TC when XDP cannot run). When BPF cannot load or attach, one line is logged
    /// and everything stays in user space.
    pub kernel_fast_path: crate::fastpath::Mode,
    /// Interfaces the fast path attaches to (those clients and peers arrive on).
    pub kernel_fast_path_interfaces: Vec<String>,
    /// Relayed bytes (both directions, all of a user's allocations) a user may use per UTC
    /// day; past it Allocate and Refresh get 486 and running allocations end at their
    /// lifetime (docs/usage.md). 0: no budget. Needs `[usage]` enabled.
    pub user_bytes_per_day: u64,
    /// As `user_bytes_per_day`, per UTC calendar month. 0: no budget.
    pub user_bytes_per_month: u64,
    /// Relayed bytes per second all of one user's UDP relays on this node may carry
    /// together, each direction apart; 0: no cap. Datagrams past it are dropped (counted
    /// under `tern_relay_dropped_packets_total{reason="user_bandwidth"}`). Needs `[usage]`.
    pub user_max_bytes_per_sec: u64,
}

/// Most TURN worker threads: RFC 6062 CONNECTION-IDs carry the worker index in 8 bits.
pub const MAX_TURN_WORKERS: usize = 255;

impl TurnConfig {
    /// Worker threads the TURN service runs: `workers`, or one per core when 0 (at most
    /// [`MAX_TURN_WORKERS`]).
    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_TURN_WORKERS)
        } else {
            self.workers
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "0.0.0.0:3478".parse().unwrap(),
                "[::]:3478".parse().unwrap(),
            ],
            relay_ip: vec![],
            external_ip: vec![],
            min_port: 49152,
            max_port: 65535,
            realm: "tern".into(),
            auth_secrets: vec![],
            secret_file: vec![],
            username_separator: ":".into(),
            users: vec![],
            strict_expiry: false,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            user_quota: 10,
            total_quota: 10_000,
            allowed_peer_ranges: vec![],
            denied_peer_ranges: vec![],
            unauth_rate_per_sec: 20,
            unauth_burst: 40,
            tcp_idle_timeout_secs: 30,
            tcp_max_per_ip: 64,
            workers: 0,
            socket_buffer_bytes: 4 << 20,
            software: concat!("tern/", env!("CARGO_PKG_VERSION")).into(),
            alternate_udp: vec![],
            alternate_tcp: vec![],
            alternate_tls: vec![],
            sniff_tls: false,
            tcp_relay: true,
            tcp_relay_max_connections: 64,
            // 100 Mbit/s each way: far above a call or a browser transfer through TURN, and a
            // bound on what one leaked credential's allocation can move.
            max_bytes_per_sec: 12_500_000,
            kernel_fast_path: crate::fastpath::Mode::Off,
            kernel_fast_path_interfaces: vec![],
            user_bytes_per_day: 0,
            user_bytes_per_month: 0,
            user_max_bytes_per_sec: 0,
        }
    }
}

/// `[api]`: the HTTP listener (credentials API, signaling, web page).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Host name put in ICE server URLs; empty: the first external/relay address, else the
    /// request's Host header. When set, the API's own origin must have this host (the Host
    /// header alone is the attacker's under DNS rebinding).
    pub public_host: String,
    /// Lifetime of credentials minted for anonymous browsers.
    pub anonymous_ttl_secs: u32,
    /// Whether browsers without a bearer token may mint (only from allowed origins).
    pub anonymous_enabled: bool,
    /// Anonymous mints per minute per client IP, and the burst allowed above that rate.
    pub anonymous_rate_per_min: u32,
    pub anonymous_burst: u32,
    /// Origins (`https://app.example.org`) allowed to mint anonymously; `"*"` allows any.
    /// The API's own origin (the built-in page) is always allowed: `Origin` matching `Host`,
    /// and `public_host` when set.
    pub allowed_origins: Vec<String>,
    /// Bearer tokens that may mint for any user id and TTL up to `max_ttl_secs`.
    pub tokens: Vec<String>,
    /// Files holding one token per line (blank lines and `#` comments ignored).
    pub token_files: Vec<PathBuf>,
    /// Bearer tokens for the admin routes (`/api/usage`); a minting token is not one.
    pub admin_tokens: Vec<String>,
    /// Longest TTL a token holder may ask for.
    pub max_ttl_secs: u32,
    /// TTL when a token holder does not ask for one.
    pub default_ttl_secs: u32,
    /// Reverse proxies whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Worker threads of the HTTP runtime.
    pub workers: usize,
    /// Serve HTTPS with the `[tls]` certificate instead of plain HTTP.
    pub tls: bool,
    /// A client must send each request's head (request line and headers) within this many
    /// seconds of connecting or of its previous response; also how long an idle keep-alive
    /// connection stays open. WebSocket sessions are not affected once upgraded.
    pub header_read_timeout_secs: u32,
    /// A client that accepts no byte of a response for this many seconds is disconnected
    /// (a slow reader otherwise holds its connection and buffers). Not applied to upgraded
    /// WebSockets, whose backpressure rules are their own.
    pub write_stall_timeout_secs: u32,
    /// Open HTTP connections (plain or TLS, WebSockets included); past it new connections
    /// are closed right after accept.
    pub max_connections: usize,
    /// Open HTTP connections per client IP (IPv6: per /64). Behind a reverse proxy every
    /// connection comes from the proxy's address: raise it there.
    pub max_connections_per_ip: usize,
    /// Pending connections the kernel queues for the listener (listen(2) backlog); 0: the
    /// system's maximum (`net.core.somaxconn`, asking at least 4096). The kernel caps any
    /// value at somaxconn.
    pub listen_backlog: u32,
    /// Request line and headers of one request, bytes in all; past it the answer is 431
    /// and the connection closes. Also bounds the connection's read buffer.
    pub max_header_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:8080".parse().unwrap(),
            public_host: String::new(),
            anonymous_ttl_secs: 600,
            anonymous_enabled: true,
            anonymous_rate_per_min: 10,
            anonymous_burst: 20,
            allowed_origins: vec![],
            tokens: vec![],
            token_files: vec![],
            admin_tokens: vec![],
            max_ttl_secs: 86400,
            default_ttl_secs: 86400,
            trusted_proxies: vec![],
            workers: 2,
            tls: false,
            header_read_timeout_secs: 10,
            write_stall_timeout_secs: 30,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            listen_backlog: 0,
            max_header_bytes: 16 * 1024,
        }
    }
}

/// `[signal]`: native WebSocket signaling with rooms (`/ws`) and the PeerJS-compatible server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// IPv6 clients share a LAN room when their addresses share this prefix.
    pub lan_ipv6_prefix_len: u8,
    /// The server pings a quiet peer this often.
    pub ping_interval_secs: u32,
    /// A peer silent for this long is dropped and its rooms are told.
    pub peer_timeout_secs: u32,
    /// A reconnect with the resume token within this time keeps the peer id.
    pub resume_grace_secs: u32,
    /// Largest native (`/ws`) message accepted (larger: a `too-large` error; over four times
    /// this the frame closes the socket with 1009). 2 MiB by default: a 1 MiB payload (an
    /// SDP with many candidates and codecs, app data) passes with its envelope; memory is
    /// bounded by the rate limit and send-queue byte budgets, not by a small cap.
    pub max_message_bytes: usize,
    /// Native messages per second per connection, and the burst allowed above that rate.
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Named rooms one peer may be in at once.
    pub max_rooms_per_peer: usize,
    /// Peers in one room.
    pub max_room_size: usize,
    /// Native signaling connections the server holds at once.
    pub max_peers: usize,
    /// Lifetime of a `/relay` ticket that has not been used.
    pub relay_ticket_ttl_secs: u32,
    /// Frames queued towards one slow connection before it is dropped.
    pub send_queue: usize,
    /// Bytes queued towards one slow connection before it is dropped (closed with 1008):
    /// room for a few of the largest messages, so memory is bounded by bytes, not counts.
    pub send_queue_bytes: usize,
    pub peerjs_enabled: bool,
    /// PeerJS mount path (the client's `path` option).
    pub peerjs_path: String,
    /// PeerJS API key (the client's `key` option).
    pub peerjs_key: String,
    /// `GET {path}{key}/peers` lists connected ids when true.
    pub peerjs_allow_discovery: bool,
    /// A PeerJS client without a HEARTBEAT for this long is dropped.
    pub peerjs_alive_timeout_secs: u32,
    /// Messages for an absent PeerJS peer are answered with EXPIRE after this long.
    pub peerjs_expire_timeout_secs: u32,
    pub peerjs_concurrent_limit: usize,
    /// Messages queued for one absent PeerJS peer (the `peer` server's queue is unbounded).
    pub peerjs_queue_bound: usize,
    /// Largest PeerJS message; a larger one closes its sender with 1009, as the `peer`
    /// server does past its WebSocket limit (a PeerJS client aborts on any ERROR, so there
    /// is no per-message "too large" answer).
    pub peerjs_max_message_bytes: usize,
    /// PeerJS messages per second per client, and the burst above it. Far above what an
    /// app sends: past it the client is disconnected (1008), since ERROR would abort it.
    pub peerjs_rate_per_sec: u32,
    pub peerjs_burst: u32,
    /// Bytes one PeerJS sender may have queued for absent peers; past it, EXPIRE at once.
    pub peerjs_queue_bytes_per_sender: usize,
    /// Bytes queued for all absent PeerJS peers together; past it, EXPIRE at once.
    pub peerjs_queue_bytes_total: usize,
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            lan_ipv6_prefix_len: 64,
            ping_interval_secs: 20,
            peer_timeout_secs: 60,
            resume_grace_secs: 30,
            max_message_bytes: 2 << 20,
            rate_per_sec: 50,
            burst: 200,
            max_rooms_per_peer: 8,
            max_room_size: 256,
            max_peers: 20_000,
            relay_ticket_ttl_secs: 60,
            send_queue: 256,
            send_queue_bytes: 4 << 20,
            peerjs_enabled: true,
            peerjs_path: "/peerjs".into(),
            peerjs_key: "peerjs".into(),
            peerjs_allow_discovery: false,
            peerjs_alive_timeout_secs: 60,
            peerjs_expire_timeout_secs: 5,
            peerjs_concurrent_limit: 5000,
            peerjs_queue_bound: 64,
            peerjs_max_message_bytes: 2 << 20,
            peerjs_rate_per_sec: 500,
            peerjs_burst: 2000,
            peerjs_queue_bytes_per_sender: 4 << 20,
            peerjs_queue_bytes_total: 64 << 20,
        }
    }
}

/// `[relay_ws]`: the WebSocket data relay (`/relay`) used when ICE fails entirely.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayWsConfig {
    pub enabled: bool,
    /// Largest binary frame forwarded; a larger one closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Bytes buffered per direction of a session; past it the sender is not read.
    pub buffer_bytes: usize,
    /// Per-session bandwidth cap in bytes per second, each direction (0: none).
    pub session_bytes_per_sec: u64,
    /// Cap on all sessions together, bytes per second (0: none).
    pub global_bytes_per_sec: u64,
    /// Sessions (paired or waiting for the second side) held at once.
    pub max_sessions: usize,
}

impl Default for RelayWsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_frame_bytes: 256 * 1024,
            buffer_bytes: 1 << 20,
            session_bytes_per_sec: 0,
            global_bytes_per_sec: 0,
            max_sessions: 1000,
        }
    }
}

/// `[metrics]`: Prometheus scrape and health endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9641".parse().unwrap(),
        }
    }
}

/// `[tls]`: the certificate for TURN over TLS (RFC 8656 §3.1) and the HTTPS API. TLS is on
/// when both `cert_file` and `key_file` are set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (e.g. certbot's fullchain.pem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the leaf certificate (e.g. certbot's privkey.pem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// TURN over TLS listeners (TCP only).
    pub listen: Vec<SocketAddr>,
    /// A client that has not completed its TLS handshake by then is dropped.
    pub handshake_timeout_secs: u32,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            listen: vec![
                "0.0.0.0:5349".parse().unwrap(),
                "[::]:5349".parse().unwrap(),
            ],
            handshake_timeout_secs: 10,
        }
    }
}

impl TlsConfig {
    /// Whether a certificate is configured.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. "info" or "tern=debug".
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// `[daemon]`: the process itself: reload (SIGHUP, `tern reload`) and drain (SIGTERM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where `tern serve` writes its process id and `tern reload` reads it. Empty: none.
    pub pid_file: PathBuf,
    /// After SIGTERM, how long existing allocations may keep relaying before the daemon
    /// exits anyway (a second SIGTERM ends the drain at once).
    pub drain_timeout_secs: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            pid_file: "/run/tern/tern.pid".into(),
            drain_timeout_secs: 30,
        }
    }
}

/// `[usage]`: usage accounting per user (docs/usage.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Record relayed bytes per user into the store at `path`.
    pub enabled: bool,
    /// The SQLite file (its directory is created). The default lies in the systemd unit's
    /// `StateDirectory=tern`; if the default cannot be opened the daemon runs without
    /// accounting and says so, a path set here that cannot be opened stops the start.
    pub path: PathBuf,
    /// How often long allocations report their counters (a crash loses at most this much).
    pub interim_secs: u32,
    /// How often pending rollups are written to the store.
    pub flush_ms: u32,
    /// Rollups older than this many days are deleted (0: kept forever).
    pub retention_days: u32,
    /// Count every anonymous `/api/ice` credential (`anon-…`) under one user `anonymous`.
    pub fold_anonymous: bool,
    /// This node's name in the store; empty: the host name.
    pub node_id: String,
    /// Cluster mode: the usage stream of finished allocations is trimmed to about this
    /// many entries (`XADD MAXLEN ~`).
    pub stream_maxlen: u64,
    /// Cluster mode: finished allocations kept in memory for the stream while Redis is
    /// away; past this the oldest are dropped and counted.
    pub stream_queue: u32,
}

/// The default `usage.path`.
pub const DEFAULT_USAGE_PATH: &str = "/var/lib/tern/usage.db";

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: DEFAULT_USAGE_PATH.into(),
            interim_secs: 60,
            flush_ms: 1000,
            retention_days: 90,
            fold_anonymous: false,
            node_id: String::new(),
            stream_maxlen: 1_000_000,
            stream_queue: 100_000,
        }
    }
}

/// `[cluster]`: several nodes acting as one service through Redis (docs/cluster.md).
/// Off while `redis_url` is empty: then nothing of `crate::cluster` runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user@]host:port[/db]`, `rediss://...` (TLS) or `unix:/path/to/redis.sock`.
    pub redis_url: String,
    /// File whose first secret line is the Redis password (overrides one in the URL).
    pub redis_password_file: PathBuf,
    /// This node's id in the registry; empty: the hostname.
    pub node_id: String,
    /// Host (name or IP) clients use for this node's TURN listeners; empty: api.public_host,
    /// else the first turn.external_ip / turn.relay_ip.
    pub advertise_turn_host: String,
    /// Base URL of this node's HTTP API (`/relay`, `/ws`), e.g. "https://turn2.example.org".
    pub advertise_http_url: String,
    /// Prefix of every Redis key and channel, so several clusters can share one Redis.
    pub key_prefix: String,
    /// Lease of registry records and quota counts, seconds: a node that dies vanishes
    /// from the others' view within this time.
    pub lease_secs: u32,
    /// This node counts as full for `/api/ice` steering and ALTERNATE-SERVER at this many
    /// allocations (0: turn.total_quota).
    pub max_allocations: u32,
    /// ... or at this relayed bandwidth, bytes per second (0: no ceiling).
    pub max_relay_bytes_per_sec: u64,
    /// Signaling bus on sharded pub/sub (SPUBLISH/SSUBSCRIBE) when Redis has it (the
    /// default); false: plain PUBLISH/SUBSCRIBE.
    pub sharded_pubsub: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_password_file: PathBuf::new(),
            node_id: String::new(),
            advertise_turn_host: String::new(),
            advertise_http_url: String::new(),
            key_prefix: "tern:".into(),
            lease_secs: 10,
            max_allocations: 0,
            max_relay_bytes_per_sec: 0,
            sharded_pubsub: true,
        }
    }
}

impl ClusterConfig {
    /// Cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }

    /// `node_id`, else the hostname.
    pub fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        match std::str::from_utf8(&buf[..end]) {
            Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
            _ => "tern".into(),
        }
    }

    /// The Redis password from `redis_password_file`, if one is set.
    pub fn redis_password(&self) -> Result<Option<String>, ConfigError> {
        if self.redis_password_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let p = &self.redis_password_file;
        let text = std::fs::read_to_string(p).map_err(|e| {
            invalid(
                "cluster.redis_password_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        let first = read_secret_lines(&text).next();
        match first {
            Some(s) => Ok(Some(s)),
            None => Err(invalid(
                "cluster.redis_password_file",
                format!("{} holds no password", p.display()),
            )),
        }
    }

    /// Rules for `[cluster]` (only when it is on).
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let url = &self.redis_url;
        let scheme_ok = ["redis://", "rediss://", "unix:"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok {
            return Err(invalid(
                "cluster.redis_url",
                "must start with redis://, rediss:// or unix:",
            ));
        }
        if let Err(e) = crate::cluster::conn::connection_info(self, None) {
            return Err(invalid("cluster.redis_url", e));
        }
        self.redis_password()?;
        let id = self.node_id();
        if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(invalid(
                "cluster.node_id",
                "at most 64 printable characters, no spaces or ':'",
            ));
        }
        if self.advertise_turn_host.contains(['/', ' ']) {
            return Err(invalid(
                "cluster.advertise_turn_host",
                "a host name or IP address, without scheme or port",
            ));
        }
        let u = &self.advertise_http_url;
        if !(u.is_empty() || u.starts_with("http://") || u.starts_with("https://")) {
            return Err(invalid(
                "cluster.advertise_http_url",
                "must start with http:// or https://",
            ));
        }
        if self.key_prefix.len() > 64 || self.key_prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "cluster.key_prefix",
                "at most 64 characters, no whitespace",
            ));
        }
        if !(3..=300).contains(&self.lease_secs) {
            return Err(invalid("cluster.lease_secs", "must be 3 to 300"));
        }
        Ok(())
    }
}

impl Config {
    /// Loads defaults, then `file`, then `TERN_*` variables from `env`, then `sets`
    /// (`section.key=value`), and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Config, ConfigError> {
        let mut root = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            root = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        }
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("TERN_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let path = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
            set_path(&mut root, &path, &value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        for arg in sets {
            let (path, value) = arg.split_once('=').ok_or_else(|| ConfigError::Flag {
                arg: arg.clone(),
                message: "expected section.key=value".into(),
            })?;
            set_path(&mut root, path.trim(), value.trim()).map_err(|message| {
                ConfigError::Flag {
                    arg: arg.clone(),
                    message,
                }
            })?;
        }
        let cfg: Config =
            toml::Value::Table(root.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: file.map(Path::to_path_buf).unwrap_or_default(),
                    message: match bad_key(&root) {
                        Some(key) => format!("{key}: {}", e.message()),
                        None => e.message().to_string() + &describe_span(&e),
                    },
                })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks cross-field rules that serde cannot express; names the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.turn;
        if t.listen.is_empty() {
            return Err(invalid("turn.listen", "at least one address is required"));
        }
        self.validate_fast_path()?;
        if t.min_port == 0 || t.min_port > t.max_port {
            return Err(invalid(
                "turn.min_port",
                format!(
                    "relay range {}-{} is empty or starts at 0",
                    t.min_port, t.max_port
                ),
            ));
        }
        if !t.external_ip.is_empty()
            && !t.relay_ip.is_empty()
            && t.external_ip.len() != t.relay_ip.len()
        {
            return Err(invalid(
                "turn.external_ip",
                "must list one address per turn.relay_ip entry",
            ));
        }
        if t.realm.is_empty() || t.realm.len() > 763 {
            return Err(invalid(
                "turn.realm",
                "must be 1 to 763 bytes (RFC 8489 §14.9)",
            ));
        }
        if t.username_separator.chars().count() != 1 {
            return Err(invalid("turn.username_separator", "must be one character"));
        }
        if t.default_lifetime_secs == 0 || t.default_lifetime_secs > t.max_lifetime_secs {
            return Err(invalid(
                "turn.default_lifetime_secs",
                "must be between 1 and turn.max_lifetime_secs",
            ));
        }
        if t.user_quota == 0 {
            return Err(invalid("turn.user_quota", "must be at least 1"));
        }
        if t.total_quota == 0 {
            return Err(invalid("turn.total_quota", "must be at least 1"));
        }
        if t.unauth_rate_per_sec == 0 || t.unauth_burst == 0 {
            return Err(invalid(
                "turn.unauth_rate_per_sec",
                "rate and burst must be at least 1",
            ));
        }
        if t.workers > MAX_TURN_WORKERS {
            return Err(invalid(
                "turn.workers",
                "must be at most 255 (RFC 6062 CONNECTION-IDs carry the worker index in 8 bits)",
            ));
        }
        if t.socket_buffer_bytes < 65536 {
            return Err(invalid(
                "turn.socket_buffer_bytes",
                "must be at least 65536",
            ));
        }
        for (i, s) in t.auth_secrets.iter().enumerate() {
            if s.is_empty() {
                return Err(invalid(&format!("turn.auth_secrets[{i}]"), "empty secret"));
            }
        }
        for (i, u) in t.users.iter().enumerate() {
            let key = format!("turn.users[{i}]");
            if u.name.is_empty() {
                return Err(invalid(&key, "name is empty"));
            }
            match (&u.password, &u.key) {
                (Some(_), None) => {}
                (None, Some(k)) => {
                    if k.len() != 32 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid(
                            &key,
                            "key must be 32 hex digits (MD5 of user:realm:password)",
                        ));
                    }
                }
                _ => return Err(invalid(&key, "set exactly one of password or key")),
            }
        }
        for (i, a) in t.alternate_tls.iter().enumerate() {
            let d = &a.domain;
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(invalid(
                    &format!("turn.alternate_tls[{i}].domain"),
                    "must be a DNS name (letters, digits, '-', '.'; at most 253 bytes)",
                ));
            }
        }
        if self.daemon.drain_timeout_secs > 3600 {
            return Err(invalid("daemon.drain_timeout_secs", "must be at most 3600"));
        }
        // Secret files must be readable now, so a typo fails at start, not at first login.
        self.turn_secrets()?;
        self.validate_api()?;
        self.validate_tls()?;
        self.cluster.validate()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "not a valid tracing filter"));
        }
        Ok(())
    }

    /// Rules for `[tls]` and the options that need it; the certificate and key are loaded
    /// now so a bad file fails `check-config` and start-up, not the first handshake.
    /// `turn.kernel_fast_path` and its interfaces.
    fn validate_fast_path(&self) -> Result<(), ConfigError> {
        use crate::fastpath::Mode;
        let t = &self.turn;
        if t.kernel_fast_path == Mode::Off {
            return Ok(());
        }
        if t.kernel_fast_path_interfaces.is_empty() {
            return Err(invalid(
                "turn.kernel_fast_path_interfaces",
                "at least one interface is required when turn.kernel_fast_path is on",
            ));
        }
        // IFNAMSIZ is 16 with the terminating NUL.
        for name in &t.kernel_fast_path_interfaces {
            if name.is_empty()
                || name.len() > 15
                || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(invalid(
                    "turn.kernel_fast_path_interfaces",
                    format!("{name:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => {
                crate::tls::load_certified_key(c, k).map_err(|e| match e {
                    crate::tls::TlsError::Cert { path, message } => {
                        invalid("tls.cert_file", format!("{}: {message}", path.display()))
                    }
                    crate::tls::TlsError::Key { path, message } => {
                        invalid("tls.key_file", format!("{}: {message}", path.display()))
                    }
                    crate::tls::TlsError::Config(m) => invalid("tls", m),
                })?;
            }
            (Some(_), None) => return Err(invalid("tls.key_file", "required with tls.cert_file")),
            (None, Some(_)) => return Err(invalid("tls.cert_file", "required with tls.key_file")),
            (None, None) => {
                if self.turn.sniff_tls {
                    return Err(invalid(
                        "turn.sniff_tls",
                        "needs tls.cert_file and tls.key_file",
                    ));
                }
                if self.api.tls {
                    return Err(invalid("api.tls", "needs tls.cert_file and tls.key_file"));
                }
            }
        }
        if t.handshake_timeout_secs == 0 || t.handshake_timeout_secs > 300 {
            return Err(invalid("tls.handshake_timeout_secs", "must be 1 to 300"));
        }
        Ok(())
    }

    /// Rules for `[api]`, `[signal]` and `[relay_ws]`.
    fn validate_usage(&self) -> Result<(), ConfigError> {
        let u = &self.usage;
        if u.enabled && u.path.as_os_str().is_empty() {
            return Err(invalid("usage.path", "must be set when usage.enabled"));
        }
        if u.interim_secs == 0 || u.interim_secs > 3600 {
            return Err(invalid("usage.interim_secs", "must be 1 to 3600"));
        }
        if !(10..=60_000).contains(&u.flush_ms) {
            return Err(invalid("usage.flush_ms", "must be 10 to 60000"));
        }
        if u.node_id.len() > 255 || u.node_id.contains(char::is_control) {
            return Err(invalid("usage.node_id", "at most 255 printable characters"));
        }
        if !(1000..=1_000_000_000).contains(&u.stream_maxlen) {
            return Err(invalid("usage.stream_maxlen", "must be 1000 to 1000000000"));
        }
        if !(1000..=10_000_000).contains(&u.stream_queue) {
            return Err(invalid("usage.stream_queue", "must be 1000 to 10000000"));
        }
        let t = &self.turn;
        if !u.enabled
            && (t.user_bytes_per_day != 0
                || t.user_bytes_per_month != 0
                || t.user_max_bytes_per_sec != 0)
        {
            let key = if t.user_bytes_per_day != 0 {
                "turn.user_bytes_per_day"
            } else if t.user_bytes_per_month != 0 {
                "turn.user_bytes_per_month"
            } else {
                "turn.user_max_bytes_per_sec"
            };
            return Err(invalid(
                key,
                "budgets need usage accounting (usage.enabled = true)",
            ));
        }
        if t.user_max_bytes_per_sec != 0 && t.user_max_bytes_per_sec < 1000 {
            return Err(invalid(
                "turn.user_max_bytes_per_sec",
                "0 (no cap) or at least 1000 bytes per second",
            ));
        }
        Ok(())
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let a = &self.api;
        if a.anonymous_ttl_secs == 0 || a.anonymous_ttl_secs > a.max_ttl_secs {
            return Err(invalid(
                "api.anonymous_ttl_secs",
                "must be between 1 and api.max_ttl_secs",
            ));
        }
        if a.default_ttl_secs == 0 || a.default_ttl_secs > a.max_ttl_secs {
            return Err(invalid(
                "api.default_ttl_secs",
                "must be between 1 and api.max_ttl_secs",
            ));
        }
        if a.anonymous_rate_per_min == 0 || a.anonymous_burst == 0 {
            return Err(invalid(
                "api.anonymous_rate_per_min",
                "rate and burst must be at least 1",
            ));
        }
        if a.workers == 0 || a.workers > 64 {
            return Err(invalid("api.workers", "must be 1 to 64"));
        }
        if a.header_read_timeout_secs == 0 || a.header_read_timeout_secs > 3600 {
            return Err(invalid("api.header_read_timeout_secs", "must be 1 to 3600"));
        }
        if a.write_stall_timeout_secs == 0 || a.write_stall_timeout_secs > 3600 {
            return Err(invalid("api.write_stall_timeout_secs", "must be 1 to 3600"));
        }
        if a.max_connections == 0 {
            return Err(invalid("api.max_connections", "must be at least 1"));
        }
        if a.max_connections_per_ip == 0 {
            return Err(invalid("api.max_connections_per_ip", "must be at least 1"));
        }
        // hyper's read buffer cannot be smaller than 8 KiB; a head over 1 MiB is no browser's.
        if !(8192..=1 << 20).contains(&a.max_header_bytes) {
            return Err(invalid("api.max_header_bytes", "must be 8192 to 1048576"));
        }
        for (i, o) in a.allowed_origins.iter().enumerate() {
            let ok = o == "*"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o.ends_with('/')
                    && !o.contains(char::is_whitespace));
            if !ok {
                return Err(invalid(
                    &format!("api.allowed_origins[{i}]"),
                    "must be \"*\" or scheme://host[:port] without a trailing slash",
                ));
            }
        }
        for (i, t) in a.tokens.iter().enumerate() {
            if t.len() < 16 {
                return Err(invalid(
                    &format!("api.tokens[{i}]"),
                    "tokens must be at least 16 characters",
                ));
            }
        }
        for (i, t) in a.admin_tokens.iter().enumerate() {
            if t.len() < 16 {
                return Err(invalid(
                    &format!("api.admin_tokens[{i}]"),
                    "tokens must be at least 16 characters",
                ));
            }
        }
        self.api_tokens()?;
        self.validate_usage()?;
        let s = &self.signal;
        if !(1..=128).contains(&s.lan_ipv6_prefix_len) {
            return Err(invalid("signal.lan_ipv6_prefix_len", "must be 1 to 128"));
        }
        if s.ping_interval_secs == 0 || s.ping_interval_secs >= s.peer_timeout_secs {
            return Err(invalid(
                "signal.ping_interval_secs",
                "must be at least 1 and less than signal.peer_timeout_secs",
            ));
        }
        if !(256..=16 << 20).contains(&s.max_message_bytes) {
            return Err(invalid(
                "signal.max_message_bytes",
                "must be 256 to 16777216",
            ));
        }
        if !(256..=64 << 20).contains(&s.peerjs_max_message_bytes) {
            return Err(invalid(
                "signal.peerjs_max_message_bytes",
                "must be 256 to 67108864",
            ));
        }
        if s.rate_per_sec == 0 || s.burst == 0 {
            return Err(invalid(
                "signal.rate_per_sec",
                "rate and burst must be at least 1",
            ));
        }
        if s.peerjs_rate_per_sec == 0 || s.peerjs_burst == 0 {
            return Err(invalid(
                "signal.peerjs_rate_per_sec",
                "rate and burst must be at least 1",
            ));
        }
        if s.peerjs_queue_bytes_total < s.peerjs_queue_bytes_per_sender {
            return Err(invalid(
                "signal.peerjs_queue_bytes_total",
                "must be at least signal.peerjs_queue_bytes_per_sender",
            ));
        }
        for (key, v) in [
            ("signal.max_rooms_per_peer", s.max_rooms_per_peer),
            ("signal.max_room_size", s.max_room_size),
            ("signal.max_peers", s.max_peers),
            ("signal.send_queue", s.send_queue),
            ("signal.send_queue_bytes", s.send_queue_bytes),
            ("signal.peerjs_concurrent_limit", s.peerjs_concurrent_limit),
            ("signal.peerjs_queue_bound", s.peerjs_queue_bound),
            (
                "signal.peerjs_queue_bytes_per_sender",
                s.peerjs_queue_bytes_per_sender,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if s.relay_ticket_ttl_secs == 0 {
            return Err(invalid(
                "signal.relay_ticket_ttl_secs",
                "must be at least 1",
            ));
        }
        if !s.peerjs_path.starts_with('/') || s.peerjs_path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "signal.peerjs_path",
                "must start with / and hold no ?, # or space",
            ));
        }
        if s.peerjs_key.is_empty() || s.peerjs_key.contains(['/', '?', '#', ' ']) {
            return Err(invalid(
                "signal.peerjs_key",
                "must be non-empty without /, ?, # or space",
            ));
        }
        if s.peerjs_alive_timeout_secs == 0 || s.peerjs_expire_timeout_secs == 0 {
            return Err(invalid(
                "signal.peerjs_alive_timeout_secs",
                "alive and expire timeouts must be at least 1",
            ));
        }
        let r = &self.relay_ws;
        if !(1024..=64 << 20).contains(&r.max_frame_bytes) {
            return Err(invalid(
                "relay_ws.max_frame_bytes",
                "must be 1024 to 67108864",
            ));
        }
        if r.buffer_bytes < r.max_frame_bytes {
            return Err(invalid(
                "relay_ws.buffer_bytes",
                "must be at least relay_ws.max_frame_bytes",
            ));
        }
        if r.max_sessions == 0 {
            return Err(invalid("relay_ws.max_sessions", "must be at least 1"));
        }
        Ok(())
    }

    /// All API bearer tokens: inline ones first, then those from `token_files`.
    pub fn api_tokens(&self) -> Result<Vec<String>, ConfigError> {
        let mut out = self.api.tokens.clone();
        for (i, path) in self.api.token_files.iter().enumerate() {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    &format!("api.token_files[{i}]"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            out.extend(read_secret_lines(&text));
        }
        Ok(out)
    }

    /// With no REST secret and no static user, TURN could authenticate nobody and `/api/ice`
    /// could mint nothing, so `tern serve` with defaults would not work. In that case this adds
    /// a random secret that lives only as long as the process and returns true; the caller
    /// warns that backends cannot mint credentials for it.
    pub fn add_ephemeral_secret_if_none(&mut self) -> Result<bool, ConfigError> {
        if !self.turn_secrets()?.is_empty() || !self.turn.users.is_empty() {
            return Ok(false);
        }
        use base64::Engine;
        let bytes: [u8; 32] = rand::random();
        self.turn
            .auth_secrets
            .push(base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes));
        Ok(true)
    }

    /// All REST API secrets: inline ones first, then those from `secret_file`s.
    pub fn turn_secrets(&self) -> Result<Vec<String>, ConfigError> {
        let mut out = self.turn.auth_secrets.clone();
        for (i, path) in self.turn.secret_file.iter().enumerate() {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    &format!("turn.secret_file[{i}]"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let before = out.len();
            out.extend(read_secret_lines(&text));
            if out.len() == before {
                return Err(invalid(
                    &format!("turn.secret_file[{i}]"),
                    format!("{} holds no secret", path.display()),
                ));
            }
        }
        Ok(out)
    }
}

/// Secrets in a secret file: one a line, blank lines and `#` comments skipped.
pub fn read_secret_lines(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
}

/// The first `section.key` whose value alone does not deserialize (the merged table has
/// lost the file's positions, so a type error would otherwise not say where it is).
fn bad_key(root: &toml::Table) -> Option<String> {
    for (section, v) in root {
        let Some(table) = v.as_table() else {
            return Some(section.clone());
        };
        for (key, value) in table {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            let mut probe = toml::Table::new();
            probe.insert(section.clone(), toml::Value::Table(one));
            if toml::Value::Table(probe).try_into::<Config>().is_err() {
                return Some(format!("{section}.{key}"));
            }
        }
    }
    None
}

fn describe_span(e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!(" (at byte {})", span.start),
        None => String::new(),
    }
}

/// Sets `section.key` in the table from a string: parsed as a TOML value when it is one
/// (numbers, booleans, arrays), else taken as a string.
fn set_path(root: &mut toml::Table, path: &str, raw: &str) -> Result<(), String> {
    let mut parts = path.split('.');
    let (Some(section), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("`{path}` is not section.key"));
    };
    let value = parse_scalar(raw);
    let entry = root
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let table = entry
        .as_table_mut()
        .ok_or_else(|| format!("`{section}` is not a section"))?;
    table.insert(key.to_string(), value);
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Current `TERN_*` environment variables, for [`Config::load`].
pub fn tern_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("TERN_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, file).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(c.turn.min_port, 49152);
        assert_eq!(c.turn.user_quota, 10);
        assert_eq!(c.turn.listen.len(), 2);
    }

    #[test]
    fn layers_apply_in_order() {
        let c = load(
            "[turn]\nrealm = \"file\"\nmin_port = 50000\n",
            &[
                ("TERN_TURN__REALM", "env"),
                ("TERN_TURN__MAX_PORT", "50010"),
            ],
            &["turn.max_port=50020"],
        )
        .unwrap();
        assert_eq!(c.turn.realm, "env");
        assert_eq!(c.turn.min_port, 50000);
        assert_eq!(c.turn.max_port, 50020);
    }

    #[test]
    fn kernel_fast_path_is_validated() {
        let c = load("", &[], &[]).unwrap();
        assert_eq!(c.turn.kernel_fast_path, crate::fastpath::Mode::Off);
        let c = load(
            "[turn]\nkernel_fast_path = \"tc\"\nkernel_fast_path_interfaces = [\"eth0\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.turn.kernel_fast_path, crate::fastpath::Mode::Tc);
        let e = load("[turn]\nkernel_fast_path = \"tc\"\n", &[], &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("turn.kernel_fast_path_interfaces"),
            "{e}"
        );
        let c = load(
            "[turn]\nkernel_fast_path = \"xdp\"\nkernel_fast_path_interfaces = [\"eth0\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.turn.kernel_fast_path, crate::fastpath::Mode::Xdp);
        let e = load("[turn]\nkernel_fast_path = \"xdp\"\n", &[], &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("turn.kernel_fast_path_interfaces"),
            "{e}"
        );
        let e = load("[turn]\nkernel_fast_path = \"fast\"\n", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("turn.kernel_fast_path"), "{e}");
        let e = load(
            "[turn]\nkernel_fast_path = \"tc\"\nkernel_fast_path_interfaces = [\"a/b\"]\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("turn.kernel_fast_path_interfaces"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = load("[turn]\nmin_port = 6000\nmax_port = 5000\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("turn.min_port"), "{e}");
        let e = load("[turn]\nrelam = \"x\"\n", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("relam"), "{e}");
        let e = load("[turn]\nsecret_file = [\"/nonexistent/x\"]\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("turn.secret_file[0]"), "{e}");
        let e = load("", &[], &["turn.users=[{name=\"a\"}]"]).unwrap_err();
        assert!(e.to_string().starts_with("turn.users[0]"), "{e}");
        let e = load("[turn]\nmin_port = \"x\"\n", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("turn.min_port: invalid type"), "{e}");
        let e = load("", &[("TERN_API__WORKERS", "many")], &[]).unwrap_err();
        assert!(e.to_string().contains("api.workers: invalid type"), "{e}");
        let e = load("[log]\nformat = \"xml\"\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("log.format"), "{e}");
        let e = load("[turn]\nworkers = 256\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("turn.workers"), "{e}");
        assert!(load("[turn]\nworkers = 255\n", &[], &[]).is_ok());
        let e = load("", &[], &["turn.max_bytes_per_sec=-5"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("turn.max_bytes_per_sec: invalid value"),
            "{e}"
        );
        let e = load("[turn]\nmax_bytes_per_sec = \"fast\"\n", &[], &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("turn.max_bytes_per_sec: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn api_signal_relay_keys_are_validated() {
        let c = Config::load(None, Vec::new(), &[]).unwrap();
        assert!(c.api.anonymous_enabled);
        assert_eq!(c.signal.peerjs_path, "/peerjs");
        assert_eq!(c.signal.peerjs_expire_timeout_secs, 5);
        assert_eq!(c.signal.lan_ipv6_prefix_len, 64);
        let e = load("[api]\ntokens = [\"short\"]\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("api.tokens[0]"), "{e}");
        let e = load("", &[], &["api.allowed_origins=[\"example.org\"]"]).unwrap_err();
        assert!(e.to_string().starts_with("api.allowed_origins[0]"), "{e}");
        let e = load("[signal]\npeerjs_path = \"x\"\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("signal.peerjs_path"), "{e}");
        let e = load("", &[], &["signal.peerjs_max_message_bytes=100"]).unwrap_err();
        assert!(
            e.to_string().starts_with("signal.peerjs_max_message_bytes"),
            "{e}"
        );
        let e = load("", &[], &["signal.peerjs_burst=0"]).unwrap_err();
        assert!(
            e.to_string().starts_with("signal.peerjs_rate_per_sec"),
            "{e}"
        );
        let e = load("", &[], &["signal.peerjs_queue_bytes_total=1000"]).unwrap_err();
        assert!(
            e.to_string().starts_with("signal.peerjs_queue_bytes_total"),
            "{e}"
        );
        let e = load("", &[], &["signal.peerjs_queue_bytes_per_sender=0"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("signal.peerjs_queue_bytes_per_sender"),
            "{e}"
        );
        let e = load("[relay_ws]\nbuffer_bytes = 2000\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("relay_ws.buffer_bytes"), "{e}");
        let e = load("[api]\ntoken_files = [\"/nonexistent/t\"]\n", &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("api.token_files[0]"), "{e}");
        let e = load("", &[], &["api.max_header_bytes=4096"]).unwrap_err();
        assert!(e.to_string().starts_with("api.max_header_bytes"), "{e}");
    }

    #[test]
    fn ephemeral_secret_only_when_nothing_configured() {
        let mut c = Config::default();
        assert!(c.add_ephemeral_secret_if_none().unwrap());
        let s = c.turn_secrets().unwrap();
        assert_eq!(s.len(), 1);
        assert!(s[0].len() >= 40, "32 random bytes, base64");
        assert!(
            !c.add_ephemeral_secret_if_none().unwrap(),
            "a second call adds nothing"
        );
        let mut d = Config::default();
        assert_ne!(
            d.add_ephemeral_secret_if_none()
                .map(|_| d.turn_secrets().unwrap())
                .unwrap(),
            s
        );
        let mut e = Config::default();
        e.turn.users.push(StaticUser {
            name: "a".into(),
            password: Some("p".into()),
            key: None,
        });
        assert!(!e.add_ephemeral_secret_if_none().unwrap());
    }

    #[test]
    fn secret_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "# comment\n\nfirst\n  second  \n").unwrap();
        let c = load(
            &format!("[turn]\nauth_secrets=[\"inline\"]\nsecret_file=[{:?}]\n", p),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.turn_secrets().unwrap(), vec!["inline", "first", "second"]);
    }
}
