//! The relay port pool (RFC 8656 §7.2, §14.6, §14.9): which ports of `[min_port, max_port]`
//! are taken on each relay address, and EVEN-PORT reservations. Shared by all shards
//! behind a mutex; used on the control path only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use rustc_hash::FxHashMap;

/// A port held for a later Allocate carrying its RESERVATION-TOKEN (RFC 8656 §14.9).
#[derive(Debug, Clone, Copy)]
struct Reservation {
    addr: SocketAddr,
    expires: Instant,
}

struct IpPorts {
    ip: IpAddr,
    /// One bit per port of the range: set = taken (allocated or reserved).
    used: Vec<u64>,
}

struct Inner {
    ips: Vec<IpPorts>,
    reservations: FxHashMap<u64, Reservation>,
}

/// Port pool for every relay address.
pub struct PortPool {
    min: u16,
    max: u16,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PortPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortPool({}-{})", self.min, self.max)
    }
}

impl PortPool {
    pub fn new(ips: impl IntoIterator<Item = IpAddr>, min: u16, max: u16) -> PortPool {
        let n = (max - min) as usize + 1;
        let mut v: Vec<IpPorts> = Vec::new();
        for ip in ips {
            if !v.iter().any(|p| p.ip == ip) {
                v.push(IpPorts {
                    ip,
                    used: vec![0; n.div_ceil(64)],
                });
            }
        }
        PortPool {
            min,
            max,
            inner: Mutex::new(Inner {
                ips: v,
                reservations: FxHashMap::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain bitsets: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range_len(&self) -> usize {
        (self.max - self.min) as usize + 1
    }

    /// Takes a free port on `ip`: a random one, or an even one whose successor is also
    /// free when `pair` (EVEN-PORT with R=1 also takes the successor). `even` asks for an
    /// even port (RFC 8656 §14.6).
    pub fn acquire(&self, ip: IpAddr, even: bool, pair: bool) -> Option<u16> {
        let n = self.range_len();
        let start = rand::random_range(0..n);
        let min = self.min;
        let mut g = self.lock();
        let p = g.ips.iter_mut().find(|p| p.ip == ip)?;
        for i in 0..n {
            let idx = (start + i) % n;
            let port = min as usize + idx;
            if (even || pair) && port % 2 != 0 {
                continue;
            }
            if is_set(&p.used, idx) {
                continue;
            }
            if pair && (idx + 1 >= n || is_set(&p.used, idx + 1)) {
                continue;
            }
            set(&mut p.used, idx, true);
            if pair {
                set(&mut p.used, idx + 1, true);
            }
            return Some(port as u16);
        }
        None
    }

    /// Returns a port to the pool.
    pub fn release(&self, addr: SocketAddr) {
        let Some(idx) = self.index(addr.port()) else {
            return;
        };
        let mut g = self.lock();
        if let Some(p) = g.ips.iter_mut().find(|p| p.ip == addr.ip()) {
            set(&mut p.used, idx, false);
        }
    }

    /// Holds `addr` (already taken by [`Self::acquire`] with `pair`) until `expires` and
    /// returns its RESERVATION-TOKEN.
    pub fn reserve(&self, addr: SocketAddr, expires: Instant) -> u64 {
        let mut g = self.lock();
        loop {
            let token: u64 = rand::random();
            if token != 0 && !g.reservations.contains_key(&token) {
                g.reservations.insert(token, Reservation { addr, expires });
                return token;
            }
        }
    }

    /// Claims a reservation: its port stays taken, now by the caller. `None` if the token
    /// is unknown or expired.
    pub fn claim(&self, token: u64, now: Instant) -> Option<SocketAddr> {
        let mut g = self.lock();
        let r = g.reservations.remove(&token)?;
        if r.expires <= now {
            drop(g);
            self.release(r.addr);
            return None;
        }
        Some(r.addr)
    }

    /// Frees the ports of expired reservations; returns how many.
    pub fn expire_reservations(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        {
            let mut g = self.lock();
            g.reservations.retain(|_, r| {
                let keep = r.expires > now;
                if !keep {
                    expired.push(r.addr);
                }
                keep
            });
        }
        for a in &expired {
            self.release(*a);
        }
        expired.len()
    }

    /// Ports in the range, per relay address.
    pub fn capacity(&self) -> usize {
        self.range_len()
    }

    /// Ports taken on `ip` (allocated or reserved).
    pub fn used(&self, ip: IpAddr) -> usize {
        let g = self.lock();
        g.ips
            .iter()
            .find(|p| p.ip == ip)
            .map(|p| p.used.iter().map(|w| w.count_ones() as usize).sum())
            .unwrap_or(0)
    }

    fn index(&self, port: u16) -> Option<usize> {
        (self.min..=self.max)
            .contains(&port)
            .then(|| (port - self.min) as usize)
    }
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn set(bits: &mut [u64], i: usize, v: bool) {
    if v {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exhausts_and_releases() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let pool = PortPool::new([ip], 50000, 50003);
        let mut got: Vec<u16> = (0..4)
            .map(|_| pool.acquire(ip, false, false).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![50000, 50001, 50002, 50003]);
        assert_eq!(pool.acquire(ip, false, false), None);
        pool.release(SocketAddr::new(ip, 50002));
        assert_eq!(pool.acquire(ip, false, false), Some(50002));
        assert_eq!(
            pool.acquire("192.0.2.2".parse().unwrap(), false, false),
            None
        );
    }

    #[test]
    fn even_pairs_and_reservations() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let pool = PortPool::new([ip], 50001, 50004);
        // Only 50002/50003 is an even pair inside the range (50004's successor is outside).
        assert_eq!(pool.acquire(ip, true, true), Some(50002));
        assert_eq!(pool.acquire(ip, true, true), None);
        assert_eq!(pool.acquire(ip, true, false), Some(50004));
        let t0 = Instant::now();
        let tok = pool.reserve(SocketAddr::new(ip, 50003), t0 + Duration::from_secs(30));
        assert_eq!(pool.claim(tok, t0), Some(SocketAddr::new(ip, 50003)));
        assert_eq!(pool.claim(tok, t0), None, "a token is used once");
        assert_eq!(pool.used(ip), 3);
        let tok = pool.reserve(SocketAddr::new(ip, 50003), t0 + Duration::from_secs(30));
        assert_eq!(pool.expire_reservations(t0 + Duration::from_secs(29)), 0);
        assert_eq!(pool.expire_reservations(t0 + Duration::from_secs(30)), 1);
        assert_eq!(pool.claim(tok, t0), None);
        assert_eq!(pool.used(ip), 2);
    }
}
