//! Writing responses (RFC 8489 §6.3): success and error responses with SOFTWARE,
//! MESSAGE-INTEGRITY(-SHA256) when the request was authenticated, and FINGERPRINT;
//! 401/438 challenges with REALM and NONCE. Also counts every answer.

use super::alternates::Alternate;
use super::auth::Verified;
use super::server::Server;
use super::stats::MethodLabel;
use super::{Action, FiveTuple, Now};
use crate::stun::{attr, class, message_type, ErrorCode, IntegrityKind, MessageWriter, WriteError};

/// The request being answered.
#[derive(Clone, Copy)]
pub(super) struct Ctx {
    pub method: u16,
    pub label: MethodLabel,
    pub txid: [u8; 12],
    pub from: FiveTuple,
    pub now: Now,
}

impl Server {
    /// Writes a response: success for `Ok`, an error response with ERROR-CODE for `Err`.
    /// `body` adds the method-specific attributes; `auth` signs it. SOFTWARE is left out of unauthenticated error responses so they
    /// stay small (no amplification, DESIGN.md principle 5).
    pub(super) fn respond(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        result: Result<(), ErrorCode>,
        auth: Option<&Verified>,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Action {
        let phrase = result.err().map_or("", ErrorCode::reason);
        self.respond_reason(ctx, out, result, phrase, auth, body)
    }

    /// As [`Self::respond`], with a reason phrase that says more than the code's usual one
    /// (RFC 8489 §14.8), e.g. which budget a 486 is about.
    pub(super) fn respond_reason(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        result: Result<(), ErrorCode>,
        phrase: &str,
        auth: Option<&Verified>,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Action {
        self.stats
            .request(ctx.label, result.err().map_or(0, ErrorCode::code));
        let cls = match result {
            Ok(()) => class::SUCCESS,
            Err(_) => class::ERROR,
        };
        let software = &self.cfg.software;
        let res = (|| {
            let mut w = MessageWriter::new(out, message_type(ctx.method, cls), ctx.txid)?;
            if let Err(e) = result {
                w.error_code(e.code(), phrase)?;
            }
            body(&mut w)?;
            if !software.is_empty() && (result.is_ok() || auth.is_some()) {
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

    /// An authenticated error answer with no attributes of its own.
    pub(super) fn fail(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        code: ErrorCode,
        v: &Verified,
    ) -> Action {
        self.respond(ctx, out, Err(code), Some(v), |_| Ok(()))
    }

    /// An answer to a request that is not (yet) authenticated: subject to the per-source
    /// rate limit; dropped (and counted) past it.
    pub(super) fn respond_unauth(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        result: Result<(), ErrorCode>,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Action {
        if !self.limiter.allow(ctx.from.client.ip(), ctx.now.mono) {
            self.stats.rate_limited += 1;
            return Action::None;
        }
        self.respond(ctx, out, result, None, body)
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
            Some(a) => self.respond(ctx, out, Err(ErrorCode::TryAlternate), Some(v), |w| {
                w.addr(attr::ALTERNATE_SERVER, a.addr)?;
                match a.domain {
                    Some(d) => w.attr(attr::ALTERNATE_DOMAIN, d.as_bytes()),
                    None => Ok(()),
                }
            }),
            None => self.respond(
                ctx,
                out,
                Err(ErrorCode::InsufficientCapacity),
                Some(v),
                |_| Ok(()),
            ),
        }
    }

    /// 401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4), rate-limited.
    pub(super) fn challenge(&mut self, ctx: &Ctx, out: &mut [u8], code: ErrorCode) -> Action {
        let nonce = self
            .shared
            .nonce
            .make(ctx.from.client.ip(), ctx.now.unix_secs);
        let cfg = self.cfg.clone();
        self.respond_unauth(ctx, out, Err(code), |w| {
            w.attr(attr::REALM, cfg.realm.as_bytes())?;
            w.attr(attr::NONCE, &nonce)
        })
    }
}
