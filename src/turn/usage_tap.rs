//! The TURN core's one seam into usage accounting (issue 14, `crate::usage`): reads an
//! allocation's relay counters (kept by the IO driver, reported through `RelayIo::usage`)
//! at its start, at every `usage.interim_secs` and at its end, and hands the difference to
//! the ledger; checks a user's byte budgets on Allocate and Refresh. Nothing here runs per
//! packet.

use std::time::{Duration, Instant};

use super::allocation::Allocation;
use super::server_config::{ServerConfig, Shared};
use super::{RelayIo, RelayUsage};
use crate::usage::{Budget, Event, UsageRecord};

/// When the next interim report of an allocation created or reported at `now` is due;
/// `None` when accounting is off.
pub(super) fn next_report(shared: &Shared, cfg: &ServerConfig, now: Instant) -> Option<Instant> {
    shared.usage()?;
    Some(now + Duration::from_secs(u64::from(cfg.usage_interim_secs.max(1))))
}

/// Reports what `a` relayed since its previous report. Call before its relays close.
pub(super) fn report(
    shared: &Shared,
    a: &Allocation,
    event: Event,
    now: Instant,
    io: &impl RelayIo,
) {
    let Some(ledger) = shared.usage() else {
        return;
    };
    let mut mark = a.usage.get();
    let mut total = mark.closed;
    for r in a.relays.iter().flatten() {
        total += io.usage(r.id);
    }
    let sent = mark.sent;
    let delta = RelayUsage {
        to_peer_bytes: total.to_peer_bytes.saturating_sub(sent.to_peer_bytes),
        to_peer_packets: total.to_peer_packets.saturating_sub(sent.to_peer_packets),
        to_client_bytes: total.to_client_bytes.saturating_sub(sent.to_client_bytes),
        to_client_packets: total
            .to_client_packets
            .saturating_sub(sent.to_client_packets),
    };
    let alloc_ms = now.saturating_duration_since(mark.at).as_millis() as u64;
    mark.sent = total;
    mark.at = now;
    a.usage.set(mark);
    ledger.record(UsageRecord {
        user: a.quota_user.clone(),
        event,
        tcp: a.tcp,
        delta,
        alloc_ms,
        total,
        age_ms: now.saturating_duration_since(a.created).as_millis() as u64,
    });
}

/// Hands `a`'s relays the cap its user's allocations share (`turn.user_max_bytes_per_sec`),
/// when one is set. At Allocate, after its relays opened.
pub(super) fn attach_user_cap(
    shared: &Shared,
    cfg: &ServerConfig,
    a: &Allocation,
    io: &mut impl RelayIo,
) {
    let Some(ledger) = shared.usage() else {
        return;
    };
    ledger.caps.set_rate(cfg.user_max_bytes_per_sec);
    if let Some(cap) = ledger.caps.get(ledger.user_of(&a.quota_user)) {
        for r in a.relays.iter().flatten() {
            io.set_user_cap(r.id, std::sync::Arc::clone(&cap));
        }
    }
}

/// A reloaded config: live user caps take the new `turn.user_max_bytes_per_sec` at once.
pub(super) fn reconfigured(shared: &Shared, cfg: &ServerConfig) {
    if let Some(ledger) = shared.usage() {
        ledger.caps.set_rate(cfg.user_max_bytes_per_sec);
    }
}

/// Whether `quota_user` has used up a byte budget (486 on Allocate and Refresh).
pub(super) fn over_budget(shared: &Shared, cfg: &ServerConfig, quota_user: &str) -> Option<Budget> {
    shared
        .usage()?
        .over_budget(quota_user, cfg.user_bytes_per_day, cfg.user_bytes_per_month)
}
