//! The request handlers (RFC 8489 §6.3, RFC 8656 §7-§12, RFC 6062 §5), one file per
//! method, as free functions over [`Cx`]: the pieces of one shard's state a call may touch,
//! borrowed from `Server` for that call. This file holds the dispatch (classify, unknown
//! attributes, authentication, expiry), the answers every method writes (success, error,
//! 401/438 challenge, 300/508) and the checks several methods share.
//!
//! Handlers return the answer to the message they handled (`Some(Output::Reply ..)`, a
//! `Forward`, a `BindData`, or `None`); everything else they cause (relay sockets closed,
//! messages for other connections) goes into the same output queue through [`Cx::emit`].
//! The only things done synchronously through [`RelayIo`] are opening a relay socket or
//! starting a peer connect (the answer depends on it) and reading a relay's counters.
//!
//! Files: `authenticate.rs` (long-term credentials), `allocate.rs`, `refresh.rs`,
//! `permission.rs` (CreatePermission), `channel_bind.rs`, `send.rs` (Send indication),
//! `connect.rs` (RFC 6062 Connect, ConnectionBind and the peer connection events),
//! `teardown.rs` (an allocation or one of its families ending: Refresh 0, expiry, close).
//! Imports go one way: the method files use this file and `teardown.rs`; this file uses
//! them only to dispatch.

pub(super) mod allocate;
mod authenticate;
mod channel_bind;
pub(super) mod connect;
mod permission;
mod refresh;
mod send;
pub(super) mod teardown;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use stun_types::message::Message;

use super::allocation::{family_index, Relay};
use super::alternates::Alternate;
use super::auth::Verified;
use super::ratelimit::RateLimiter;
use super::server_config::{ServerConfig, Shared};
use super::stats::{AuthFailure, MethodLabel, TurnStats, BIND_REJECTED};
use super::tables::Tables;
use super::timers::{TimerKind, Timers};
use super::{FiveTuple, Now, Output, RelayIo, Transport};
use crate::stun::{
    attr, class, classify, message_type, method, split_message_type, ErrorCode, IntegrityKind,
    Kind, MessageWriter, WriteError, HEADER_LEN,
};

/// Attribute types this server understands (RFC 8489 §6.3: any other comprehension-required
/// attribute in a request gets 420).
const UNDERSTOOD: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::UNKNOWN_ATTRIBUTES,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::XOR_RELAYED_ADDRESS,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::DONT_FRAGMENT,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::USERHASH,
    attr::XOR_MAPPED_ADDRESS,
    attr::RESERVATION_TOKEN,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
    attr::CONNECTION_ID,
];

/// At most this many types are listed in UNKNOWN-ATTRIBUTES (keeps the answer small).
const MAX_UNKNOWN: usize = 8;

/// The pieces of one shard's state a handler may touch, borrowed from `Server` for one
/// call. `tables` is the only writer of the allocations and their indexes; `out` is the
/// core's one way out (`Server::poll_output`).
pub(super) struct Cx<'a> {
    pub(super) cfg: &'a Arc<ServerConfig>,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) tables: &'a mut Tables,
    pub(super) timers: &'a mut Timers,
    pub(super) limiter: &'a mut RateLimiter,
    pub(super) stats: &'a mut TurnStats,
    pub(super) out: &'a mut VecDeque<Output>,
    /// Top 8 bits of this shard's CONNECTION-IDs (RFC 6062).
    pub(super) shard_index: u8,
}

/// The request being answered.
#[derive(Clone, Copy)]
pub(super) struct Ctx {
    pub method: u16,
    pub label: MethodLabel,
    pub txid: [u8; 12],
    pub from: FiveTuple,
    pub now: Now,
}

fn label(m: u16) -> MethodLabel {
    match m {
        method::BINDING => MethodLabel::Binding,
        method::ALLOCATE => MethodLabel::Allocate,
        method::REFRESH => MethodLabel::Refresh,
        method::CREATE_PERMISSION => MethodLabel::CreatePermission,
        method::CHANNEL_BIND => MethodLabel::ChannelBind,
        method::CONNECT => MethodLabel::Connect,
        method::CONNECTION_BIND => MethodLabel::ConnectionBind,
        _ => MethodLabel::Other,
    }
}

/// Comprehension-required attributes we don't understand (RFC 8489 §6.3.1).
fn unknown_attributes(m: &Message<'_>, found: &mut [u16; MAX_UNKNOWN]) -> usize {
    let mut n = 0;
    for (_, a) in m.iter_attributes() {
        let t = a.header.get_type().value();
        if t < 0x8000 && !UNDERSTOOD.contains(&t) && !found[..n].contains(&t) && n < MAX_UNKNOWN {
            found[n] = t;
            n += 1;
        }
    }
    n
}

fn write_unknown(w: &mut MessageWriter, types: &[u16]) -> Result<(), WriteError> {
    let mut v = [0u8; 2 * MAX_UNKNOWN];
    for (i, t) in types.iter().enumerate() {
        v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
    }
    w.attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * types.len()])
}

/// A STUN message from a client: its answer, if any, written into `out`
/// (`out.len() >= 2048`). Not STUN, unparseable (a bad FINGERPRINT included: RFC 8489
/// §7.3), a response or an unknown indication: dropped and counted.
pub(super) fn handle_stun(
    cx: &mut Cx,
    now: Now,
    from: FiveTuple,
    msg: &[u8],
    out: &mut [u8],
    io: &mut impl RelayIo,
) -> Option<Output> {
    if classify(msg) != Kind::Stun {
        cx.stats.malformed += 1;
        return None;
    }
    let m = match Message::from_bytes(msg) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(client = %from.client, error = %e, "malformed STUN message");
            cx.stats.malformed += 1;
            return None;
        }
    };
    let t = u16::from_be_bytes([msg[0], msg[1]]);
    let (meth, cls) = split_message_type(t);
    match cls {
        class::INDICATION if meth == method::SEND => send::indication(cx, &m, &from),
        class::REQUEST => {
            let ctx = Ctx {
                method: meth,
                label: label(meth),
                txid: msg[8..HEADER_LEN].try_into().expect("12 bytes"),
                from,
                now,
            };
            request(cx, &ctx, &m, msg, out, io)
        }
        // Responses and other indications are not for a server.
        _ => None,
    }
}

fn request(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    msg: &[u8],
    out: &mut [u8],
    io: &mut impl RelayIo,
) -> Option<Output> {
    let mut unknown = [0u16; MAX_UNKNOWN];
    let n_unknown = unknown_attributes(m, &mut unknown);
    match ctx.method {
        method::BINDING => {
            if n_unknown > 0 {
                cx.stats.unknown_attributes += 1;
                return cx.respond_unauth(ctx, out, Err(ErrorCode::UnknownAttribute), |w| {
                    write_unknown(w, &unknown[..n_unknown])
                });
            }
            cx.stats.bindings += 1;
            let client = ctx.from.client;
            cx.respond_unauth(ctx, out, Ok(()), |w| {
                w.xor_addr(attr::XOR_MAPPED_ADDRESS, client)
            })
        }
        method::ALLOCATE
        | method::REFRESH
        | method::CREATE_PERMISSION
        | method::CHANNEL_BIND
        | method::CONNECT
        | method::CONNECTION_BIND => {
            // RFC 6062 §5.4: a data connection is TCP or TLS, never UDP.
            if ctx.method == method::CONNECTION_BIND && ctx.from.transport == Transport::Udp {
                cx.stats.tcp_binds[BIND_REJECTED] += 1;
                return cx.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(()));
            }
            let authenticate::Authenticated { cred: v, username } =
                match authenticate::check(cx, ctx, m, msg, out) {
                    Ok(a) => a,
                    Err(a) => return a,
                };
            if n_unknown > 0 {
                cx.stats.unknown_attributes += 1;
                return cx.respond(ctx, out, Err(ErrorCode::UnknownAttribute), Some(&v), |w| {
                    write_unknown(w, &unknown[..n_unknown])
                });
            }
            let expired = v.expired(ctx.now.unix_secs);
            if expired && (ctx.method == method::ALLOCATE || cx.cfg.strict_expiry) {
                cx.stats.auth_failure(AuthFailure::Expired);
                return cx.challenge(ctx, out, ErrorCode::Unauthorized);
            }
            match ctx.method {
                method::ALLOCATE => allocate::handle(cx, ctx, m, out, &v, username, io),
                method::REFRESH => refresh::handle(cx, ctx, m, out, &v, &username, io),
                method::CREATE_PERMISSION => permission::handle(cx, ctx, m, out, &v, &username),
                method::CONNECT => connect::connect(cx, ctx, m, out, &v, &username, io),
                method::CONNECTION_BIND => connect::bind(cx, ctx, m, out, &v, &username),
                _ => channel_bind::handle(cx, ctx, m, out, &v, &username),
            }
        }
        _ => cx.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())),
    }
}

impl Cx<'_> {
    /// Queues something for the driver (`Server::poll_output`).
    pub(super) fn emit(&mut self, o: Output) {
        self.out.push_back(o);
    }

    pub(super) fn push_timer(&mut self, at: std::time::Instant, kind: TimerKind) {
        self.timers.push(at, kind);
    }

    /// Writes a response (RFC 8489 §6.3): success for `Ok`, an error response with
    /// ERROR-CODE for `Err`. `body` adds the method-specific attributes; `auth` signs it
    /// (MESSAGE-INTEGRITY(-SHA256)); FINGERPRINT always. SOFTWARE is left out of
    /// unauthenticated error responses so they stay small (no amplification, DESIGN.md
    /// principle 5). Every answer is counted.
    pub(super) fn respond(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        result: Result<(), ErrorCode>,
        auth: Option<&Verified>,
        body: impl FnOnce(&mut MessageWriter) -> Result<(), WriteError>,
    ) -> Option<Output> {
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
    ) -> Option<Output> {
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
        res.ok().map(|len| Output::Reply { len })
    }

    /// An authenticated error answer with no attributes of its own.
    pub(super) fn fail(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        code: ErrorCode,
        v: &Verified,
    ) -> Option<Output> {
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
    ) -> Option<Output> {
        if !self.limiter.allow(ctx.from.client.ip(), ctx.now.mono) {
            self.stats.rate_limited += 1;
            return None;
        }
        self.respond(ctx, out, result, None, body)
    }

    /// No room for a new allocation (full, out of relay ports, or draining): 300 Try
    /// Alternate with the next ALTERNATE-SERVER of the client's transport and family
    /// (RFC 8489 §10, §14.15; ALTERNATE-DOMAIN for TLS, §14.16), else 508 Insufficient
    /// Capacity (RFC 8656 §7.2). Signed like the request, so the client can trust it.
    pub(super) fn no_capacity(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        v: &Verified,
    ) -> Option<Output> {
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
            None => self.fail(ctx, out, ErrorCode::InsufficientCapacity, v),
        }
    }

    /// 401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4), rate-limited.
    pub(super) fn challenge(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        code: ErrorCode,
    ) -> Option<Output> {
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

    /// Lifetime granted for a requested one (RFC 8656 §7.2 item 9, §7.3): at most the
    /// maximum, at least the default; clamped to the credential's expiry under
    /// `strict_expiry`. `None` if nothing is left of the credential.
    pub(super) fn grant_lifetime(
        &self,
        requested: Option<u32>,
        v: &Verified,
        now: Now,
    ) -> Option<u32> {
        let cfg = &self.cfg;
        let mut l = match requested {
            None => cfg.default_lifetime_secs,
            Some(r) => r.min(cfg.max_lifetime_secs).max(cfg.default_lifetime_secs),
        };
        if cfg.strict_expiry {
            if let Some(e) = v.expiry_unix {
                let left = e.saturating_sub(now.unix_secs);
                if left == 0 {
                    return None;
                }
                l = l.min(left.min(u32::MAX as u64) as u32);
            }
        }
        Some(l)
    }

    /// The client's allocation, checked against the request's username (441); 437 if it
    /// has none.
    pub(super) fn own_allocation(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        v: &Verified,
        username: &str,
    ) -> Result<usize, Option<Output>> {
        let Some(slot) = self.tables.slot_of(&ctx.from) else {
            return Err(self.fail(ctx, out, ErrorCode::AllocationMismatch, v));
        };
        let same_user = self
            .tables
            .get(slot)
            .is_some_and(|a| a.username == username);
        if !same_user {
            return Err(self.fail(ctx, out, ErrorCode::WrongCredentials, v));
        }
        Ok(slot)
    }

    /// Checks a peer for a permission, channel or connect: the allocation has a relay of
    /// its family (else 443) and the policy allows it (else 403).
    pub(super) fn check_peer(&mut self, slot: usize, peer: IpAddr) -> Result<Relay, ErrorCode> {
        let relay = self
            .tables
            .get(slot)
            .and_then(|a| a.relay_for(peer))
            .ok_or(ErrorCode::PeerAddressFamilyMismatch)?;
        if !self.cfg.policy.allows(peer) {
            self.stats.peer_denied += 1;
            return Err(ErrorCode::Forbidden);
        }
        Ok(relay)
    }

    /// Installs or refreshes a permission (RFC 8656 §9), with its timer.
    pub(super) fn install_permission(&mut self, slot: usize, relay: Relay, ip: IpAddr, now: Now) {
        let exp = now.mono + Duration::from_secs(self.cfg.permission_lifetime_secs as u64);
        let Some(transport) = self.tables.get(slot).map(|a| a.tuple.transport) else {
            return;
        };
        if let Some(id) = self.tables.add_permission(slot, relay, ip, exp) {
            self.stats.permission_added(transport, family_index(ip));
            self.push_timer(exp, TimerKind::Permission { slot, id, ip });
        }
    }
}
