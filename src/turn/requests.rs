//! Handling of STUN/TURN messages from clients (RFC 8489 §6.3, RFC 8656 §7-§12):
//! Binding, authentication, Allocate, Refresh, CreatePermission, ChannelBind, Send.
//! Connect and ConnectionBind (RFC 6062) are in `tcp_relay.rs`.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use stun_types::attribute::AttributeType;
use stun_types::message::Message;
use turn_types::attribute::XorPeerAddress;

use super::allocation::{allocation_family, family_index, Allocation, Relay, UsageMark};
use super::auth::{AuthError, Verified};
use super::nonce::NonceCheck;
use super::reply::Ctx;
use super::request::{
    connection_id, lifetime, permission_peers, raw, refresh_family, Allocate, ChannelBind,
    EvenPort, Family,
};
use super::server::{DeleteReason, Server, TimerKind};
use super::server_config::QuotaError;
use super::stats::{AuthFailure, MethodLabel, BIND_REJECTED};
use super::tables::Refreshed;
use super::usage_tap;
use super::{Action, FiveTuple, Now, RelayIo};
use crate::stun::{attr, classify, find_integrity, method, ErrorCode, Kind, HEADER_LEN};
use crate::usage::Event;

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
/// Bounded attempts at opening a relay port before 508.
const PORT_ATTEMPTS: usize = 16;
/// Per-allocation bounds (memory is bounded even for a hostile authenticated client).
const MAX_PERMISSIONS: usize = 1024;
const MAX_CHANNELS: usize = 4096;

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

/// A request's verified credential and the user it names (RFC 8489 §9.2).
struct Authenticated {
    cred: Verified,
    username: String,
}

/// Which kind of relay socket an allocation gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RelayKind {
    Udp,
    /// An RFC 6062 TCP relay listener.
    Tcp,
}

impl Server {
    /// A STUN message from a client. A response, if any, is written into `out`
    /// (`out.len() >= 2048`) and `Action::Reply(len)` returned.
    pub fn handle_stun(
        &mut self,
        now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8],
        io: &mut impl RelayIo,
    ) -> Action {
        if classify(msg) != Kind::Stun {
            self.stats.malformed += 1;
            return Action::None;
        }
        let m = match Message::from_bytes(msg) {
            Ok(m) => m,
            Err(e) => {
                // Includes a bad FINGERPRINT: silently discarded (RFC 8489 §7.3).
                tracing::debug!(client = %from.client, error = %e, "malformed STUN message");
                self.stats.malformed += 1;
                return Action::None;
            }
        };
        let t = u16::from_be_bytes([msg[0], msg[1]]);
        let cls = t & 0x0110;
        let meth = ((t & 0x3E00) >> 2) | ((t & 0x00E0) >> 1) | (t & 0x000F);
        match cls {
            crate::stun::class::INDICATION if meth == method::SEND => {
                self.send_indication(&m, &from)
            }
            crate::stun::class::REQUEST => {
                let ctx = Ctx {
                    method: meth,
                    label: label(meth),
                    txid: msg[8..HEADER_LEN].try_into().expect("12 bytes"),
                    from,
                    now,
                };
                self.request(&ctx, &m, msg, out, io)
            }
            // Responses and other indications are not for a server.
            _ => Action::None,
        }
    }

    fn request(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        msg: &[u8],
        out: &mut [u8],
        io: &mut impl RelayIo,
    ) -> Action {
        let mut unknown = [0u16; MAX_UNKNOWN];
        let n_unknown = unknown_attributes(m, &mut unknown);
        match ctx.method {
            method::BINDING => {
                if n_unknown > 0 {
                    self.stats.unknown_attributes += 1;
                    return self.respond_unauth(ctx, out, Err(ErrorCode::UnknownAttribute), |w| {
                        write_unknown(w, &unknown[..n_unknown])
                    });
                }
                self.stats.bindings += 1;
                let client = ctx.from.client;
                self.respond_unauth(ctx, out, Ok(()), |w| {
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
                if ctx.method == method::CONNECTION_BIND
                    && ctx.from.transport == super::Transport::Udp
                {
                    self.stats.tcp_binds[BIND_REJECTED] += 1;
                    return self.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(()));
                }
                let Authenticated { cred: v, username } = match self.authenticate(ctx, m, msg, out)
                {
                    Ok(a) => a,
                    Err(a) => return a,
                };
                if n_unknown > 0 {
                    self.stats.unknown_attributes += 1;
                    return self.respond(
                        ctx,
                        out,
                        Err(ErrorCode::UnknownAttribute),
                        Some(&v),
                        |w| write_unknown(w, &unknown[..n_unknown]),
                    );
                }
                let expired = v.expired(ctx.now.unix_secs);
                if expired && (ctx.method == method::ALLOCATE || self.cfg.strict_expiry) {
                    self.stats.auth_failure(AuthFailure::Expired);
                    return self.challenge(ctx, out, ErrorCode::Unauthorized);
                }
                match ctx.method {
                    method::ALLOCATE => self.allocate(ctx, m, out, &v, username, io),
                    method::REFRESH => self.refresh(ctx, m, out, &v, &username, io),
                    method::CREATE_PERMISSION => self.create_permission(ctx, m, out, &v, &username),
                    method::CONNECT => self.connect(ctx, m, out, &v, &username, io),
                    method::CONNECTION_BIND => self.connection_bind(ctx, m, out, &v, &username),
                    _ => self.channel_bind(ctx, m, out, &v, &username),
                }
            }
            _ => self.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())),
        }
    }

    /// Long-term credential check (RFC 8489 §9.2.4). `Err` carries the answer already
    /// written (401, 438 or 400) or `Action::None` when rate-limited.
    fn authenticate(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        msg: &[u8],
        out: &mut [u8],
    ) -> Result<Authenticated, Action> {
        if find_integrity(msg).is_none() {
            return Err(self.challenge(ctx, out, ErrorCode::Unauthorized));
        }
        let cfg = self.cfg.clone();
        let username = match (raw(m, attr::USERNAME), raw(m, attr::USERHASH)) {
            (Some(u), _) => match std::str::from_utf8(u) {
                Ok(u) if u.len() <= 513 => u.to_string(),
                _ => {
                    return Err(
                        self.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(()))
                    )
                }
            },
            (None, Some(h)) => match cfg.credentials.user_for_hash(h) {
                Some(u) => u.to_string(),
                None => {
                    self.stats.auth_failure(AuthFailure::UnknownUser);
                    return Err(self.challenge(ctx, out, ErrorCode::Unauthorized));
                }
            },
            (None, None) => {
                return Err(self.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())))
            }
        };
        let (Some(_realm), Some(nonce)) = (raw(m, attr::REALM), raw(m, attr::NONCE)) else {
            return Err(self.respond_unauth(ctx, out, Err(ErrorCode::BadRequest), |_| Ok(())));
        };
        match self.shared.nonce.check(
            nonce,
            ctx.from.client.ip(),
            ctx.now.unix_secs,
            cfg.nonce_lifetime_secs,
        ) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.stats.auth_failure(AuthFailure::StaleNonce);
                return Err(self.challenge(ctx, out, ErrorCode::StaleNonce));
            }
        }
        match cfg.credentials.verify(&username, msg) {
            Ok(cred) => Ok(Authenticated { cred, username }),
            Err(e) => {
                if let Some(v) = self.kept_credential(ctx, m, &username, msg) {
                    return Ok(Authenticated { cred: v, username });
                }
                self.stats.auth_failure(match e {
                    AuthError::UnknownUser => AuthFailure::UnknownUser,
                    AuthError::BadIntegrity => AuthFailure::BadIntegrity,
                });
                tracing::debug!(client = %ctx.from.client, reason = %e, "authentication failed");
                Err(self.challenge(ctx, out, ErrorCode::Unauthorized))
            }
        }
    }

    /// A request on an existing allocation (Refresh, CreatePermission, ChannelBind,
    /// Connect; a ConnectionBind, whose allocation its CONNECTION-ID names) whose
    /// credential a reload removed (a rotated secret, a deleted static user): verified
    /// with the allocation's own key, so rotation stops new allocations without cutting
    /// running ones. Not under `strict_expiry`, where such requests get 401 and the
    /// allocation ends with its current lifetime.
    fn kept_credential(
        &self,
        ctx: &Ctx,
        m: &Message<'_>,
        username: &str,
        msg: &[u8],
    ) -> Option<Verified> {
        if ctx.method == method::ALLOCATE || self.cfg.strict_expiry {
            return None;
        }
        let slot = if ctx.method == method::CONNECTION_BIND {
            let id = connection_id(m)?;
            self.tables.conn(id)?.slot
        } else {
            self.tables.slot_of(&ctx.from)?
        };
        let a = self.tables.get(slot)?;
        if a.username != username {
            return None;
        }
        a.cred.reverify(msg)
    }

    /// Lifetime granted for a requested one (RFC 8656 §7.2 item 9, §7.3): at most the
    /// maximum, at least the default; clamped to the credential's expiry under
    /// `strict_expiry`. `None` if nothing is left of the credential.
    fn grant_lifetime(&self, requested: Option<u32>, v: &Verified, now: Now) -> Option<u32> {
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

    /// The client's allocation, checked against the request's username (441).
    pub(super) fn own_allocation(
        &mut self,
        ctx: &Ctx,
        out: &mut [u8],
        v: &Verified,
        username: &str,
    ) -> Result<usize, Action> {
        let Some(slot) = self.tables.slot_of(&ctx.from) else {
            return Err(self.fail(ctx, out, ErrorCode::AllocationMismatch, v));
        };
        let same_user = self
            .tables
            .get(slot)
            .is_some_and(|a| a.username == username);
        if !same_user {
            return Err(
                self.respond(ctx, out, Err(ErrorCode::WrongCredentials), Some(v), |_| {
                    Ok(())
                }),
            );
        }
        Ok(slot)
    }

    /// Allocate (RFC 8656 §7.2).
    fn allocate(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: String,
        io: &mut impl RelayIo,
    ) -> Action {
        if let Some(slot) = self.tables.slot_of(&ctx.from) {
            let retransmit = self
                .tables
                .get(slot)
                .is_some_and(|a| a.txid == ctx.txid && a.username == username);
            if retransmit {
                return self.allocate_success(ctx, out, v, slot);
            }
            return self.fail(ctx, out, ErrorCode::AllocationMismatch, v);
        }
        // Draining (SIGTERM): existing allocations carry on, new ones go elsewhere.
        if self.shared.draining() {
            return self.no_capacity(ctx, out, v);
        }
        let req = match Allocate::decode(m, ctx.from.transport, self.cfg.tcp_relay) {
            Ok(r) => r,
            Err(code) => return self.fail(ctx, out, code, v),
        };
        let Allocate {
            tcp,
            family,
            additional_v6,
            even_port: even,
            token,
            lifetime: requested,
        } = req;
        let Some(lifetime) = self.grant_lifetime(requested, v, ctx.now) else {
            self.stats.auth_failure(AuthFailure::Expired);
            return self.challenge(ctx, out, ErrorCode::Unauthorized);
        };
        // Families: the reserved port's, else the requested one, else IPv4 (§7.2).
        let want_v6 = family.is_some_and(Family::is_v6);
        if token.is_none() && self.cfg.relay_for(want_v6).is_none() {
            return self.fail(ctx, out, ErrorCode::AddressFamilyNotSupported, v);
        }
        if let Some(b) = usage_tap::over_budget(&self.shared, &self.cfg, &v.quota_user) {
            let err = Err(ErrorCode::AllocationQuotaReached);
            return self.respond_reason(ctx, out, err, b.reason_phrase(), Some(v), |_| Ok(()));
        }
        match self
            .shared
            .acquire_quota(&v.quota_user, self.cfg.user_quota, self.cfg.total_quota)
        {
            Ok(()) => {}
            Err(QuotaError::User) => {
                return self.fail(ctx, out, ErrorCode::AllocationQuotaReached, v)
            }
            Err(QuotaError::Total) => return self.no_capacity(ctx, out, v),
        }
        let mut relays: [Option<Relay>; 2] = [None, None];
        let mut reserved_next = None;
        let opened = if let Some(t) = token {
            self.open_reserved(t, ctx.now, io).map(|r| {
                relays[family_index(r.local.ip())] = Some(r);
            })
        } else {
            let kind = if tcp { RelayKind::Tcp } else { RelayKind::Udp };
            self.open_relay(family.unwrap_or(Family::V4), even, kind, io)
                .map(|(r, next)| {
                    relays[family_index(r.local.ip())] = Some(r);
                    reserved_next = next;
                })
        };
        let mut v6_refused = false;
        let opened = opened.and_then(|()| {
            if !additional_v6 {
                return Ok(());
            }
            if self.cfg.relay_for(true).is_none() {
                v6_refused = true;
                return Ok(());
            }
            self.open_relay(Family::V6, None, RelayKind::Udp, io)
                .map(|(r, _)| relays[1] = Some(r))
        });
        if let Err(code) = opened {
            for r in relays.iter().flatten() {
                io.close_relay(r.id);
                self.shared.ports.release(r.local);
            }
            self.shared.release_quota(&v.quota_user);
            if code == ErrorCode::InsufficientCapacity {
                return self.no_capacity(ctx, out, v);
            }
            return self.fail(ctx, out, code, v);
        }
        let reservation_token = reserved_next.map(|addr| {
            let exp = ctx.now.mono + Duration::from_secs(self.cfg.reservation_lifetime_secs as u64);
            self.push_timer(exp, TimerKind::Reservations);
            self.stats.reservations_created += 1;
            self.shared.ports.reserve(addr, exp)
        });

        let id = self.tables.next_alloc_id();
        let expires = ctx.now.mono + Duration::from_secs(lifetime as u64);
        let alloc = Allocation {
            id,
            tuple: ctx.from,
            username,
            quota_user: v.quota_user.clone(),
            cred: v.clone(),
            relays,
            expires,
            timer_at: expires,
            perms: Vec::new(),
            channels: Vec::new(),
            txid: ctx.txid,
            lifetime_secs: lifetime,
            reservation_token,
            v6_refused,
            created: ctx.now.mono,
            tcp,
            conns: Vec::new(),
            usage: Cell::new(UsageMark::new(ctx.now.mono)),
        };
        tracing::info!(
            user = %alloc.username,
            client = %ctx.from.client,
            transport = ?ctx.from.transport,
            tcp_relay = tcp,
            relayed = ?alloc.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
            lifetime,
            "allocation created"
        );
        let slot = self.tables.insert(alloc);
        self.push_timer(expires, TimerKind::Allocation { slot, id });
        if let Some(a) = self.tables.get(slot) {
            usage_tap::report(&self.shared, a, Event::Start, ctx.now.mono, io);
            usage_tap::attach_user_cap(&self.shared, &self.cfg, a, io);
        }
        if let Some(at) = usage_tap::next_report(&self.shared, &self.cfg, ctx.now.mono) {
            self.push_timer(at, TimerKind::Usage { slot, id });
        }
        self.stats.allocations_created += 1;
        if tcp {
            self.stats.tcp_allocations += 1;
        }
        self.stats
            .allocation_added(ctx.from.transport, allocation_family(&relays));
        self.allocate_success(ctx, out, v, slot)
    }

    fn allocate_success(&mut self, ctx: &Ctx, out: &mut [u8], v: &Verified, slot: usize) -> Action {
        let Some(a) = self.tables.get(slot) else {
            return Action::None;
        };
        let relays = a.relays;
        let left = a.expires.saturating_duration_since(ctx.now.mono).as_secs() as u32;
        let token = a.reservation_token;
        let v6_refused = a.v6_refused;
        let client = ctx.from.client;
        self.respond(ctx, out, Ok(()), Some(v), |w| {
            for r in relays.iter().flatten() {
                w.xor_addr(attr::XOR_RELAYED_ADDRESS, r.advertised)?;
            }
            if v6_refused {
                // ADDRESS-ERROR-CODE (RFC 8656 §18.10): family, reserved, class, number.
                let reason = ErrorCode::AddressFamilyNotSupported.reason().as_bytes();
                let mut val = [0u8; 64];
                val[0] = 0x02;
                val[2] = 4;
                val[3] = 40;
                val[4..4 + reason.len()].copy_from_slice(reason);
                w.attr(attr::ADDRESS_ERROR_CODE, &val[..4 + reason.len()])?;
            }
            w.attr_u32(attr::LIFETIME, left)?;
            if let Some(t) = token {
                w.attr(attr::RESERVATION_TOKEN, &t.to_be_bytes())?;
            }
            w.xor_addr(attr::XOR_MAPPED_ADDRESS, client)
        })
    }

    /// Opens a relay socket on a port of the pool (EVEN-PORT: an even port; with its R bit
    /// the next one is held too and returned); an RFC 6062 TCP relay listener for
    /// `RelayKind::Tcp` (§5.1).
    fn open_relay(
        &mut self,
        family: Family,
        even_port: Option<EvenPort>,
        kind: RelayKind,
        io: &mut impl RelayIo,
    ) -> Result<(Relay, Option<SocketAddr>), ErrorCode> {
        let even = even_port.is_some();
        let pair = even_port.is_some_and(|e| e.reserve_next);
        let tcp = kind == RelayKind::Tcp;
        let ra = self
            .cfg
            .relay_for(family.is_v6())
            .ok_or(ErrorCode::AddressFamilyNotSupported)?;
        let mut busy: Vec<SocketAddr> = Vec::new();
        let mut result = Err(ErrorCode::InsufficientCapacity);
        for _ in 0..PORT_ATTEMPTS {
            let Some(port) = self.shared.ports.acquire(ra.local, even, pair) else {
                break;
            };
            let local = SocketAddr::new(ra.local, port);
            let next = pair.then(|| SocketAddr::new(ra.local, port + 1));
            let opened = if tcp {
                io.open_tcp_relay(local)
            } else {
                io.open_relay(local)
            };
            match opened {
                Ok(id) => {
                    let advertised = SocketAddr::new(ra.advertised, port);
                    result = Ok((
                        Relay {
                            id,
                            local,
                            advertised,
                        },
                        next,
                    ));
                    break;
                }
                Err(e) => {
                    busy.push(local);
                    busy.extend(next);
                    // A driver without TCP relays (RFC 6062): the transport is unsupported.
                    if tcp && e.kind() == std::io::ErrorKind::Unsupported {
                        result = Err(ErrorCode::UnsupportedTransport);
                        break;
                    }
                    if e.kind() != std::io::ErrorKind::AddrInUse {
                        tracing::warn!(addr = %local, error = %e, "cannot open relay socket");
                        break;
                    }
                }
            }
        }
        // Ports another process holds go back only now, so the retries above tried others.
        for a in busy {
            self.shared.ports.release(a);
        }
        result
    }

    /// Opens the relay socket of a claimed RESERVATION-TOKEN (RFC 8656 §7.2): 508 if the
    /// token is unknown or expired.
    fn open_reserved(
        &mut self,
        token: u64,
        now: Now,
        io: &mut impl RelayIo,
    ) -> Result<Relay, ErrorCode> {
        let local = self
            .shared
            .ports
            .claim(token, now.mono)
            .ok_or(ErrorCode::InsufficientCapacity)?;
        let Some(ra) = self
            .cfg
            .relay
            .iter()
            .find(|r| r.local == local.ip())
            .copied()
        else {
            self.shared.ports.release(local);
            return Err(ErrorCode::InsufficientCapacity);
        };
        match io.open_relay(local) {
            Ok(id) => Ok(Relay {
                id,
                local,
                advertised: SocketAddr::new(ra.advertised, local.port()),
            }),
            Err(_) => {
                self.shared.ports.release(local);
                Err(ErrorCode::InsufficientCapacity)
            }
        }
    }

    /// Refresh (RFC 8656 §7.3).
    fn refresh(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: &str,
        io: &mut impl RelayIo,
    ) -> Action {
        let slot = match self.own_allocation(ctx, out, v, username) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let raf = match refresh_family(m) {
            Ok(f) => f.map(Family::is_v6),
            Err(code) => return self.fail(ctx, out, code, v),
        };
        if let Some(v6) = raf {
            let has = self
                .tables
                .get(slot)
                .is_some_and(|a| a.relays[usize::from(v6)].is_some());
            if !has {
                return self.fail(ctx, out, ErrorCode::PeerAddressFamilyMismatch, v);
            }
        }
        let requested = match lifetime(m) {
            Ok(l) => l,
            Err(code) => return self.fail(ctx, out, code, v),
        };
        if requested == Some(0) {
            let dual = self
                .tables
                .get(slot)
                .is_some_and(|a| a.relays.iter().all(Option::is_some));
            // RFC 8656 §7.3: with REQUESTED-ADDRESS-FAMILY only that family's relay goes;
            // the allocation stays while the other family remains.
            match raf {
                Some(v6) if dual => self.delete_family(slot, v6, io),
                _ => self.delete(slot, DeleteReason::Refreshed0, ctx.now.mono, io),
            }
            return self.respond(ctx, out, Ok(()), Some(v), |w| w.attr_u32(attr::LIFETIME, 0));
        }
        let Some(lifetime) = self.grant_lifetime(requested, v, ctx.now) else {
            self.stats.auth_failure(AuthFailure::Expired);
            return self.challenge(ctx, out, ErrorCode::Unauthorized);
        };
        // Over a byte budget: no more lifetime; the allocation ends when its current one
        // runs out (issue 14).
        if let Some(b) = usage_tap::over_budget(&self.shared, &self.cfg, &v.quota_user) {
            let err = Err(ErrorCode::AllocationQuotaReached);
            return self.respond_reason(ctx, out, err, b.reason_phrase(), Some(v), |_| Ok(()));
        }
        let expires = ctx.now.mono + Duration::from_secs(lifetime as u64);
        match self.tables.refresh(slot, expires, lifetime) {
            Refreshed::Gone => return Action::None,
            Refreshed::Done => {}
            Refreshed::RearmEarlier { id } => {
                self.push_timer(expires, TimerKind::Allocation { slot, id })
            }
        }
        self.respond(ctx, out, Ok(()), Some(v), |w| {
            w.attr_u32(attr::LIFETIME, lifetime)
        })
    }

    /// Checks a peer for a permission or channel: the allocation has a relay of its family
    /// (else 443) and the policy allows it (else 403).
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

    /// Installs or refreshes a permission (RFC 8656 §9).
    fn install_permission(&mut self, slot: usize, relay: Relay, ip: IpAddr, now: Now) {
        let exp = now.mono + Duration::from_secs(self.cfg.permission_lifetime_secs as u64);
        let Some(transport) = self.tables.get(slot).map(|a| a.tuple.transport) else {
            return;
        };
        if let Some(id) = self.tables.add_permission(slot, relay, ip, exp) {
            self.stats.permission_added(transport, family_index(ip));
            self.push_timer(exp, TimerKind::Permission { slot, id, ip });
        }
    }

    /// CreatePermission (RFC 8656 §9.2): all XOR-PEER-ADDRESSes or none.
    fn create_permission(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: &str,
    ) -> Action {
        let slot = match self.own_allocation(ctx, out, v, username) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let peers = match permission_peers(m) {
            Ok(p) => p,
            Err(code) => return self.fail(ctx, out, code, v),
        };
        let mut relays = Vec::with_capacity(peers.len());
        for p in &peers {
            match self.check_peer(slot, p.ip()) {
                Ok(r) => relays.push(r),
                Err(code) => return self.fail(ctx, out, code, v),
            }
        }
        let existing = self.tables.get(slot).map_or(0, |a| a.perms.len());
        if existing + peers.len() > MAX_PERMISSIONS {
            return self.fail(ctx, out, ErrorCode::InsufficientCapacity, v);
        }
        for (p, r) in peers.iter().zip(relays) {
            self.install_permission(slot, r, p.ip(), ctx.now);
        }
        self.respond(ctx, out, Ok(()), Some(v), |_| Ok(()))
    }

    /// ChannelBind (RFC 8656 §11.2).
    fn channel_bind(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: &str,
    ) -> Action {
        let slot = match self.own_allocation(ctx, out, v, username) {
            Ok(s) => s,
            Err(a) => return a,
        };
        // RFC 6062 §5: a TCP allocation has no channels (data goes over connections).
        if self.tables.get(slot).is_some_and(|a| a.tcp) {
            return self.fail(ctx, out, ErrorCode::BadRequest, v);
        }
        let ChannelBind { number, peer } = match ChannelBind::decode(m) {
            Ok(r) => r,
            Err(code) => return self.fail(ctx, out, code, v),
        };
        let relay = match self.check_peer(slot, peer.ip()) {
            Ok(r) => r,
            Err(code) => return self.fail(ctx, out, code, v),
        };
        let Some(a) = self.tables.get(slot) else {
            return Action::None;
        };
        // Rebind rules (§11.2): the number may not move to another peer, nor the peer
        // to another number, also during an expired binding's cooldown; refreshing the
        // same binding is fine (and revives it from the cooldown).
        let conflict = a
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            return self.fail(ctx, out, ErrorCode::BadRequest, v);
        }
        let exists = a.channels.iter().any(|c| c.number == number);
        if !exists && a.channels.len() >= MAX_CHANNELS {
            return self.fail(ctx, out, ErrorCode::InsufficientCapacity, v);
        }
        let id = a.id;
        let transport = a.tuple.transport;
        let expires = ctx.now.mono + Duration::from_secs(self.cfg.channel_lifetime_secs as u64);
        let Some(bound) = self.tables.bind_channel(slot, relay, number, peer, expires) else {
            return Action::None;
        };
        if bound.created {
            self.stats.channels_created += 1;
            self.push_timer(expires, TimerKind::Channel { slot, id, number });
        }
        if bound.activated {
            self.stats
                .channel_activated(transport, family_index(peer.ip()));
        }
        self.install_permission(slot, relay, peer.ip(), ctx.now);
        self.respond(ctx, out, Ok(()), Some(v), |_| Ok(()))
    }

    /// Send indication (RFC 8656 §10.2): forwarded if a permission exists, else silently
    /// dropped (counted).
    fn send_indication(&mut self, m: &Message<'_>, from: &FiveTuple) -> Action {
        let Some(slot) = self.tables.slot_of(from) else {
            self.stats.sends_dropped += 1;
            return Action::None;
        };
        // RFC 6062 §5: a TCP allocation relays over peer connections only.
        if self.tables.get(slot).is_some_and(|a| a.tcp) {
            self.stats.sends_dropped += 1;
            return Action::None;
        }
        let tid = m.transaction_id();
        let peer = match m.attribute::<XorPeerAddress>() {
            Ok(p) => p.addr(tid),
            Err(_) => {
                self.stats.malformed += 1;
                return Action::None;
            }
        };
        let Some((off, data)) = m.raw_attribute_and_offset(AttributeType::new(attr::DATA)) else {
            self.stats.malformed += 1;
            return Action::None;
        };
        let len = data.header.length() as usize;
        let relay = self.tables.get(slot).and_then(|a| a.relay_for(peer.ip()));
        match relay {
            Some(r) if self.tables.permission(r.id, peer.ip()).is_some() => {
                self.stats.sends_forwarded += 1;
                Action::Forward {
                    relay: r.id,
                    peer,
                    payload: off + 4..off + 4 + len,
                }
            }
            _ => {
                self.stats.sends_dropped += 1;
                Action::None
            }
        }
    }
}

fn write_unknown(
    w: &mut crate::stun::MessageWriter,
    types: &[u16],
) -> Result<(), crate::stun::WriteError> {
    let mut v = [0u8; 2 * MAX_UNKNOWN];
    for (i, t) in types.iter().enumerate() {
        v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
    }
    w.attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * types.len()])
}
