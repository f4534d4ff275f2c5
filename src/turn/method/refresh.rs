//! Refresh (RFC 8656 §7.3): a new lifetime, or LIFETIME 0 ending the allocation (or,
//! with REQUESTED-ADDRESS-FAMILY, one family of a dual allocation).

use std::time::Duration;

use stun_types::message::Message;

use super::teardown::{self, DeleteReason};
use super::{Ctx, Cx};
use crate::stun::{attr, ErrorCode};
use crate::turn::auth::Verified;
use crate::turn::request::{lifetime, refresh_family, Family};
use crate::turn::stats::AuthFailure;
use crate::turn::tables::Refreshed;
use crate::turn::timers::TimerKind;
use crate::turn::usage_tap;
use crate::turn::{Output, RelayIo};

/// Refresh (RFC 8656 §7.3).
pub(super) fn handle(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    out: &mut [u8],
    v: &Verified,
    username: &str,
    io: &mut impl RelayIo,
) -> Option<Output> {
    let slot = match cx.own_allocation(ctx, out, v, username) {
        Ok(s) => s,
        Err(a) => return a,
    };
    let raf = match refresh_family(m) {
        Ok(f) => f.map(Family::is_v6),
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    if let Some(v6) = raf {
        let has = cx
            .tables
            .get(slot)
            .is_some_and(|a| a.relays[usize::from(v6)].is_some());
        if !has {
            return cx.fail(ctx, out, ErrorCode::PeerAddressFamilyMismatch, v);
        }
    }
    let requested = match lifetime(m) {
        Ok(l) => l,
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    if requested == Some(0) {
        let dual = cx
            .tables
            .get(slot)
            .is_some_and(|a| a.relays.iter().all(Option::is_some));
        // RFC 8656 §7.3: with REQUESTED-ADDRESS-FAMILY only that family's relay goes;
        // the allocation stays while the other family remains.
        match raf {
            Some(v6) if dual => teardown::delete_family(cx, slot, v6, io),
            _ => teardown::delete(cx, slot, DeleteReason::Refreshed0, ctx.now.mono, io),
        }
        return cx.respond(ctx, out, Ok(()), Some(v), |w| w.attr_u32(attr::LIFETIME, 0));
    }
    let Some(lifetime) = cx.grant_lifetime(requested, v, ctx.now) else {
        cx.stats.auth_failure(AuthFailure::Expired);
        return cx.challenge(ctx, out, ErrorCode::Unauthorized);
    };
    // Over a byte budget: no more lifetime; the allocation ends when its current one
    // runs out (issue 14).
    if let Some(b) = usage_tap::over_budget(cx.shared, cx.cfg, &v.quota_user) {
        let err = Err(ErrorCode::AllocationQuotaReached);
        return cx.respond_reason(ctx, out, err, b.reason_phrase(), Some(v), |_| Ok(()));
    }
    let expires = ctx.now.mono + Duration::from_secs(lifetime as u64);
    match cx.tables.refresh(slot, expires, lifetime) {
        Refreshed::Gone => return None,
        Refreshed::Done => {}
        Refreshed::RearmEarlier { id } => {
            cx.push_timer(expires, TimerKind::Allocation { slot, id })
        }
    }
    // Cluster mode: the user's quota lease is renewed with the allocation.
    if let (Some(c), Some(a)) = (cx.shared.cluster(), cx.tables.get(slot)) {
        c.renew(&a.quota_user, expires);
    }
    cx.respond(ctx, out, Ok(()), Some(v), |w| {
        w.attr_u32(attr::LIFETIME, lifetime)
    })
}
