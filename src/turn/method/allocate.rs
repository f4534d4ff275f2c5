//! Allocate (RFC 8656 §7.2; RFC 6062 §5.1 for TCP allocations): quotas, byte budgets,
//! relay ports (EVEN-PORT, RESERVATION-TOKEN, a second family), the new allocation and
//! its success answer. Opening the relay socket is the core's one synchronous call into
//! the driver that has an effect: the port must be bound before the answer names it.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use stun_types::message::Message;

use super::{Ctx, Cx};
use crate::stun::{attr, ErrorCode};
use crate::turn::allocation::{allocation_family, family_index, Allocation, Relay, UsageMark};
use crate::turn::auth::Verified;
use crate::turn::quota::QuotaError;
use crate::turn::request::{Allocate, EvenPort, Family};
use crate::turn::stats::AuthFailure;
use crate::turn::timers::TimerKind;
use crate::turn::usage_tap;
use crate::turn::{Now, Output, RelayIo};
use crate::usage::Event;

/// Bounded attempts at opening a relay port before 508.
const PORT_ATTEMPTS: usize = 16;

/// Which kind of relay socket an allocation gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RelayKind {
    Udp,
    /// An RFC 6062 TCP relay listener.
    Tcp,
}

/// Allocate (RFC 8656 §7.2).
pub(super) fn handle(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    out: &mut [u8],
    v: &Verified,
    username: String,
    io: &mut impl RelayIo,
) -> Option<Output> {
    if let Some(slot) = cx.tables.slot_of(&ctx.from) {
        let retransmit = cx
            .tables
            .get(slot)
            .is_some_and(|a| a.txid == ctx.txid && a.username == username);
        if retransmit {
            return success(cx, ctx, out, v, slot);
        }
        return cx.fail(ctx, out, ErrorCode::AllocationMismatch, v);
    }
    // Draining (SIGTERM): existing allocations carry on, new ones go elsewhere.
    if cx.shared.draining() {
        return cx.no_capacity(ctx, out, v);
    }
    let req = match Allocate::decode(m, ctx.from.transport, cx.cfg.tcp_relay) {
        Ok(r) => r,
        Err(code) => return cx.fail(ctx, out, code, v),
    };
    let Allocate {
        tcp,
        family,
        additional_v6,
        even_port: even,
        token,
        lifetime: requested,
    } = req;
    let Some(lifetime) = cx.grant_lifetime(requested, v, ctx.now) else {
        cx.stats.auth_failure(AuthFailure::Expired);
        return cx.challenge(ctx, out, ErrorCode::Unauthorized);
    };
    // Families: the reserved port's, else the requested one, else IPv4 (§7.2).
    let want_v6 = family.is_some_and(Family::is_v6);
    if token.is_none() && cx.cfg.relay_for(want_v6).is_none() {
        return cx.fail(ctx, out, ErrorCode::AddressFamilyNotSupported, v);
    }
    if let Some(b) = usage_tap::over_budget(cx.shared, cx.cfg, &v.quota_user) {
        let err = Err(ErrorCode::AllocationQuotaReached);
        return cx.respond_reason(ctx, out, err, b.reason_phrase(), Some(v), |_| Ok(()));
    }
    match cx
        .shared
        .acquire_quota(&v.quota_user, cx.cfg.user_quota, cx.cfg.total_quota)
    {
        Ok(()) => {}
        Err(QuotaError::User) => return cx.fail(ctx, out, ErrorCode::AllocationQuotaReached, v),
        Err(QuotaError::Total) => return cx.no_capacity(ctx, out, v),
    }
    let mut relays: [Option<Relay>; 2] = [None, None];
    let mut reserved_next = None;
    let opened = if let Some(t) = token {
        open_reserved(cx, t, ctx.now, io).map(|r| {
            relays[family_index(r.local.ip())] = Some(r);
        })
    } else {
        let kind = if tcp { RelayKind::Tcp } else { RelayKind::Udp };
        open_relay(cx, family.unwrap_or(Family::V4), even, kind, io).map(|(r, next)| {
            relays[family_index(r.local.ip())] = Some(r);
            reserved_next = next;
        })
    };
    let mut v6_refused = false;
    let opened = opened.and_then(|()| {
        if !additional_v6 {
            return Ok(());
        }
        if cx.cfg.relay_for(true).is_none() {
            v6_refused = true;
            return Ok(());
        }
        open_relay(cx, Family::V6, None, RelayKind::Udp, io).map(|(r, _)| relays[1] = Some(r))
    });
    if let Err(code) = opened {
        for r in relays.iter().flatten() {
            cx.emit(Output::CloseRelay(r.id));
            cx.shared.ports.release(r.local);
        }
        cx.shared.release_quota(&v.quota_user);
        if code == ErrorCode::InsufficientCapacity {
            return cx.no_capacity(ctx, out, v);
        }
        return cx.fail(ctx, out, code, v);
    }
    let reservation_token = reserved_next.map(|addr| {
        let exp = ctx.now.mono + Duration::from_secs(cx.cfg.reservation_lifetime_secs as u64);
        cx.push_timer(exp, TimerKind::Reservations);
        cx.stats.reservations_created += 1;
        cx.shared.ports.reserve(addr, exp)
    });

    let id = cx.tables.next_alloc_id();
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
    let slot = cx.tables.insert(alloc);
    cx.push_timer(expires, TimerKind::Allocation { slot, id });
    // Cluster mode: the user's quota lease runs with this allocation's lifetime.
    if let Some(c) = cx.shared.cluster() {
        c.renew(&v.quota_user, expires);
    }
    if let Some(a) = cx.tables.get(slot) {
        usage_tap::report(cx.shared, a, Event::Start, ctx.now.mono, io);
        usage_tap::attach_user_cap(cx.shared, cx.cfg, a, io);
    }
    if let Some(at) = usage_tap::next_report(cx.shared, cx.cfg, ctx.now.mono) {
        cx.push_timer(at, TimerKind::Usage { slot, id });
    }
    cx.stats.allocations_created += 1;
    if tcp {
        cx.stats.tcp_allocations += 1;
    }
    cx.stats
        .allocation_added(ctx.from.transport, allocation_family(&relays));
    success(cx, ctx, out, v, slot)
}

fn success(cx: &mut Cx, ctx: &Ctx, out: &mut [u8], v: &Verified, slot: usize) -> Option<Output> {
    let a = cx.tables.get(slot)?;
    let relays = a.relays;
    let left = a.expires.saturating_duration_since(ctx.now.mono).as_secs() as u32;
    let token = a.reservation_token;
    let v6_refused = a.v6_refused;
    let client = ctx.from.client;
    cx.respond(ctx, out, Ok(()), Some(v), |w| {
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
    cx: &mut Cx,
    family: Family,
    even_port: Option<EvenPort>,
    kind: RelayKind,
    io: &mut impl RelayIo,
) -> Result<(Relay, Option<SocketAddr>), ErrorCode> {
    let even = even_port.is_some();
    let pair = even_port.is_some_and(|e| e.reserve_next);
    let tcp = kind == RelayKind::Tcp;
    let ra = cx
        .cfg
        .relay_for(family.is_v6())
        .ok_or(ErrorCode::AddressFamilyNotSupported)?;
    let mut busy: Vec<SocketAddr> = Vec::new();
    let mut result = Err(ErrorCode::InsufficientCapacity);
    for _ in 0..PORT_ATTEMPTS {
        let Some(port) = cx.shared.ports.acquire(ra.local, even, pair) else {
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
        cx.shared.ports.release(a);
    }
    result
}

/// Opens the relay socket of a claimed RESERVATION-TOKEN (RFC 8656 §7.2): 508 if the
/// token is unknown or expired.
fn open_reserved(
    cx: &mut Cx,
    token: u64,
    now: Now,
    io: &mut impl RelayIo,
) -> Result<Relay, ErrorCode> {
    let local = cx
        .shared
        .ports
        .claim(token, now.mono)
        .ok_or(ErrorCode::InsufficientCapacity)?;
    let Some(ra) = cx.cfg.relay.iter().find(|r| r.local == local.ip()).copied() else {
        cx.shared.ports.release(local);
        return Err(ErrorCode::InsufficientCapacity);
    };
    match io.open_relay(local) {
        Ok(id) => Ok(Relay {
            id,
            local,
            advertised: SocketAddr::new(ra.advertised, local.port()),
        }),
        Err(_) => {
            cx.shared.ports.release(local);
            Err(ErrorCode::InsufficientCapacity)
        }
    }
}
