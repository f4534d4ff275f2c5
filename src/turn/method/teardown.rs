//! An allocation, or one family of a dual allocation, ending (RFC 8656 §7.3: Refresh with
//! LIFETIME 0; expiry; its TCP/TLS control connection closing, §3.1), and an expired
//! channel leaving the data path. Not a method of its own: Refresh, the timers and
//! `Server::client_closed` share it. Its relay sockets and peer connections leave as
//! `Output::ClosePeerConn` and `Output::CloseRelay`, in that order (RFC 6062: the peer
//! connections go with their allocation, before its listener).

use std::time::Instant;

use super::Cx;
use crate::turn::allocation::family_index;
use crate::turn::stats::{transport_index, LIFETIME_SECONDS_BOUNDS, TRANSPORTS};
use crate::turn::usage_tap;
use crate::turn::{ChannelNumber, Output, RelayIo, RelayUsage};
use crate::usage::Event;

/// Why an allocation goes away (for counters and the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::turn) enum DeleteReason {
    Expired,
    Refreshed0,
    ClientClosed,
}

impl DeleteReason {
    fn label(self) -> &'static str {
        match self {
            DeleteReason::Expired => "expired",
            DeleteReason::Refreshed0 => "refresh_zero",
            DeleteReason::ClientClosed => "client_closed",
        }
    }
}

/// Takes an expired channel out of the data path; it stays in the allocation for the
/// cooldown.
pub(in crate::turn) fn deactivate_channel(cx: &mut Cx, slot: usize, number: ChannelNumber) {
    let Some(transport) = cx.tables.get(slot).map(|a| a.tuple.transport) else {
        return;
    };
    if let Some(peer) = cx.tables.deactivate_channel(slot, number) {
        cx.stats
            .channel_deactivated(transport, family_index(peer.ip()));
    }
}

/// Removes an allocation and everything hanging off it; closes its relay sockets and
/// returns ports and quota. `io` is only read (the relays' counters for the usage report
/// and the log line).
pub(in crate::turn) fn delete(
    cx: &mut Cx,
    slot: usize,
    reason: DeleteReason,
    now: Instant,
    io: &impl RelayIo,
) {
    let Some((a, conns)) = cx.tables.remove(slot) else {
        return;
    };
    usage_tap::report(cx.shared, &a, Event::End, now, io);
    let transport = a.tuple.transport;
    for ip in &a.perms {
        cx.stats.permission_removed(transport, family_index(*ip));
    }
    for ch in a.channels.iter().filter(|c| c.active) {
        cx.stats
            .channel_deactivated(transport, family_index(ch.peer.ip()));
    }
    // RFC 6062: the peer connections go with their allocation, before its listener.
    for (c, pc) in conns {
        cx.stats.tcp_conns_by_state[pc.state.index()] -= 1;
        cx.emit(Output::ClosePeerConn(c));
    }
    if a.tcp {
        cx.stats.tcp_allocations -= 1;
    }
    let mut usage = RelayUsage::default();
    for r in a.relays.iter().flatten() {
        usage += io.usage(r.id);
        cx.emit(Output::CloseRelay(r.id));
        cx.shared.ports.release(r.local);
    }
    cx.shared.release_quota(&a.quota_user);
    cx.stats.allocation_removed(transport, a.family());
    match reason {
        DeleteReason::Expired => cx.stats.allocations_expired += 1,
        DeleteReason::Refreshed0 | DeleteReason::ClientClosed => cx.stats.allocations_deleted += 1,
    }
    let lived = now.saturating_duration_since(a.created);
    cx.stats
        .allocation_lifetime_seconds
        .observe(&LIFETIME_SECONDS_BOUNDS, lived.as_secs_f64());
    // Issue 5 item 8: one line per ended allocation, for accounting from journald.
    // The user name only: never a password or key.
    tracing::info!(
        user = %a.username,
        transport = TRANSPORTS[transport_index(transport)],
        tcp_relay = a.tcp,
        client = %a.tuple.client,
        relayed = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
        reason = reason.label(),
        duration_secs = (lived.as_millis() as f64) / 1000.0,
        bytes_to_peer = usage.to_peer_bytes,
        packets_to_peer = usage.to_peer_packets,
        bytes_to_client = usage.to_client_bytes,
        packets_to_client = usage.to_client_packets,
        "allocation ended"
    );
}

/// Refresh with REQUESTED-ADDRESS-FAMILY and LIFETIME 0 on a dual-stack allocation
/// (RFC 8656 §7.3): only that family's relay goes, with its permissions and channels;
/// the allocation lives on with the other family.
pub(in crate::turn) fn delete_family(cx: &mut Cx, slot: usize, v6: bool, io: &impl RelayIo) {
    let fi = usize::from(v6);
    let Some((tuple, username)) = cx.tables.get(slot).map(|a| (a.tuple, a.username.clone())) else {
        return;
    };
    // Pending timer entries of what goes here find nothing and do nothing.
    let Some(gone) = cx.tables.remove_family(slot, fi) else {
        return;
    };
    for _ in 0..gone.perms {
        cx.stats.permission_removed(tuple.transport, fi);
    }
    for _ in 0..gone.active_channels {
        cx.stats.channel_deactivated(tuple.transport, fi);
    }
    let r = gone.relay;
    // The closed relay's counters stay with the allocation for its later reports.
    if let Some(a) = cx.tables.get(slot) {
        let mut mark = a.usage.get();
        mark.closed += io.usage(r.id);
        a.usage.set(mark);
    }
    cx.emit(Output::CloseRelay(r.id));
    cx.shared.ports.release(r.local);
    let ti = transport_index(tuple.transport);
    cx.stats.allocations_by[ti][gone.old_family] -= 1;
    cx.stats.allocations_by[ti][gone.new_family] += 1;
    tracing::info!(
        user = %username,
        client = %tuple.client,
        relayed = %r.advertised,
        "allocation released one address family"
    );
}
