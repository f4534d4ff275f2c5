//! Writing responses (RFC 8489 §6.3): success and error responses with SOFTWARE,
//! MESSAGE-INTEGRITY(-SHA256) when the request was authenticated, and FINGERPRINT;
//! 401/438 challenges with REALM and NONCE. Also counts every answer.

use super::alternates::Alternate;
use super::auth::Verified;
use super::server::Server;
use super::stats::MethodLabel;
use super::{Action, FiveTuple, Now};
use crate::stun::{attr, class, message_type, IntegrityKind, MessageWriter, WriteError};

/// The request being answered.
#[derive(Clone, Copy)]
pub(super) struct Ctx {
    pub method: u16,
    pub label: MethodLabel,
    pub txid: [u8; 12],
    pub from: FiveTuple,
    pub now: Now,
}

/// Reason phrases (RFC 8489 §14.8, RFC 8656 §18, RFC 6062 §6.3).
pub(super) fn reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        446 => "Connection Already Exists",
        447 => "Connection Timeout or Failure",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

impl Server {
    /// Writes a response. `body` adds the method-specific attributes; `auth` signs it.
    /// `code` 0 = success. SOFTWARE is left out of unauthenticated error responses so they
    /// stay small (no amplification, DESIGN.md principle 5).
    pub(super) fn respond(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        code: u16,
        auth: Option<&Verified>,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Action {
        self.stats.request(ctx.label, code);
        let cls = if code == 0 {
            class::SUCCESS
        } else {
            class::ERROR
        };
        let software = &self.cfg.software;
        let res = (|| {
            let mut w = MessageWriter::new(out, message_type(ctx.method, cls), ctx.txid)?;
            if code != 0 {
                w.error_code(code, reason(code))?;
            }
            body(&mut w)?;
            if !software.is_empty() && (code == 0 || auth.is_some()) {
                w.attr(attr::SOFTWARE, software.as_bytes())?;
            }
            if let Some(v) = auth {
                match v.kind {
                    IntegrityKind::Sha1 => w.integrity_sha1(v.key.as_bytes())?,
                    IntegrityKind::Sha256 => w.integrity_sha256(v.key.as_bytes())?,
                }
            }
            w.finish_with_fingerprint()
        })();
        match res {
            Ok(n) => Action::Reply(n),
            Err(_) => Action::None,
        }
    }

    /// An answer to a request that is not (yet) authenticated: subject to the per-source
    /// rate limit; dropped (and counted) past it.
    pub(super) fn respond_unauth(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        code: u16,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Action {
        if !self.limiter.allow(ctx.from.client.ip(), ctx.now.mono) {
            self.stats.rate_limited += 1;
            return Action::None;
        }
        self.respond(ctx, out, code, None, body)
    }

    /// No room for a new allocation (full, out of relay ports, or draining): 300 Try
    /// Alternate with the next ALTERNATE-SERVER of the client's transport and family
    /// (RFC 8489 §10, §14.15; ALTERNATE-DOMAIN for TLS, §14.16), else 508 Insufficient
    /// Capacity (RFC 8656 §7.2). Signed like the request, so the client can trust it.
    pub(super) fn no_capacity(&mut self, ctx: &Ctx, out: &mut [u8], v: &Verified) -> Action {
        let cfg = self.cfg.clone();
        let from_registry;
        let pick = if cfg.alternates.is_empty() {
            // Cluster mode: a healthy node from the registry (none on a single node).
            from_registry = self
                .shared
                .cluster()
                .and_then(|c| c.alternate(ctx.from.transport, ctx.from.client.is_ipv6()));
            from_registry.as_ref().map(|(addr, d)| Alternate {
                addr: *addr,
                domain: d.as_deref(),
            })
        } else {
            let n = self.shared.next_alternate();
            cfg.alternates
                .pick(ctx.from.transport, ctx.from.client.is_ipv6(), n)
        };
        match pick {
            Some(a) => self.respond(ctx, out, 300, Some(v), |w| {
                w.addr(attr::ALTERNATE_SERVER, a.addr)?;
                match a.domain {
                    Some(d) => w.attr(attr::ALTERNATE_DOMAIN, d.as_bytes()),
                    None => Ok(()),
                }
            }),
            None => self.respond(ctx, out, 508, Some(v), |_| Ok(())),
        }
    }

    /// 401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4), rate-limited.
    pub(super) fn challenge(&mut self, ctx: &Ctx, out: &mut [u8], code: u16) -> Action {
        let nonce = self
            .shared
            .nonce
            .make(ctx.from.client.ip(), ctx.now.unix_secs);
        let cfg = self.cfg.clone();
        self.respond_unauth(ctx, out, code, |w| {
            w.attr(attr::REALM, cfg.realm.as_bytes())?;
            w.attr(attr::NONCE, &nonce)
        })
    }
}
