//! CreatePermission (RFC 8656 §9): all XOR-PEER-ADDRESSes installed, or none.

use stun_types::message::Message;

use super::{Ctx, Cx};
use crate::stun::ErrorCode;
use crate::turn::auth::Verified;
use crate::turn::request::permission_peers;
use crate::turn::Output;

/// Per-allocation bound (memory is bounded even for a hostile authenticated client).
const MAX_PERMISSIONS: usize = 1024;

/// CreatePermission (RFC 8656 §9.2): all XOR-PEER-ADDRESSes or none.
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
    let peers = match permission_peers(m) {
        Ok(p) => p,
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    let mut relays = Vec::with_capacity(peers.len());
    for p in &peers {
        match cx.check_peer(slot, p.ip()) {
            Ok(r) => relays.push(r),
            Err(code) => return cx.fail(ctx, out, code, v),
        }
    }
    let existing = cx.tables.get(slot).map_or(0, |a| a.perms.len());
    if existing + peers.len() > MAX_PERMISSIONS {
        return cx.fail(ctx, out, ErrorCode::InsufficientCapacity, v);
    }
    for (p, r) in peers.iter().zip(relays) {
        cx.install_permission(slot, r, p.ip(), ctx.now);
    }
    cx.respond(ctx, out, Ok(()), Some(v), |_| Ok(()))
}
