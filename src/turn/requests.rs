//! Handling of STUN/TURN messages from clients (RFC 8489 §6.3, RFC 8656 §7-§12):
//! Binding, authentication, Allocate, Refresh, CreatePermission, ChannelBind, Send.
//! Connect and ConnectionBind (RFC 6062) are in `tcp_relay.rs`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use stun_types::attribute::AttributeType;
use stun_types::message::Message;
use turn_types::attribute::XorPeerAddress;

use super::allocation::{allocation_family, family_index, Allocation, Channel, Relay};
use super::auth::{AuthError, Verified};
use super::nonce::NonceCheck;
use super::reply::Ctx;
use super::server::{DeleteReason, Server, TimerKind};
use super::server_config::QuotaError;
use super::stats::{AuthFailure, MethodLabel};
use super::usage_tap;
use super::{Action, FiveTuple, Now, RelayIo, RelayUsage};
use crate::stun::{
    attr, classify, find_integrity, method, Kind, CHANNEL_MAX, CHANNEL_MIN, HEADER_LEN,
};
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
/// REQUESTED-TRANSPORT value for UDP (RFC 8656 §18.7).
const PROTO_UDP: u8 = 17;
/// REQUESTED-TRANSPORT for an RFC 6062 TCP allocation.
const PROTO_TCP: u8 = 6;

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

pub(super) fn raw<'m>(m: &'m Message<'_>, t: u16) -> Option<&'m [u8]> {
    m.raw_attribute_and_offset(AttributeType::new(t))
        .map(|(off, a)| {
            let b = m.as_bytes();
            &b[off + 4..off + 4 + a.header.length() as usize]
        })
}

pub(super) fn u32_attr(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// Parses an ADDRESS-FAMILY-like attribute value: `Some(true)` IPv6, `Some(false)` IPv4.
fn family(v: &[u8]) -> Option<Option<bool>> {
    // RFC 8656 §18.8 says 4 bytes (family + 3 reserved); some clients send just the family.
    if v.is_empty() || v.len() > 4 {
        return None;
    }
    Some(match v[0] {
        0x01 => Some(false),
        0x02 => Some(true),
        _ => None,
    })
}

/// Every XOR-PEER-ADDRESS in the request, or `Err` if one is malformed.
pub(super) fn peer_addresses(m: &Message<'_>) -> Result<Vec<SocketAddr>, ()> {
    let tid = m.transaction_id();
    let mut v = Vec::new();
    for (_, a) in m.iter_attributes() {
        if a.header.get_type().value() == attr::XOR_PEER_ADDRESS {
            let p = XorPeerAddress::try_from(&a).map_err(|_| ())?;
            v.push(p.addr(tid));
        }
    }
    Ok(v)
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
                    return self.respond_unauth(ctx, out, 420, |w| {
                        write_unknown(w, &unknown[..n_unknown])
                    });
                }
                self.stats.bindings += 1;
                let client = ctx.from.client;
                self.respond_unauth(ctx, out, 0, |w| {
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
                    self.stats.tcp_binds[1] += 1;
                    return self.respond_unauth(ctx, out, 400, |_| Ok(()));
                }
                let v = match self.authenticate(ctx, m, msg, out) {
                    Ok(v) => v,
                    Err(a) => return a,
                };
                if n_unknown > 0 {
                    self.stats.unknown_attributes += 1;
                    return self.respond(ctx, out, 420, Some(&v.0), |w| {
                        write_unknown(w, &unknown[..n_unknown])
                    });
                }
                let expired = v.0.expired(ctx.now.unix_secs);
                if expired && (ctx.method == method::ALLOCATE || self.cfg.strict_expiry) {
                    self.stats.auth_failure(AuthFailure::Expired);
                    return self.challenge(ctx, out, 401);
                }
                match ctx.method {
                    method::ALLOCATE => self.allocate(ctx, m, out, &v.0, v.1, io),
                    method::REFRESH => self.refresh(ctx, m, out, &v.0, &v.1, io),
                    method::CREATE_PERMISSION => self.create_permission(ctx, m, out, &v.0, &v.1),
                    method::CONNECT => self.connect(ctx, m, out, &v.0, &v.1, io),
                    method::CONNECTION_BIND => self.connection_bind(ctx, m, out, &v.0, &v.1),
                    _ => self.channel_bind(ctx, m, out, &v.0, &v.1),
                }
            }
            _ => self.respond_unauth(ctx, out, 400, |_| Ok(())),
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
    ) -> Result<(Verified, String), Action> {
        if find_integrity(msg).is_none() {
            return Err(self.challenge(ctx, out, 401));
        }
        let cfg = self.cfg.clone();
        let username = match (raw(m, attr::USERNAME), raw(m, attr::USERHASH)) {
            (Some(u), _) => match std::str::from_utf8(u) {
                Ok(u) if u.len() <= 513 => u.to_string(),
                _ => return Err(self.respond_unauth(ctx, out, 400, |_| Ok(()))),
            },
            (None, Some(h)) => match cfg.credentials.user_for_hash(h) {
                Some(u) => u.to_string(),
                None => {
                    self.stats.auth_failure(AuthFailure::UnknownUser);
                    return Err(self.challenge(ctx, out, 401));
                }
            },
            (None, None) => return Err(self.respond_unauth(ctx, out, 400, |_| Ok(()))),
        };
        let (Some(_realm), Some(nonce)) = (raw(m, attr::REALM), raw(m, attr::NONCE)) else {
            return Err(self.respond_unauth(ctx, out, 400, |_| Ok(())));
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
                return Err(self.challenge(ctx, out, 438));
            }
        }
        match cfg.credentials.verify(&username, msg) {
            Ok(v) => Ok((v, username)),
            Err(e) => {
                if let Some(v) = self.kept_credential(ctx, m, &username, msg) {
                    return Ok((v, username));
                }
                self.stats.auth_failure(match e {
                    AuthError::UnknownUser => AuthFailure::UnknownUser,
                    AuthError::BadIntegrity => AuthFailure::BadIntegrity,
                });
                tracing::debug!(client = %ctx.from.client, reason = %e, "authentication failed");
                Err(self.challenge(ctx, out, 401))
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
            let id = raw(m, attr::CONNECTION_ID).and_then(u32_attr)?;
            self.tcp_conns.get(&id)?.slot
        } else {
            *self.by_tuple.get(&ctx.from)?
        };
        let a = self.slots.get(slot)?.as_ref()?;
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
        let Some(&slot) = self.by_tuple.get(&ctx.from) else {
            return Err(self.respond(ctx, out, 437, Some(v), |_| Ok(())));
        };
        let same_user = self.slots[slot]
            .as_ref()
            .is_some_and(|a| a.username == username);
        if !same_user {
            return Err(self.respond(ctx, out, 441, Some(v), |_| Ok(())));
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
        if let Some(&slot) = self.by_tuple.get(&ctx.from) {
            let retransmit = self.slots[slot]
                .as_ref()
                .is_some_and(|a| a.txid == ctx.txid && a.username == username);
            if retransmit {
                return self.allocate_success(ctx, out, v, slot);
            }
            return self.respond(ctx, out, 437, Some(v), |_| Ok(()));
        }
        // Draining (SIGTERM): existing allocations carry on, new ones go elsewhere.
        if self.shared.draining() {
            return self.no_capacity(ctx, out, v);
        }
        let bad = |s: &mut Self, out: &mut [u8]| s.respond(ctx, out, 400, Some(v), |_| Ok(()));
        let Some(rt) = raw(m, attr::REQUESTED_TRANSPORT) else {
            return bad(self, out);
        };
        if rt.len() != 4 {
            return bad(self, out);
        }
        // RFC 6062 §5.1: a TCP allocation needs a TCP or TLS control connection; asked for
        // over UDP it is a bad request. Switched off by `turn.tcp_relay`: 442.
        let tcp = rt[0] == PROTO_TCP;
        if tcp && ctx.from.transport == super::Transport::Udp {
            return bad(self, out);
        }
        if (tcp && !self.cfg.tcp_relay) || (!tcp && rt[0] != PROTO_UDP) {
            return self.respond(ctx, out, 442, Some(v), |_| Ok(()));
        }
        // RFC 6062 §5.1: these make no sense for a TCP relay.
        let udp_only = [
            attr::EVEN_PORT,
            attr::RESERVATION_TOKEN,
            attr::DONT_FRAGMENT,
            attr::ADDITIONAL_ADDRESS_FAMILY,
        ];
        if tcp && udp_only.iter().any(|&t| raw(m, t).is_some()) {
            return bad(self, out);
        }
        let token = match raw(m, attr::RESERVATION_TOKEN) {
            None => None,
            Some(t) => match <[u8; 8]>::try_from(t) {
                Ok(b) => Some(u64::from_be_bytes(b)),
                Err(_) => return bad(self, out),
            },
        };
        let even = match raw(m, attr::EVEN_PORT) {
            None => None,
            Some([b, ..]) => Some(b & 0x80 != 0),
            Some(_) => return bad(self, out),
        };
        let raf = match raw(m, attr::REQUESTED_ADDRESS_FAMILY).map(family) {
            None => None,
            Some(None) => return bad(self, out),
            Some(Some(None)) => return self.respond(ctx, out, 440, Some(v), |_| Ok(())),
            Some(Some(Some(v6))) => Some(v6),
        };
        let additional_v6 = match raw(m, attr::ADDITIONAL_ADDRESS_FAMILY).map(family) {
            None => false,
            Some(Some(Some(true))) => true,
            Some(_) => return bad(self, out),
        };
        if (token.is_some() && (even.is_some() || raf.is_some() || additional_v6))
            || (additional_v6 && (raf.is_some() || even.is_some()))
        {
            return bad(self, out);
        }
        let requested = match raw(m, attr::LIFETIME) {
            None => None,
            Some(l) => match u32_attr(l) {
                Some(l) => Some(l),
                None => return bad(self, out),
            },
        };
        let Some(lifetime) = self.grant_lifetime(requested, v, ctx.now) else {
            self.stats.auth_failure(AuthFailure::Expired);
            return self.challenge(ctx, out, 401);
        };
        // Families: the reserved port's, else the requested one, else IPv4 (§7.2).
        let want_v6 = raf.unwrap_or(false);
        if token.is_none() && self.cfg.relay_for(want_v6).is_none() {
            return self.respond(ctx, out, 440, Some(v), |_| Ok(()));
        }
        if let Some(b) = usage_tap::over_budget(&self.shared, &self.cfg, &v.quota_user) {
            return self.respond_reason(ctx, out, 486, b.reason_phrase(), Some(v), |_| Ok(()));
        }
        match self
            .shared
            .acquire_quota(&v.quota_user, self.cfg.user_quota, self.cfg.total_quota)
        {
            Ok(()) => {}
            Err(QuotaError::User) => return self.respond(ctx, out, 486, Some(v), |_| Ok(())),
            Err(QuotaError::Total) => return self.no_capacity(ctx, out, v),
        }
        let mut relays: [Option<Relay>; 2] = [None, None];
        let mut reserved_next = None;
        let opened = if let Some(t) = token {
            self.open_reserved(t, ctx.now, io).map(|r| {
                relays[family_index(r.local.ip())] = Some(r);
            })
        } else {
            let pair = even == Some(true);
            self.open_relay(want_v6, even.is_some(), pair, tcp, io)
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
            self.open_relay(true, false, false, false, io)
                .map(|(r, _)| relays[1] = Some(r))
        });
        if let Err(code) = opened {
            for r in relays.iter().flatten() {
                io.close_relay(r.id);
                self.shared.ports.release(r.local);
            }
            self.shared.release_quota(&v.quota_user);
            if code == 508 {
                return self.no_capacity(ctx, out, v);
            }
            return self.respond(ctx, out, code, Some(v), |_| Ok(()));
        }
        let reservation_token = reserved_next.map(|addr| {
            let exp = ctx.now.mono + Duration::from_secs(self.cfg.reservation_lifetime_secs as u64);
            self.push_timer(exp, TimerKind::Reservations);
            self.stats.reservations_created += 1;
            self.shared.ports.reserve(addr, exp)
        });

        let id = self.next_id;
        self.next_id += 1;
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
            usage_closed: RelayUsage::default(),
            usage_sent: RelayUsage::default(),
            usage_at: ctx.now.mono,
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
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(alloc);
                s
            }
            None => {
                self.slots.push(Some(alloc));
                self.slots.len() - 1
            }
        };
        self.by_tuple.insert(ctx.from, slot);
        for r in relays.iter().flatten() {
            self.by_relay.insert(r.id, slot);
        }
        self.push_timer(expires, TimerKind::Allocation { slot, id });
        if let Some(a) = self.slots[slot].as_mut() {
            usage_tap::report(&self.shared, a, Event::Start, ctx.now.mono, io);
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
        let Some(a) = self.slots[slot].as_ref() else {
            return Action::None;
        };
        let relays = a.relays;
        let left = a.expires.saturating_duration_since(ctx.now.mono).as_secs() as u32;
        let token = a.reservation_token;
        let v6_refused = a.v6_refused;
        let client = ctx.from.client;
        self.respond(ctx, out, 0, Some(v), |w| {
            for r in relays.iter().flatten() {
                w.xor_addr(attr::XOR_RELAYED_ADDRESS, r.advertised)?;
            }
            if v6_refused {
                // ADDRESS-ERROR-CODE (RFC 8656 §18.10): family, reserved, class, number.
                let reason = super::reply::reason(440).as_bytes();
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

    /// Opens a relay socket on a port of the pool (EVEN-PORT: even, `pair` also holds the
    /// next one and returns it); `tcp`: an RFC 6062 TCP relay listener (§5.1). Error = the
    /// STUN error code.
    fn open_relay(
        &mut self,
        v6: bool,
        even: bool,
        pair: bool,
        tcp: bool,
        io: &mut impl RelayIo,
    ) -> Result<(Relay, Option<SocketAddr>), u16> {
        let ra = self.cfg.relay_for(v6).ok_or(440u16)?;
        let mut busy: Vec<SocketAddr> = Vec::new();
        let mut result = Err(508);
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
                        result = Err(442);
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
    fn open_reserved(&mut self, token: u64, now: Now, io: &mut impl RelayIo) -> Result<Relay, u16> {
        let local = self.shared.ports.claim(token, now.mono).ok_or(508u16)?;
        let Some(ra) = self
            .cfg
            .relay
            .iter()
            .find(|r| r.local == local.ip())
            .copied()
        else {
            self.shared.ports.release(local);
            return Err(508);
        };
        match io.open_relay(local) {
            Ok(id) => Ok(Relay {
                id,
                local,
                advertised: SocketAddr::new(ra.advertised, local.port()),
            }),
            Err(_) => {
                self.shared.ports.release(local);
                Err(508)
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
        let raf = match raw(m, attr::REQUESTED_ADDRESS_FAMILY).map(family) {
            None => None,
            Some(Some(Some(v6))) => Some(v6),
            Some(_) => return self.respond(ctx, out, 400, Some(v), |_| Ok(())),
        };
        if let Some(v6) = raf {
            let has = self.slots[slot]
                .as_ref()
                .is_some_and(|a| a.relays[usize::from(v6)].is_some());
            if !has {
                return self.respond(ctx, out, 443, Some(v), |_| Ok(()));
            }
        }
        let requested = match raw(m, attr::LIFETIME) {
            None => None,
            Some(l) => match u32_attr(l) {
                Some(l) => Some(l),
                None => return self.respond(ctx, out, 400, Some(v), |_| Ok(())),
            },
        };
        if requested == Some(0) {
            let dual = self.slots[slot]
                .as_ref()
                .is_some_and(|a| a.relays.iter().all(Option::is_some));
            // RFC 8656 §7.3: with REQUESTED-ADDRESS-FAMILY only that family's relay goes;
            // the allocation stays while the other family remains.
            match raf {
                Some(v6) if dual => self.delete_family(slot, v6, io),
                _ => self.delete(slot, DeleteReason::Refreshed0, ctx.now.mono, io),
            }
            return self.respond(ctx, out, 0, Some(v), |w| w.attr_u32(attr::LIFETIME, 0));
        }
        let Some(lifetime) = self.grant_lifetime(requested, v, ctx.now) else {
            self.stats.auth_failure(AuthFailure::Expired);
            return self.challenge(ctx, out, 401);
        };
        // Over a byte budget: no more lifetime; the allocation ends when its current one
        // runs out (issue 14).
        if let Some(b) = usage_tap::over_budget(&self.shared, &self.cfg, &v.quota_user) {
            return self.respond_reason(ctx, out, 486, b.reason_phrase(), Some(v), |_| Ok(()));
        }
        let expires = ctx.now.mono + Duration::from_secs(lifetime as u64);
        let rearm = match self.slots[slot].as_mut() {
            Some(a) => {
                a.expires = expires;
                a.lifetime_secs = lifetime;
                // A longer lifetime is picked up when the pending entry fires; a shorter
                // one needs an earlier entry.
                (expires < a.timer_at).then(|| {
                    a.timer_at = expires;
                    a.id
                })
            }
            None => return Action::None,
        };
        if let Some(id) = rearm {
            self.push_timer(expires, TimerKind::Allocation { slot, id });
        }
        self.respond(ctx, out, 0, Some(v), |w| {
            w.attr_u32(attr::LIFETIME, lifetime)
        })
    }

    /// Checks a peer for a permission or channel: the allocation has a relay of its family
    /// (else 443) and the policy allows it (else 403).
    pub(super) fn check_peer(&mut self, slot: usize, peer: IpAddr) -> Result<Relay, u16> {
        let relay = self.slots[slot]
            .as_ref()
            .and_then(|a| a.relay_for(peer))
            .ok_or(443u16)?;
        if !self.cfg.policy.allows(peer) {
            self.stats.peer_denied += 1;
            return Err(403);
        }
        Ok(relay)
    }

    /// Installs or refreshes a permission (RFC 8656 §9).
    fn install_permission(&mut self, slot: usize, relay: Relay, ip: IpAddr, now: Now) {
        let exp = now.mono + Duration::from_secs(self.cfg.permission_lifetime_secs as u64);
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let id = a.id;
        if self.perms.insert((relay.id, ip), exp).is_none() {
            a.perms.push(ip);
            self.stats
                .permission_added(a.tuple.transport, family_index(ip));
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
        let peers = match peer_addresses(m) {
            Ok(p) if !p.is_empty() => p,
            _ => return self.respond(ctx, out, 400, Some(v), |_| Ok(())),
        };
        let mut relays = Vec::with_capacity(peers.len());
        for p in &peers {
            match self.check_peer(slot, p.ip()) {
                Ok(r) => relays.push(r),
                Err(code) => return self.respond(ctx, out, code, Some(v), |_| Ok(())),
            }
        }
        let existing = self.slots[slot].as_ref().map_or(0, |a| a.perms.len());
        if existing + peers.len() > MAX_PERMISSIONS {
            return self.respond(ctx, out, 508, Some(v), |_| Ok(()));
        }
        for (p, r) in peers.iter().zip(relays) {
            self.install_permission(slot, r, p.ip(), ctx.now);
        }
        self.respond(ctx, out, 0, Some(v), |_| Ok(()))
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
        if self.slots[slot].as_ref().is_some_and(|a| a.tcp) {
            return self.respond(ctx, out, 400, Some(v), |_| Ok(()));
        }
        let number = match raw(m, attr::CHANNEL_NUMBER) {
            Some([a, b, _, _]) => u16::from_be_bytes([*a, *b]),
            _ => return self.respond(ctx, out, 400, Some(v), |_| Ok(())),
        };
        let peer = match peer_addresses(m).as_deref() {
            Ok([p]) => *p,
            _ => return self.respond(ctx, out, 400, Some(v), |_| Ok(())),
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            return self.respond(ctx, out, 400, Some(v), |_| Ok(()));
        }
        let relay = match self.check_peer(slot, peer.ip()) {
            Ok(r) => r,
            Err(code) => return self.respond(ctx, out, code, Some(v), |_| Ok(())),
        };
        let Some(a) = self.slots[slot].as_ref() else {
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
            return self.respond(ctx, out, 400, Some(v), |_| Ok(()));
        }
        let exists = a.channels.iter().any(|c| c.number == number);
        if !exists && a.channels.len() >= MAX_CHANNELS {
            return self.respond(ctx, out, 508, Some(v), |_| Ok(()));
        }
        let id = a.id;
        let tuple: FiveTuple = a.tuple;
        let expires = ctx.now.mono + Duration::from_secs(self.cfg.channel_lifetime_secs as u64);
        let a = self.slots[slot].as_mut().expect("checked above");
        let revived = match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => {
                // Its pending timer entry (expiry or cooldown end) re-arms itself.
                c.expires = expires;
                !std::mem::replace(&mut c.active, true)
            }
            None => {
                a.channels.push(Channel {
                    number,
                    peer,
                    expires,
                    active: true,
                });
                self.stats.channels_created += 1;
                self.push_timer(expires, TimerKind::Channel { slot, id, number });
                true
            }
        };
        if revived {
            self.peer_channels.insert((relay.id, peer), number);
            self.client_channels
                .insert((tuple, number), (relay.id, peer));
            self.stats
                .channel_activated(tuple.transport, family_index(peer.ip()));
        }
        self.install_permission(slot, relay, peer.ip(), ctx.now);
        self.respond(ctx, out, 0, Some(v), |_| Ok(()))
    }

    /// Send indication (RFC 8656 §10.2): forwarded if a permission exists, else silently
    /// dropped (counted).
    fn send_indication(&mut self, m: &Message<'_>, from: &FiveTuple) -> Action {
        let Some(&slot) = self.by_tuple.get(from) else {
            self.stats.sends_dropped += 1;
            return Action::None;
        };
        // RFC 6062 §5: a TCP allocation relays over peer connections only.
        if self.slots[slot].as_ref().is_some_and(|a| a.tcp) {
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
        let relay = self.slots[slot]
            .as_ref()
            .and_then(|a| a.relay_for(peer.ip()));
        match relay {
            Some(r) if self.perms.contains_key(&(r.id, peer.ip())) => {
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
