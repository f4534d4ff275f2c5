//! Per-source-IP token buckets for unauthenticated requests, in fixed memory: a fixed
//! array indexed by a keyed hash of the IP (IPv6 by /64), so a flood from spoofed
//! sources allocates nothing and cannot aim more than the configured rate of answers at
//! any one victim (DESIGN.md principle 5).

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::time::Instant;

/// Number of buckets. Collisions only make two sources share a budget.
const BUCKETS: usize = 4096;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f32,
    last: Option<Instant>,
}

/// Token-bucket limiter over a fixed table.
pub struct RateLimiter {
    buckets: Box<[Bucket]>,
    // RandomState is seeded per process: an attacker cannot aim collisions.
    hasher: std::collections::hash_map::RandomState,
    rate: f32,
    burst: f32,
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            buckets: vec![
                Bucket {
                    tokens: 0.0,
                    last: None,
                };
                BUCKETS
            ]
            .into_boxed_slice(),
            hasher: Default::default(),
            rate: rate_per_sec as f32,
            burst: burst.max(1) as f32,
        }
    }

    /// New limits (config reload); buckets keep their state.
    pub fn set_limits(&mut self, rate_per_sec: u32, burst: u32) {
        self.rate = rate_per_sec as f32;
        self.burst = burst.max(1) as f32;
    }

    /// The bucket `ip` shares with every address that hashes alike (IPv6 by /64).
    pub(crate) fn bucket_of(&self, ip: IpAddr) -> usize {
        let mut h = self.hasher.build_hasher();
        match ip {
            IpAddr::V4(a) => a.octets().hash(&mut h),
            IpAddr::V6(a) => a.octets()[..8].hash(&mut h),
        }
        (h.finish() as usize) % BUCKETS
    }

    /// Takes one token for `ip`; false means drop the request.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let i = self.bucket_of(ip);
        let b = &mut self.buckets[i];
        let tokens = match b.last {
            None => self.burst,
            Some(last) => {
                let dt = now.saturating_duration_since(last).as_secs_f32();
                (b.tokens + dt * self.rate).min(self.burst)
            }
        };
        b.last = Some(now);
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            true
        } else {
            b.tokens = tokens;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let mut r = RateLimiter::new(10, 5);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| r.allow(ip, t0)).count();
        assert_eq!(allowed, 5);
        // One second later: 10 more tokens, capped at the burst of 5.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| r.allow(ip, t1)).count(), 5);
        // 100 ms later: one token.
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!((0..100).filter(|_| r.allow(ip, t2)).count(), 1);
        // Another source is not affected by the first one's flood (unless it collides,
        // which the keyed hash makes unpredictable; try a few and expect most to pass).
        let fresh = (1..=20u8)
            .filter(|i| r.allow(IpAddr::from([203, 0, 113, *i]), t2))
            .count();
        assert!(fresh >= 19, "{fresh}");
    }
}
