//! Token buckets for message, mint and bandwidth limits (signaling, the HTTP API, the
//! WebSocket relay and the TURN relays' `turn.max_bytes_per_sec`). Pure arithmetic on `now`: no
//! allocation, no lock, so the TURN data path may use them.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate: rate_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now.max(self.last);
    }

    /// Takes `n` tokens if there are that many; false (and nothing taken) otherwise.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Tokens that may be taken now (a splice reads at most this much, then [`Self::spend`]s
    /// what it moved).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens.max(0.0)
    }

    /// Takes `n` tokens already accounted for by [`Self::available`].
    pub fn spend(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// Takes `n` tokens, going into debt if needed, and returns how long the caller must
    /// wait for the debt to be paid (zero when there was enough).
    pub fn take_with_delay(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// True when the bucket is full (an idle client), so its entry can be dropped.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(500)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(500)));
    }

    /// The TURN relays' use (`turn.max_bytes_per_sec`): bytes, one second's worth of burst.
    #[test]
    fn holds_one_second_of_bytes_and_keeps_fractions() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000.0, t0);
        assert!(b.try_take(600.0, t0));
        assert!(b.try_take(400.0, t0));
        assert!(!b.try_take(1.0, t0), "the one-second burst is spent");
        // Half a second earns 500 bytes; fractions of a byte are kept for later.
        assert!(!b.try_take(501.0, t0 + Duration::from_millis(500)));
        assert!(b.try_take(500.0, t0 + Duration::from_millis(500)));
        assert!(b.available(t0 + Duration::from_micros(500_999)) < 1.0);
        assert!((b.available(t0 + Duration::from_millis(502)) - 2.0).abs() < 1e-6);
        b.spend(2.0);
        // A long pause refills to one second's worth, not more.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 1000.0);
    }

    #[test]
    fn debt_gives_delay() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000.0, t0);
        assert_eq!(b.take_with_delay(1000.0, t0), Duration::ZERO);
        let d = b.take_with_delay(500.0, t0);
        assert_eq!(d, Duration::from_millis(500));
    }
}
