//! Per-shard TURN counters: plain integers owned by one shard, summed at scrape time.
//! Label values are bounded enums (never a user name or an address).

/// Request methods, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodLabel {
    Binding,
    Allocate,
    Refresh,
    CreatePermission,
    ChannelBind,
    Other,
}

impl MethodLabel {
    pub const ALL: [MethodLabel; 6] = [
        MethodLabel::Binding,
        MethodLabel::Allocate,
        MethodLabel::Refresh,
        MethodLabel::CreatePermission,
        MethodLabel::ChannelBind,
        MethodLabel::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MethodLabel::Binding => "binding",
            MethodLabel::Allocate => "allocate",
            MethodLabel::Refresh => "refresh",
            MethodLabel::CreatePermission => "create_permission",
            MethodLabel::ChannelBind => "channel_bind",
            MethodLabel::Other => "other",
        }
    }
}

/// Result codes a request can get (0 = success, 999 = any other code), in counter order.
pub const RESULT_CODES: [u16; 15] = [
    0, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508, 999,
];

/// Label of `RESULT_CODES[i]` for a metric: "success", the code ("401"), or "other".
pub fn result_label(i: usize) -> &'static str {
    const LABELS: [&str; RESULT_CODES.len()] = [
        "success", "400", "401", "403", "420", "437", "438", "440", "441", "442", "443", "486",
        "500", "508", "other",
    ];
    LABELS.get(i).copied().unwrap_or("other")
}

fn result_index(code: u16) -> usize {
    RESULT_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(RESULT_CODES.len() - 1)
}

/// Why a request failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    BadIntegrity,
    UnknownUser,
    Expired,
    StaleNonce,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::BadIntegrity,
        AuthFailure::UnknownUser,
        AuthFailure::Expired,
        AuthFailure::StaleNonce,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired",
            AuthFailure::StaleNonce => "stale_nonce",
        }
    }
}

/// Counters of one shard's TURN core.
#[derive(Debug, Clone, Default)]
pub struct TurnStats {
    /// Requests by method (index of [`MethodLabel::ALL`]) and result ([`RESULT_CODES`]).
    pub requests: [[u64; RESULT_CODES.len()]; 6],
    /// Authentication failures by reason (index of [`AuthFailure::ALL`]).
    pub auth_failures: [u64; 4],
    /// Unauthenticated requests dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// Permissions or channels refused by the peer policy (403).
    pub peer_denied: u64,
    /// 420 answers.
    pub unknown_attributes: u64,
    /// Messages dropped as malformed (bad framing, bad FINGERPRINT, bad attributes).
    pub malformed: u64,
    pub bindings: u64,
    pub allocations_created: u64,
    pub allocations_expired: u64,
    pub allocations_deleted: u64,
    pub allocations_active: u64,
    pub permissions_created: u64,
    pub permissions_active: u64,
    pub channels_created: u64,
    pub channels_active: u64,
    pub reservations_created: u64,
    /// Send indications relayed, and dropped (no allocation or no permission).
    pub sends_forwarded: u64,
    pub sends_dropped: u64,
}

impl TurnStats {
    pub(crate) fn request(&mut self, m: MethodLabel, code: u16) {
        let mi = MethodLabel::ALL.iter().position(|&x| x == m).unwrap_or(5);
        self.requests[mi][result_index(code)] += 1;
    }

    pub(crate) fn auth_failure(&mut self, r: AuthFailure) {
        let i = AuthFailure::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.auth_failures[i] += 1;
    }

    /// Requests of method `m` answered with `code` (0 = success).
    pub fn requests_with(&self, m: MethodLabel, code: u16) -> u64 {
        let mi = MethodLabel::ALL.iter().position(|&x| x == m).unwrap_or(5);
        self.requests[mi][result_index(code)]
    }

    pub fn auth_failures_for(&self, r: AuthFailure) -> u64 {
        self.auth_failures[AuthFailure::ALL.iter().position(|&x| x == r).unwrap_or(0)]
    }

    /// Adds another shard's counters (scrape-time sum).
    pub fn add(&mut self, o: &TurnStats) {
        for (a, b) in self.requests.iter_mut().zip(o.requests.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        for (x, y) in self.auth_failures.iter_mut().zip(o.auth_failures.iter()) {
            *x += y;
        }
        self.rate_limited += o.rate_limited;
        self.peer_denied += o.peer_denied;
        self.unknown_attributes += o.unknown_attributes;
        self.malformed += o.malformed;
        self.bindings += o.bindings;
        self.allocations_created += o.allocations_created;
        self.allocations_expired += o.allocations_expired;
        self.allocations_deleted += o.allocations_deleted;
        self.allocations_active += o.allocations_active;
        self.permissions_created += o.permissions_created;
        self.permissions_active += o.permissions_active;
        self.channels_created += o.channels_created;
        self.channels_active += o.channels_active;
        self.reservations_created += o.reservations_created;
        self.sends_forwarded += o.sends_forwarded;
        self.sends_dropped += o.sends_dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_labels() {
        let mut a = TurnStats::default();
        a.request(MethodLabel::Allocate, 401);
        a.request(MethodLabel::Allocate, 0);
        a.request(MethodLabel::Refresh, 299);
        let mut total = TurnStats::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.requests_with(MethodLabel::Allocate, 401), 2);
        assert_eq!(total.requests_with(MethodLabel::Allocate, 0), 2);
        assert_eq!(total.requests_with(MethodLabel::Refresh, 999), 2);
        assert_eq!(result_label(0), "success");
        assert_eq!(result_label(2), "401");
        assert_eq!(result_label(RESULT_CODES.len() - 1), "other");
    }
}
