//! ChannelBind (RFC 8656 §11): binds a channel number to a peer (and installs or
//! refreshes its permission), with the rebind rules and the per-allocation bound.

use std::time::Duration;

use stun_types::message::Message;

use super::{Ctx, Cx};
use crate::stun::ErrorCode;
use crate::turn::allocation::family_index;
use crate::turn::auth::Verified;
use crate::turn::request::ChannelBind;
use crate::turn::timers::TimerKind;
use crate::turn::Output;

/// Per-allocation bound (memory is bounded even for a hostile authenticated client).
const MAX_CHANNELS: usize = 4096;

/// ChannelBind (RFC 8656 §11.2).
pub(super) fn handle(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    out: &mut [u8],
    v: &Verified,
    username: &str,
) -> Option<Output> {
    let slot = match cx.own_allocation(ctx, out, v, username) {
        Ok(s) => s,
        Err(a) => return a,
    };
    // RFC 6062 §5: a TCP allocation has no channels (data goes over connections).
    if cx.tables.get(slot).is_some_and(|a| a.tcp) {
        return cx.fail(ctx, out, ErrorCode::BadRequest, v);
    }
    let ChannelBind { number, peer } = match ChannelBind::decode(m) {
        Ok(r) => r,
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    let relay = match cx.check_peer(slot, peer.ip()) {
        Ok(r) => r,
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    let a = cx.tables.get(slot)?;
    // Rebind rules (§11.2): the number may not move to another peer, nor the peer
    // to another number, also during an expired binding's cooldown; refreshing the
    // same binding is fine (and revives it from the cooldown).
    let conflict = a
        .channels
        .iter()
        .any(|c| (c.number == number) != (c.peer == peer));
    if conflict {
        return cx.fail(ctx, out, ErrorCode::BadRequest, v);
    }
    let exists = a.channels.iter().any(|c| c.number == number);
    if !exists && a.channels.len() >= MAX_CHANNELS {
        return cx.fail(ctx, out, ErrorCode::InsufficientCapacity, v);
    }
    let id = a.id;
    let transport = a.tuple.transport;
    let expires = ctx.now.mono + Duration::from_secs(cx.cfg.channel_lifetime_secs as u64);
    let bound = cx.tables.bind_channel(slot, relay, number, peer, expires)?;
    if bound.created {
        cx.stats.channels_created += 1;
        cx.push_timer(expires, TimerKind::Channel { slot, id, number });
    }
    if bound.activated {
        cx.stats
            .channel_activated(transport, family_index(peer.ip()));
    }
    cx.install_permission(slot, relay, peer.ip(), ctx.now);
    cx.respond(ctx, out, Ok(()), Some(v), |_| Ok(()))
}
