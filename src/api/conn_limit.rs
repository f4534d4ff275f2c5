//! Caps on open HTTP connections (plain and TLS, WebSockets included): `api.max_connections`
//! in total and `api.max_connections_per_ip` per client address, plus the listener's
//! connection counters.
//!
//! A connection holds a [`ConnGuard`] from accept until its socket is dropped (for a
//! WebSocket: until the session ends), so the counts are the sockets really open.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a connection was closed right after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `api.max_connections` connections were open.
    Total,
    /// `api.max_connections_per_ip` connections were open from this address.
    PerIp,
}

impl Refusal {
    /// The metric label (`reason`).
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
        }
    }
}

/// Connection counters of the HTTP listener (monotonic, read at scrape time).
#[derive(Debug, Default)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    pub refused_total: AtomicU64,
    pub refused_per_ip: AtomicU64,
    /// TLS handshakes that failed or did not finish within `tls.handshake_timeout_secs`.
    pub tls_handshake_failed: AtomicU64,
    /// Connections closed because no request head arrived in time: before the first
    /// request (a slow or silent client) ...
    pub header_timeout_first: AtomicU64,
    /// ... or after at least one answered request (an idle keep-alive connection).
    pub header_timeout_keep_alive: AtomicU64,
    /// Connections closed because the client read nothing of a response for
    /// `api.write_stall_timeout_secs`.
    pub write_stalled: AtomicU64,
    /// Connections answered 431 and closed: a request head over `api.max_header_bytes`.
    pub header_too_large: AtomicU64,
}

/// The caps and the live counts they are checked against.
pub struct ConnLimits {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub stats: ConnStats,
    log: Mutex<LogGate>,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            stats: ConnStats::default(),
            log: Mutex::new(LogGate::new(Duration::from_secs(10))),
        })
    }

    /// New caps (a reload); connections already open above them stay.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Relaxed);
        self.max_per_ip.store(max_per_ip, Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Admits a connection just accepted from `ip`, or says why it must be closed (counted,
    /// and logged at debug at most once per 10 s with the number left unlogged).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let key = ip_key(ip);
        let verdict = {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            // Checked and incremented under the map's lock, so concurrent accepts (the plain
            // listener has one accept loop, but stay correct anyway) cannot overshoot.
            if self.open.load(Relaxed) >= self.max_total.load(Relaxed) {
                Err(Refusal::Total)
            } else {
                let n = per_ip.entry(key).or_insert(0);
                if *n >= self.max_per_ip.load(Relaxed) {
                    Err(Refusal::PerIp)
                } else {
                    *n += 1;
                    self.open.fetch_add(1, Relaxed);
                    Ok(())
                }
            }
        };
        match verdict {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Relaxed);
                Ok(ConnGuard {
                    limits: Arc::clone(self),
                    key,
                })
            }
            Err(r) => {
                let c = match r {
                    Refusal::Total => &self.stats.refused_total,
                    Refusal::PerIp => &self.stats.refused_per_ip,
                };
                c.fetch_add(1, Relaxed);
                let gate = self
                    .log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .allow(Instant::now());
                if let Some(unlogged) = gate {
                    // The address is the one refused now; others were refused silently.
                    tracing::debug!(
                        client = %ip,
                        reason = r.label(),
                        unlogged,
                        "HTTP connection refused"
                    );
                }
                Err(r)
            }
        }
    }

    fn release(&self, key: IpAddr) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&key);
            }
        }
        self.open.fetch_sub(1, Relaxed);
    }

    #[cfg(test)]
    fn tracked_ips(&self) -> usize {
        self.per_ip.lock().unwrap().len()
    }
}

/// One admitted connection; dropping it frees its place.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    key: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.limits.release(self.key);
    }
}

/// The per-IP key: IPv4 (also IPv4-mapped IPv6) by address, IPv6 by /64, the prefix one
/// subscriber or host usually holds whole (one host could otherwise use 2^64 addresses).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// Lets one log line through per `every`; says how many were held back meanwhile.
struct LogGate {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogGate {
    fn new(every: Duration) -> LogGate {
        LogGate {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn total_cap_refuses_and_frees_on_drop() {
        let l = ConnLimits::new(2, 10);
        let a = l.admit(ip("192.0.2.1")).unwrap();
        let _b = l.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.3")).err(), Some(Refusal::Total));
        assert_eq!(l.stats.refused_total.load(Relaxed), 1);
        assert_eq!(l.open(), 2);
        drop(a);
        assert_eq!(l.open(), 1);
        let _c = l.admit(ip("192.0.2.3")).unwrap();
        assert_eq!(l.stats.accepted.load(Relaxed), 3);
        assert_eq!(
            l.tracked_ips(),
            2,
            "no entry kept for refused or closed clients"
        );
    }

    #[test]
    fn per_ip_cap_leaves_other_clients_alone() {
        let l = ConnLimits::new(100, 2);
        let held: Vec<_> = (0..2).map(|_| l.admit(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(l.admit(ip("192.0.2.1")).err(), Some(Refusal::PerIp));
        // IPv4-mapped IPv6 is the same client.
        assert_eq!(l.admit(ip("::ffff:192.0.2.1")).err(), Some(Refusal::PerIp));
        let _other = l.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(l.stats.refused_per_ip.load(Relaxed), 2);
        drop(held);
        let _again = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.open(), 2);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = ConnLimits::new(100, 1);
        let _a = l.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Refusal::PerIp)
        );
        let _b = l.admit(ip("2001:db8:1:3::1")).unwrap();
    }

    #[test]
    fn reload_changes_caps_for_new_connections() {
        let l = ConnLimits::new(1, 1);
        let _a = l.admit(ip("192.0.2.1")).unwrap();
        assert!(l.admit(ip("192.0.2.2")).is_err());
        l.set_limits(5, 5);
        let _b = l.admit(ip("192.0.2.2")).unwrap();
        l.set_limits(1, 1);
        assert!(l.admit(ip("192.0.2.3")).is_err());
        assert_eq!(l.open(), 2, "open connections above a lowered cap stay");
    }

    #[test]
    fn log_gate_holds_back_and_counts() {
        let mut g = LogGate::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(g.allow(t), Some(0));
        assert_eq!(g.allow(t + Duration::from_secs(1)), None);
        assert_eq!(g.allow(t + Duration::from_secs(2)), None);
        assert_eq!(g.allow(t + Duration::from_secs(11)), Some(2));
    }
}
