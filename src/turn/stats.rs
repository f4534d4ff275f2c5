//! Per-shard TURN counters: plain integers owned by one shard, summed at scrape time.
//! Label values are bounded enums (never a user name or an address).

use super::Transport;

/// Client transport labels, indexed by [`transport_index`].
pub const TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];
/// Address family labels (a peer's, a relayed address's).
pub const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];
/// Family labels of an allocation: its relayed addresses (RFC 8656 §7.2 dual allocation).
pub const ALLOCATION_FAMILIES: [&str; 3] = ["ipv4", "ipv6", "dual"];

/// Index of `t` in [`TRANSPORTS`].
pub fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
        Transport::Tls => 2,
    }
}

/// Upper bounds (seconds) of the request handling time histogram.
pub const REQUEST_SECONDS_BOUNDS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1,
];
/// Upper bounds (seconds) of the allocation lifetime histogram.
pub const LIFETIME_SECONDS_BOUNDS: [f64; 11] = [
    10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0,
];

/// A histogram as plain per-bucket counts (not cumulative), so one shard can own it and
/// the scrape can add shards up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Histo<const N: usize> {
    /// Observations `<= bounds[i]` and above the previous bound; those above the last
    /// bound are only in `count`.
    pub buckets: [u64; N],
    pub count: u64,
    pub sum: f64,
}

impl<const N: usize> Default for Histo<N> {
    fn default() -> Self {
        Self {
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histo<N> {
    pub fn observe(&mut self, bounds: &[f64; N], v: f64) {
        if let Some(i) = bounds.iter().position(|&b| v <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    pub fn add(&mut self, o: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
    }

    /// Cumulative counts per bound, as Prometheus wants them.
    pub fn cumulative(&self) -> [u64; N] {
        let mut c = self.buckets;
        for i in 1..N {
            c[i] += c[i - 1];
        }
        c
    }
}

/// Request methods, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodLabel {
    Binding,
    Allocate,
    Refresh,
    CreatePermission,
    ChannelBind,
    /// RFC 6062 §5.2.
    Connect,
    /// RFC 6062 §5.4.
    ConnectionBind,
    Other,
}

impl MethodLabel {
    pub const ALL: [MethodLabel; 8] = [
        MethodLabel::Binding,
        MethodLabel::Allocate,
        MethodLabel::Refresh,
        MethodLabel::CreatePermission,
        MethodLabel::ChannelBind,
        MethodLabel::Connect,
        MethodLabel::ConnectionBind,
        MethodLabel::Other,
    ];

    fn index(self) -> usize {
        MethodLabel::ALL
            .iter()
            .position(|&x| x == self)
            .unwrap_or(MethodLabel::ALL.len() - 1)
    }

    pub fn name(self) -> &'static str {
        match self {
            MethodLabel::Binding => "binding",
            MethodLabel::Allocate => "allocate",
            MethodLabel::Refresh => "refresh",
            MethodLabel::CreatePermission => "create_permission",
            MethodLabel::ChannelBind => "channel_bind",
            MethodLabel::Connect => "connect",
            MethodLabel::ConnectionBind => "connection_bind",
            MethodLabel::Other => "other",
        }
    }
}

/// Result codes a request can get (0 = success, 999 = any other code), in counter order.
pub const RESULT_CODES: [u16; 17] = [
    0, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 446, 447, 486, 500, 508, 999,
];

/// Label of `RESULT_CODES[i]` for a metric: "success", the code ("401"), or "other".
pub fn result_label(i: usize) -> &'static str {
    const LABELS: [&str; RESULT_CODES.len()] = [
        "success", "400", "401", "403", "420", "437", "438", "440", "441", "442", "443", "446",
        "447", "486", "500", "508", "other",
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

/// Outcomes of RFC 6062 Connect requests (§5.2), in [`TurnStats::tcp_connects`] order:
/// `ok` (success response sent), `failed` (447: the connect failed or could not start),
/// `timeout` (447: no connection within 30 s), `refused` (an error answer before any
/// connect: 400, 403, 437, 441, 443, 446, 508).
pub const TCP_CONNECT_RESULTS: [&str; 4] = ["ok", "failed", "timeout", "refused"];
pub(crate) const CONNECT_OK: usize = 0;
pub(crate) const CONNECT_FAILED: usize = 1;
pub(crate) const CONNECT_TIMEOUT: usize = 2;
pub(crate) const CONNECT_REFUSED: usize = 3;
/// Outcomes of incoming peer connections on a TCP relay (§5.3): `attempt_sent`
/// (ConnectionAttempt indication queued), `no_permission`, `over_limit`.
pub const TCP_PEER_RESULTS: [&str; 3] = ["attempt_sent", "no_permission", "over_limit"];
pub(crate) const PEER_ATTEMPT_SENT: usize = 0;
pub(crate) const PEER_NO_PERMISSION: usize = 1;
pub(crate) const PEER_OVER_LIMIT: usize = 2;
/// Outcomes of ConnectionBind (§5.4) and of the wait for it: `ok`, `rejected` (400 or 441
/// after the credential checks), `expired` (no ConnectionBind within 30 s).
pub const TCP_BIND_RESULTS: [&str; 3] = ["ok", "rejected", "expired"];
pub(crate) const BIND_OK: usize = 0;
pub(crate) const BIND_REJECTED: usize = 1;
pub(crate) const BIND_EXPIRED: usize = 2;
/// States of a peer connection: `connecting` (Connect sent, not connected yet), `pending`
/// (connected, waiting for its ConnectionBind), `bound` (spliced to a client data connection).
pub const TCP_CONN_STATES: [&str; 3] = ["connecting", "pending", "bound"];

/// Counters of one shard's TURN core.
#[derive(Debug, Clone, Default)]
pub struct TurnStats {
    /// Requests by method (index of [`MethodLabel::ALL`]) and result ([`RESULT_CODES`]).
    pub requests: [[u64; RESULT_CODES.len()]; MethodLabel::ALL.len()],
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
    /// Live allocations by client transport ([`TRANSPORTS`]) and relayed family
    /// ([`ALLOCATION_FAMILIES`]).
    pub allocations_by: [[u64; 3]; 3],
    /// Live permissions by client transport and peer family ([`FAMILIES`]).
    pub permissions_by: [[u64; 2]; 3],
    /// Live (active) channel bindings by client transport and peer family.
    pub channels_by: [[u64; 2]; 3],
    /// Time to handle one request, measured by the IO driver.
    pub request_seconds: Histo<{ REQUEST_SECONDS_BOUNDS.len() }>,
    /// Lifetime of ended allocations.
    pub allocation_lifetime_seconds: Histo<{ LIFETIME_SECONDS_BOUNDS.len() }>,
    /// Live RFC 6062 TCP allocations (also counted in `allocations_by`).
    pub tcp_allocations: u64,
    /// Connect requests by outcome ([`TCP_CONNECT_RESULTS`]).
    pub tcp_connects: [u64; 4],
    /// Incoming peer connections by outcome ([`TCP_PEER_RESULTS`]).
    pub tcp_peer_incoming: [u64; 3],
    /// ConnectionBinds by outcome ([`TCP_BIND_RESULTS`]).
    pub tcp_binds: [u64; 3],
    /// Live peer connections by state ([`TCP_CONN_STATES`]).
    pub tcp_conns_by_state: [u64; 3],
}

impl TurnStats {
    pub(crate) fn request(&mut self, m: MethodLabel, code: u16) {
        self.requests[m.index()][result_index(code)] += 1;
    }

    pub(crate) fn auth_failure(&mut self, r: AuthFailure) {
        let i = AuthFailure::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.auth_failures[i] += 1;
    }

    /// Requests of method `m` answered with `code` (0 = success).
    pub fn requests_with(&self, m: MethodLabel, code: u16) -> u64 {
        self.requests[m.index()][result_index(code)]
    }

    pub(crate) fn allocation_added(&mut self, t: Transport, family: usize) {
        self.allocations_active += 1;
        self.allocations_by[transport_index(t)][family] += 1;
    }

    pub(crate) fn allocation_removed(&mut self, t: Transport, family: usize) {
        self.allocations_active -= 1;
        self.allocations_by[transport_index(t)][family] -= 1;
    }

    pub(crate) fn permission_added(&mut self, t: Transport, family: usize) {
        self.permissions_created += 1;
        self.permissions_active += 1;
        self.permissions_by[transport_index(t)][family] += 1;
    }

    pub(crate) fn permission_removed(&mut self, t: Transport, family: usize) {
        self.permissions_active -= 1;
        self.permissions_by[transport_index(t)][family] -= 1;
    }

    pub(crate) fn channel_activated(&mut self, t: Transport, family: usize) {
        self.channels_active += 1;
        self.channels_by[transport_index(t)][family] += 1;
    }

    pub(crate) fn channel_deactivated(&mut self, t: Transport, family: usize) {
        self.channels_active -= 1;
        self.channels_by[transport_index(t)][family] -= 1;
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
        for (a, b) in self.allocations_by.iter_mut().zip(o.allocations_by.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        for (a, b) in self.permissions_by.iter_mut().zip(o.permissions_by.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        for (a, b) in self.channels_by.iter_mut().zip(o.channels_by.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        self.tcp_allocations += o.tcp_allocations;
        for (a, b) in [
            (&mut self.tcp_connects[..], &o.tcp_connects[..]),
            (&mut self.tcp_peer_incoming[..], &o.tcp_peer_incoming[..]),
            (&mut self.tcp_binds[..], &o.tcp_binds[..]),
            (&mut self.tcp_conns_by_state[..], &o.tcp_conns_by_state[..]),
        ] {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        self.request_seconds.add(&o.request_seconds);
        self.allocation_lifetime_seconds
            .add(&o.allocation_lifetime_seconds);
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

    #[test]
    fn histogram_buckets_add_up() {
        let bounds = [1.0, 10.0];
        let mut a = Histo::<2>::default();
        a.observe(&bounds, 0.5);
        a.observe(&bounds, 1.0);
        a.observe(&bounds, 5.0);
        a.observe(&bounds, 50.0);
        let mut t = Histo::<2>::default();
        t.add(&a);
        t.add(&a);
        assert_eq!(t.cumulative(), [4, 6]);
        assert_eq!(t.count, 8);
        assert_eq!(t.sum, 113.0);
    }
}
