//! Long-term credential check of a request (RFC 8489 §9.2.4): USERNAME or USERHASH,
//! REALM, NONCE, MESSAGE-INTEGRITY(-SHA256); a credential a reload removed still serves
//! the allocation it created.

use stun_types::message::Message;

use super::{Ctx, Cx};
use crate::stun::{attr, find_integrity, method, ErrorCode};
use crate::turn::auth::{AuthError, Verified};
use crate::turn::nonce::NonceCheck;
use crate::turn::request::{connection_id, raw};
use crate::turn::stats::AuthFailure;
use crate::turn::Output;

/// A request's verified credential and the user it names (RFC 8489 §9.2).
pub(super) struct Authenticated {
    pub(super) cred: Verified,
    pub(super) username: String,
}

/// `Err` carries the answer already written (401, 438 or 400), or `None` when the answer
/// was rate-limited.
pub(super) fn check(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    msg: &[u8],
    out: &mut [u8],
) -> Result<Authenticated, Option<Output>> {
    if find_integrity(msg).is_none() {
        return Err(cx.challenge(ctx, out, ErrorCode::Unauthorized));
    }
    let cfg = cx.cfg.clone();
    let username = match (raw(m, attr::USERNAME), raw(m, attr::USERHASH)) {
        (Some(u), _) => match std::str::from_utf8(u) {
            Ok(u) if u.len() <= 513 => u.to_string(),
            _ => return Err(cx.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(()))),
        },
        (None, Some(h)) => match cfg.credentials.user_for_hash(h) {
            Some(u) => u.to_string(),
            None => {
                cx.stats.auth_failure(AuthFailure::UnknownUser);
                return Err(cx.challenge(ctx, out, ErrorCode::Unauthorized));
            }
        },
        (None, None) => {
            return Err(cx.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())))
        }
    };
    let (Some(_realm), Some(nonce)) = (raw(m, attr::REALM), raw(m, attr::NONCE)) else {
        return Err(cx.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())));
    };
    match cx.shared.nonce.check(
        nonce,
        ctx.from.client.ip(),
        ctx.now.unix_secs,
        cfg.nonce_lifetime_secs,
    ) {
        NonceCheck::Valid => {}
        NonceCheck::Stale | NonceCheck::Invalid => {
            cx.stats.auth_failure(AuthFailure::StaleNonce);
            return Err(cx.challenge(ctx, out, ErrorCode::StaleNonce));
        }
    }
    match cfg.credentials.verify(&username, msg) {
        Ok(cred) => Ok(Authenticated { cred, username }),
        Err(e) => {
            if let Some(v) = kept_credential(cx, ctx, m, &username, msg) {
                return Ok(Authenticated { cred: v, username });
            }
            cx.stats.auth_failure(match e {
                AuthError::UnknownUser => AuthFailure::UnknownUser,
                AuthError::BadIntegrity => AuthFailure::BadIntegrity,
            });
            tracing::debug!(client = %ctx.from.client, reason = %e, "authentication failed");
            Err(cx.challenge(ctx, out, ErrorCode::Unauthorized))
        }
    }
}

/// A request on an existing allocation (Refresh, CreatePermission, ChannelBind, Connect;
/// a ConnectionBind, whose allocation its CONNECTION-ID names) whose credential a reload
/// removed (a rotated secret, a deleted static user): verified with the allocation's own
/// key, so rotation stops new allocations without cutting running ones. Not under
/// `strict_expiry`, where such requests get 401 and the allocation ends with its current
/// lifetime.
fn kept_credential(
    cx: &Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    username: &str,
    msg: &[u8],
) -> Option<Verified> {
    if ctx.method == method::ALLOCATE || cx.cfg.strict_expiry {
        return None;
    }
    let slot = if ctx.method == method::CONNECTION_BIND {
        let id = connection_id(m)?;
        cx.tables.conn(id)?.slot
    } else {
        cx.tables.slot_of(&ctx.from)?
    };
    let a = cx.tables.get(slot)?;
    if a.username != username {
        return None;
    }
    a.cred.reverify(msg)
}
