//! The WebSocket data relay (`/relay`): the last resort when ICE fails entirely.
//!
//! Owns relay tickets, session pairing and the byte pipes between the two sides, with
//! backpressure (a byte-counting semaphore per direction: a slow receiver stops the
//! sender's socket from being read), the frame limit (close 1009), bandwidth caps and the
//! session limit. It must not inspect, log or keep payloads: clients may encrypt end to end.

mod session;

pub use session::{run_side, RelaySide};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::RelayWsConfig;
use crate::rate::TokenBucket;

/// Why a relay request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    #[error("relay session limit reached")]
    Full,
    #[error("unknown, used or expired relay ticket")]
    BadTicket,
}

/// A frame in flight and the buffer budget it holds until written out.
pub(crate) type Chunk = (Bytes, OwnedSemaphorePermit);

/// Counts live sessions; decremented when both sides (or the unclaimed ends) are gone.
/// Shared by both sides: a cancelled session's waiting side reads why from here.
struct SessionSlot {
    hub_active: Arc<AtomicUsize>,
    cancelled: std::sync::OnceLock<&'static str>,
}

impl SessionSlot {
    /// The close a side gets when its pipe to the other side ends: 1000 "peer left", or
    /// 1013 (try again later) with the reason the session was cancelled before the other
    /// side came ([`RelayHub::cancel`]).
    fn peer_gone(&self) -> (u16, &'static str) {
        match self.cancelled.get() {
            Some(reason) => (1013, reason),
            None => (1000, "peer left"),
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.hub_active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Pending {
    expires: Instant,
    sides: [Option<RelaySide>; 2],
    slot: Arc<SessionSlot>,
}

#[derive(Default)]
struct Tables {
    tickets: HashMap<String, (u64, usize, Instant)>,
    pending: HashMap<u64, Pending>,
}

/// Relay counters for the metrics face.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub bytes_forwarded: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub sessions_started: AtomicU64,
    pub oversized_frames: AtomicU64,
    pub bad_tickets: AtomicU64,
    /// Sessions ended before their second side came ([`RelayHub::cancel`]).
    pub sessions_cancelled: AtomicU64,
}

/// Shared relay state: tickets, waiting sessions, limits.
pub struct RelayHub {
    cfg: RelayWsConfig,
    ticket_ttl: Duration,
    tables: Mutex<Tables>,
    active: Arc<AtomicUsize>,
    global: Option<Mutex<TokenBucket>>,
    pub stats: RelayStats,
}

impl RelayHub {
    pub fn new(cfg: RelayWsConfig, ticket_ttl: Duration) -> Arc<Self> {
        let global = (cfg.global_bytes_per_sec > 0).then(|| {
            let rate = cfg.global_bytes_per_sec as f64;
            Mutex::new(TokenBucket::new(
                rate,
                rate.max(cfg.max_frame_bytes as f64),
                Instant::now(),
            ))
        });
        Arc::new(Self {
            cfg,
            ticket_ttl,
            tables: Mutex::new(Tables::default()),
            active: Arc::new(AtomicUsize::new(0)),
            global,
            stats: RelayStats::default(),
        })
    }

    pub fn config(&self) -> &RelayWsConfig {
        &self.cfg
    }

    /// Sessions registered and not yet finished.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Registers a session for two tickets (one per side), issued by signaling.
    pub fn register(
        &self,
        session: u64,
        tickets: [&str; 2],
        now: Instant,
    ) -> Result<(), RelayError> {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        Self::sweep_locked(&mut t, now);
        // Claim a slot atomically against concurrent registrations.
        let prev = self.active.fetch_add(1, Ordering::Relaxed);
        if prev >= self.cfg.max_sessions {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return Err(RelayError::Full);
        }
        let slot = Arc::new(SessionSlot {
            hub_active: Arc::clone(&self.active),
            cancelled: std::sync::OnceLock::new(),
        });
        let budget = self.cfg.buffer_bytes;
        let (tx01, rx01) = mpsc::unbounded_channel::<Chunk>();
        let (tx10, rx10) = mpsc::unbounded_channel::<Chunk>();
        let sem01 = Arc::new(Semaphore::new(budget));
        let sem10 = Arc::new(Semaphore::new(budget));
        let expires = now + self.ticket_ttl;
        let side0 = RelaySide::new(tx01, sem01, rx10, Arc::clone(&slot), &self.cfg);
        let side1 = RelaySide::new(tx10, sem10, rx01, Arc::clone(&slot), &self.cfg);
        t.pending.insert(
            session,
            Pending {
                expires,
                sides: [Some(side0), Some(side1)],
                slot,
            },
        );
        t.tickets
            .insert(tickets[0].to_string(), (session, 0, expires));
        t.tickets
            .insert(tickets[1].to_string(), (session, 1, expires));
        self.stats.sessions_started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes one side of a session with its ticket (single use).
    pub fn claim(&self, ticket: &str, now: Instant) -> Result<RelaySide, RelayError> {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        Self::sweep_locked(&mut t, now);
        let Some((session, side, expires)) = t.tickets.remove(ticket) else {
            self.stats.bad_tickets.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::BadTicket);
        };
        if expires <= now {
            self.stats.bad_tickets.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::BadTicket);
        }
        let Some(p) = t.pending.get_mut(&session) else {
            return Err(RelayError::BadTicket);
        };
        let end = p.sides[side].take().ok_or(RelayError::BadTicket)?;
        if p.sides.iter().all(Option::is_none) {
            t.pending.remove(&session);
        }
        Ok(end)
    }

    /// Ends the session of `ticket` if that side never connected: its partner can no
    /// longer get the ticket (signaling could not deliver it). Both tickets stop working,
    /// the session's slot is freed, and a side already waiting is closed at once with
    /// 1013 and `reason` instead of waiting for the tickets to expire. False when the
    /// ticket is unknown or already used (the session then goes on).
    pub fn cancel(&self, ticket: &str, reason: &'static str) -> bool {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&(session, _, _)) = t.tickets.get(ticket) else {
            return false;
        };
        t.tickets.retain(|_, (s, _, _)| *s != session);
        let Some(p) = t.pending.remove(&session) else {
            return false;
        };
        // Set before the unclaimed side drops: the waiting side reads it when its pipe
        // closes.
        let _ = p.slot.cancelled.set(reason);
        drop(p);
        self.stats
            .sessions_cancelled
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops expired tickets and sessions whose second side never came (the waiting side
    /// then sees its pipe close and is told).
    pub fn sweep(&self, now: Instant) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        Self::sweep_locked(&mut t, now);
    }

    fn sweep_locked(t: &mut Tables, now: Instant) {
        t.tickets.retain(|_, (_, _, exp)| *exp > now);
        t.pending.retain(|_, p| p.expires > now);
    }

    /// Waits as long as the global bandwidth cap requires for `n` more bytes.
    pub(crate) fn global_delay(&self, n: usize) -> Duration {
        match &self.global {
            Some(b) => b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_with_delay(n as f64, Instant::now()),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayWsConfig {
        RelayWsConfig {
            max_sessions: 2,
            ..RelayWsConfig::default()
        }
    }

    #[test]
    fn tickets_are_single_use_and_expire() {
        let hub = RelayHub::new(cfg(), Duration::from_secs(60));
        let t0 = Instant::now();
        hub.register(1, ["a", "b"], t0).unwrap();
        assert!(hub.claim("a", t0).is_ok());
        assert_eq!(hub.claim("a", t0).err(), Some(RelayError::BadTicket));
        assert_eq!(hub.claim("zzz", t0).err(), Some(RelayError::BadTicket));
        hub.register(2, ["c", "d"], t0).unwrap();
        assert_eq!(
            hub.claim("c", t0 + Duration::from_secs(61)).err(),
            Some(RelayError::BadTicket)
        );
    }

    #[test]
    fn a_cancelled_session_closes_its_waiting_side_with_the_reason_and_frees_its_slot() {
        let hub = RelayHub::new(cfg(), Duration::from_secs(60));
        let t0 = Instant::now();
        hub.register(1, ["a", "b"], t0).unwrap();
        let mut a = hub.claim("a", t0).unwrap();
        assert!(!hub.cancel("zzz", "why"), "unknown ticket");
        assert!(
            !hub.cancel("a", "why"),
            "a used ticket: the session goes on"
        );
        assert!(hub.cancel("b", "the ticket could not be delivered"));
        // The waiting side's pipe from the other side is closed now, not at expiry, and
        // it is told why.
        assert!(matches!(
            a.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(
            a.slot.peer_gone(),
            (1013, "the ticket could not be delivered")
        );
        assert_eq!(hub.claim("b", t0).err(), Some(RelayError::BadTicket));
        drop(a);
        assert_eq!(hub.active_sessions(), 0);
        assert_eq!(hub.stats.sessions_cancelled.load(Ordering::Relaxed), 1);
        // Uncancelled sessions still say "peer left".
        hub.register(2, ["c", "d"], t0).unwrap();
        let c = hub.claim("c", t0).unwrap();
        assert_eq!(c.slot.peer_gone(), (1000, "peer left"));
        // An unclaimed session (nobody waiting) is cancelled by either ticket.
        hub.register(3, ["e", "f"], t0).unwrap();
        assert!(hub.cancel("e", "why"));
        assert_eq!(hub.claim("f", t0).err(), Some(RelayError::BadTicket));
    }

    #[test]
    fn session_limit_and_release() {
        let hub = RelayHub::new(cfg(), Duration::from_secs(60));
        let t0 = Instant::now();
        hub.register(1, ["a", "b"], t0).unwrap();
        hub.register(2, ["c", "d"], t0).unwrap();
        assert_eq!(hub.register(3, ["e", "f"], t0), Err(RelayError::Full));
        let a = hub.claim("a", t0).unwrap();
        let b = hub.claim("b", t0).unwrap();
        assert_eq!(hub.active_sessions(), 2);
        drop(a);
        assert_eq!(hub.active_sessions(), 2, "one side still holds the session");
        drop(b);
        assert_eq!(hub.active_sessions(), 1);
        // An unclaimed session is released when its tickets expire.
        hub.sweep(t0 + Duration::from_secs(61));
        assert_eq!(hub.active_sessions(), 0);
        hub.register(4, ["g", "h"], t0 + Duration::from_secs(61))
            .unwrap();
    }
}
