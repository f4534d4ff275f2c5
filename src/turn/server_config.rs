//! What the sans-IO core needs from the configuration ([`ServerConfig`]) and the state
//! shared by all shards ([`Shared`]: port pool, quotas, nonce key).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::alternates::Alternates;
use super::auth::Credentials;
use super::cluster_hook::ClusterHook;
use super::nonce::NonceKey;
use super::policy::PeerPolicy;
use super::ports::PortPool;
use super::quota::{QuotaError, Quotas};
use crate::config::{Config, ConfigError};

/// A relay address: sockets bind `local`, XOR-RELAYED-ADDRESS says `advertised` (1:1 NAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAddr {
    pub local: IpAddr,
    pub advertised: IpAddr,
}

/// Everything the TURN core needs, built from [`Config`]. Held behind an `Arc` so a
/// config reload can swap it (`Server::set_config`).
#[derive(Debug)]
pub struct ServerConfig {
    pub realm: String,
    /// SOFTWARE attribute value; empty to omit.
    pub software: String,
    pub credentials: Credentials,
    pub strict_expiry: bool,
    pub default_lifetime_secs: u32,
    pub max_lifetime_secs: u32,
    /// RFC 8656 §9: 300 s.
    pub permission_lifetime_secs: u32,
    /// RFC 8656 §12: 600 s.
    pub channel_lifetime_secs: u32,
    /// A NONCE older than this gets 438 (RFC 8489 §9.2).
    pub nonce_lifetime_secs: u64,
    /// Unclaimed EVEN-PORT reservations are released after this (RFC 8656 §14.9: ~30 s).
    pub reservation_lifetime_secs: u32,
    pub user_quota: u32,
    pub total_quota: u32,
    pub policy: PeerPolicy,
    pub unauth_rate_per_sec: u32,
    pub unauth_burst: u32,
    /// Relay addresses; the first of each family is used for allocations of that family.
    pub relay: Vec<RelayAddr>,
    pub min_port: u16,
    pub max_port: u16,
    /// Where clients are redirected when this server is full or draining.
    pub alternates: Alternates,
    /// RFC 6062 TCP allocations allowed (`turn.tcp_relay`); when off, 442.
    pub tcp_relay: bool,
    /// Peer connections per TCP allocation (`turn.tcp_relay_max_connections`).
    pub tcp_relay_max_connections: u32,
    /// Per relayed address and direction (`turn.max_bytes_per_sec`; 0: none). The workers
    /// enforce it on the data path; it rides here so a reload reaches them.
    pub max_bytes_per_sec: u64,
    /// Per-user byte budgets per UTC day and month (`turn.user_bytes_per_day`,
    /// `turn.user_bytes_per_month`; 0: none), checked on Allocate and Refresh.
    pub user_bytes_per_day: u64,
    pub user_bytes_per_month: u64,
    /// One cap shared by each user's relays (`turn.user_max_bytes_per_sec`; 0: none),
    /// handed to the workers at Allocate (`usage_tap::attach_user_cap`).
    pub user_max_bytes_per_sec: u64,
    /// How often a live allocation reports its counters (`usage.interim_secs`).
    pub usage_interim_secs: u32,
}

impl ServerConfig {
    /// Builds the core's view of `cfg`. `relay` are the relay addresses the daemon
    /// resolved (turn.relay_ip or the detected primary address, with turn.external_ip).
    pub fn from_config(cfg: &Config, relay: Vec<RelayAddr>) -> Result<ServerConfig, ConfigError> {
        let t = &cfg.turn;
        if relay.is_empty() {
            return Err(ConfigError::Invalid {
                key: "turn.relay_ip".into(),
                message: "no relay address".into(),
            });
        }
        let separator = t.username_separator.chars().next().unwrap_or(':');
        let credentials = Credentials::new(&t.realm, separator, cfg.turn_secrets()?, &t.users)
            .map_err(|e| ConfigError::Invalid {
                key: "turn.users".into(),
                message: e.to_string(),
            })?;
        Ok(ServerConfig {
            realm: t.realm.clone(),
            software: t.software.clone(),
            credentials,
            strict_expiry: t.strict_expiry,
            default_lifetime_secs: t.default_lifetime_secs,
            max_lifetime_secs: t.max_lifetime_secs,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            nonce_lifetime_secs: 600,
            reservation_lifetime_secs: 30,
            user_quota: t.user_quota,
            total_quota: t.total_quota,
            policy: PeerPolicy::new(t.allowed_peer_ranges.clone(), t.denied_peer_ranges.clone()),
            // SO_REUSEPORT spreads one source IP's ports over every worker, and each worker
            // has its own limiter, so each gets its share: the source's total stays at the
            // configured rate, not the rate times the worker count.
            unauth_rate_per_sec: per_shard(t.unauth_rate_per_sec, t.worker_count()),
            unauth_burst: per_shard(t.unauth_burst, t.worker_count()),
            relay,
            min_port: t.min_port,
            max_port: t.max_port,
            alternates: Alternates::from_config(t),
            tcp_relay: t.tcp_relay,
            tcp_relay_max_connections: t.tcp_relay_max_connections,
            max_bytes_per_sec: t.max_bytes_per_sec,
            user_bytes_per_day: t.user_bytes_per_day,
            user_bytes_per_month: t.user_bytes_per_month,
            user_max_bytes_per_sec: t.user_max_bytes_per_sec,
            usage_interim_secs: cfg.usage.interim_secs,
        })
    }

    /// The relay address used for family `v6`.
    pub fn relay_for(&self, v6: bool) -> Option<RelayAddr> {
        self.relay.iter().copied().find(|r| r.local.is_ipv6() == v6)
    }
}

/// State shared by all shards. Locks here are taken on the control path only.
#[derive(Debug)]
pub struct Shared {
    pub(crate) nonce: NonceKey,
    pub(crate) ports: PortPool,
    /// Allocation counts per user and in total (`quota.rs`, their only writer).
    quotas: Quotas,
    /// Set on SIGTERM: new allocations are refused (300 to an alternate, else 508).
    draining: AtomicBool,
    /// Round-robin position among the alternates, across all shards.
    next_alternate: AtomicUsize,
    /// Where allocations report usage (set once at start when accounting is on).
    usage: OnceLock<Arc<crate::usage::Ledger>>,
    /// Cluster mode's snapshot (`[cluster]`); unset on a single node.
    cluster: OnceLock<Arc<ClusterHook>>,
}

impl Shared {
    pub fn new(cfg: &ServerConfig) -> Shared {
        Shared {
            nonce: NonceKey::random(),
            ports: PortPool::new(
                cfg.relay.iter().map(|r| r.local),
                cfg.min_port,
                cfg.max_port,
            ),
            quotas: Quotas::default(),
            draining: AtomicBool::new(false),
            next_alternate: AtomicUsize::new(0),
            usage: OnceLock::new(),
            cluster: OnceLock::new(),
        }
    }

    /// Installs cluster mode's hook (once, at start): quotas then count the user's
    /// allocations on other nodes, and 300 may name a node from the registry.
    pub fn set_cluster(&self, hook: Arc<ClusterHook>) {
        let _ = self.cluster.set(hook);
    }

    pub(crate) fn cluster(&self) -> Option<&ClusterHook> {
        self.cluster.get().map(Arc::as_ref)
    }

    /// Allocations per user on this node (for the cluster driver's lease writes).
    pub fn local_user_counts(&self, users: Option<&[String]>) -> Vec<(String, u32)> {
        self.quotas.user_counts(users)
    }

    /// Turns usage accounting on: allocations report to `ledger` from now on.
    pub fn set_usage(&self, ledger: Arc<crate::usage::Ledger>) {
        let _ = self.usage.set(ledger);
    }

    pub(crate) fn usage(&self) -> Option<&Arc<crate::usage::Ledger>> {
        self.usage.get()
    }

    /// Starts (or ends) a graceful drain: existing allocations keep working, new ones are
    /// redirected or refused. Read on the Allocate path only.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The next round-robin index into the alternates.
    pub(crate) fn next_alternate(&self) -> usize {
        self.next_alternate.fetch_add(1, Ordering::Relaxed)
    }

    /// Allocations held across all shards.
    pub fn total_allocations(&self) -> u32 {
        self.quotas.total()
    }

    /// Counts one more allocation for `user` if both quotas allow it (cluster mode: the
    /// user's allocations on other nodes count too).
    pub(crate) fn acquire_quota(
        &self,
        user: &str,
        user_quota: u32,
        total_quota: u32,
    ) -> Result<(), QuotaError> {
        self.quotas
            .acquire(user, user_quota, total_quota, self.cluster())
    }

    pub(crate) fn release_quota(&self, user: &str) {
        self.quotas.release(user, self.cluster());
    }
}

/// `total` split over `shards`, rounded up and never 0 (a limiter must let something through).
fn per_shard(total: u32, shards: usize) -> u32 {
    let shards = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
    total.div_ceil(shards).max(1)
}

#[cfg(test)]
mod per_shard_tests {
    use super::per_shard;

    #[test]
    fn unauthenticated_budget_is_split_over_workers() {
        assert_eq!(per_shard(20, 1), 20);
        assert_eq!(per_shard(20, 2), 10);
        assert_eq!(per_shard(40, 3), 14);
        assert_eq!(per_shard(1, 8), 1);
        assert_eq!(per_shard(5, 0), 5);
    }
}
