//! RFC 6062 TCP allocations: Connect (§5.2), ConnectionBind (§5.4), ConnectionAttempt
//! (§5.3) and the peer connection table's states with their 30-second timers. The bytes
//! of a bound pair never pass through here: the IO driver splices them. Answers made
//! outside a request (a Connect's deferred answer, ConnectionAttempt, 447) leave as
//! `Output::Send`; peer connections the core ends as `Output::ClosePeerConn`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_types::message::Message;

use super::{Ctx, Cx};
use crate::stun::{attr, class, message_type, method, ErrorCode, MessageWriter};
use crate::turn::allocation::ConnState;
use crate::turn::auth::Verified;
use crate::turn::request::{connection_id, one_peer};
use crate::turn::stats::{
    MethodLabel, BIND_EXPIRED, BIND_OK, BIND_REJECTED, CONNECT_FAILED, CONNECT_OK, CONNECT_REFUSED,
    CONNECT_TIMEOUT, PEER_ATTEMPT_SENT, PEER_NO_PERMISSION, PEER_OVER_LIMIT,
};
use crate::turn::timers::TimerKind;
use crate::turn::{ConnId, FiveTuple, Now, Output, RelayId, RelayIo};

/// How long a peer connection may stay connecting, or wait for its ConnectionBind
/// (RFC 6062 §5.2, §5.3: 30 seconds).
const TCP_CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// The driver's connect for peer connection `conn` finished (RFC 6062 §5.2): on
/// success the Connect success response (with CONNECTION-ID) is queued
/// and the 30 s ConnectionBind timer starts; on failure a 447 response is queued and
/// the core forgets `conn`. Returns whether the driver keeps the socket (`false`:
/// close it, e.g. the allocation went meanwhile or `ok` was false).
pub(in crate::turn) fn connect_done(cx: &mut Cx, now: Now, conn: ConnId, ok: bool) -> bool {
    let Some(pc) = cx.tables.conn(conn) else {
        return false;
    };
    let ConnState::Connecting { txid, cred } = &pc.state else {
        return false;
    };
    let (txid, cred) = (*txid, cred.clone());
    let Some(tuple) = cx.tables.live(pc.slot, pc.alloc_id).map(|a| a.tuple) else {
        forget_conn(cx, conn);
        return false;
    };
    if !ok {
        forget_conn(cx, conn);
        cx.stats.tcp_connects[CONNECT_FAILED] += 1;
        tracing::debug!(client = %tuple.client, conn = conn.to_wire(), "TCP relay connect failed");
        queue_connect_failed(cx, tuple, txid, now, &cred);
        return false;
    }
    let deadline = now.mono + TCP_CONN_TIMEOUT;
    set_state(cx, conn, ConnState::Pending, deadline);
    cx.push_timer(deadline, TimerKind::TcpConn { conn });
    cx.stats.tcp_connects[CONNECT_OK] += 1;
    queue_connect_response(cx, tuple, txid, now, Ok(()), &cred, Some(conn));
    true
}

/// A peer connected to TCP relay listener `relay` (RFC 6062 §5.3). `Some(conn)`: keep
/// the socket without reading from it until it is bound; a ConnectionAttempt
/// indication is queued. `None`: no permission or over the limit, close it.
pub(in crate::turn) fn peer_accepted(
    cx: &mut Cx,
    now: Now,
    relay: RelayId,
    peer: SocketAddr,
) -> Option<ConnId> {
    let slot = cx.tables.slot_of_relay(relay)?;
    let a = cx.tables.get(slot)?;
    if !a.tcp {
        return None;
    }
    let tuple = a.tuple;
    let permitted = cx
        .tables
        .permission(relay, peer.ip())
        .is_some_and(|exp| exp > now.mono);
    if !permitted {
        cx.stats.tcp_peer_incoming[PEER_NO_PERMISSION] += 1;
        tracing::debug!(client = %tuple.client, %peer, "TCP peer without permission refused");
        return None;
    }
    if a.conns.len() >= cx.cfg.tcp_relay_max_connections as usize {
        cx.stats.tcp_peer_incoming[PEER_OVER_LIMIT] += 1;
        tracing::debug!(client = %tuple.client, %peer, "TCP peer over the connection limit");
        return None;
    }
    let Some(conn) = cx.tables.new_conn_id(cx.shard_index) else {
        cx.stats.tcp_peer_incoming[PEER_OVER_LIMIT] += 1;
        return None;
    };
    add_conn(cx, slot, conn, peer, ConnState::Pending, now.mono);
    // ConnectionAttempt (RFC 6062 §6.2.2): XOR-PEER-ADDRESS and CONNECTION-ID.
    let mut buf = [0u8; 128];
    let written = (|| {
        let mut w = MessageWriter::new(
            &mut buf,
            message_type(method::CONNECTION_ATTEMPT, class::INDICATION),
            rand::random(),
        )?;
        w.xor_addr(attr::XOR_PEER_ADDRESS, peer)?;
        w.attr_u32(attr::CONNECTION_ID, conn.to_wire())?;
        w.finish_with_fingerprint()
    })();
    if let Ok(n) = written {
        cx.emit(Output::Send {
            to: tuple,
            msg: buf[..n].to_vec(),
        });
    }
    cx.stats.tcp_peer_incoming[PEER_ATTEMPT_SENT] += 1;
    Some(conn)
}

/// The driver closed peer connection `conn` (either side of a bound pair ended, or a
/// peer waiting for its ConnectionBind hung up). One still connecting has its Connect
/// answered with 447, so the client does not wait for an answer that cannot come.
pub(in crate::turn) fn conn_closed(cx: &mut Cx, conn: ConnId) {
    let Some(pc) = cx.tables.conn(conn) else {
        return;
    };
    match &pc.state {
        ConnState::Bound { data } => {
            tracing::debug!(client = %data.client, conn = conn.to_wire(), "TCP relay connection ended");
        }
        ConnState::Connecting { txid, cred } => {
            let (txid, cred) = (*txid, cred.clone());
            if let Some(a) = cx.tables.live(pc.slot, pc.alloc_id) {
                let (tuple, created) = (a.tuple, a.created);
                cx.stats.tcp_connects[CONNECT_FAILED] += 1;
                // A signed answer does not read the clock (only unauthenticated
                // ones pass the rate limiter), so this call needs no `now`.
                let now = Now {
                    mono: created,
                    unix_secs: 0,
                };
                queue_connect_failed(cx, tuple, txid, now, &cred);
            }
        }
        ConnState::Pending => {}
    }
    forget_conn(cx, conn);
}

/// Connect (RFC 6062 §5.2), authenticated. Answered now only when it fails early;
/// otherwise the driver connects and `tcp_connect_done` (or the 30 s timer) answers.
pub(super) fn connect(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    out: &mut [u8],
    v: &Verified,
    username: &str,
    io: &mut impl RelayIo,
) -> Option<Output> {
    let refuse = |cx: &mut Cx, out: &mut [u8], code: ErrorCode| {
        cx.stats.tcp_connects[CONNECT_REFUSED] += 1;
        cx.respond(ctx, out, Err(code), Some(v), |_| Ok(()))
    };
    let slot = match cx.own_allocation(ctx, out, v, username) {
        Ok(s) => s,
        Err(a) => {
            cx.stats.tcp_connects[CONNECT_REFUSED] += 1;
            return a;
        }
    };
    if !cx.tables.get(slot).is_some_and(|a| a.tcp) {
        return refuse(cx, out, ErrorCode::BadRequest);
    }
    let peer = match one_peer(m) {
        Ok(p) => p,
        Err(code) => return refuse(cx, out, code),
    };
    let relay = match cx.check_peer(slot, peer.ip()) {
        Ok(r) => r,
        Err(code) => return refuse(cx, out, code),
    };
    // §5.2: one connection per peer address, whether still connecting, waiting for
    // its bind, or bound.
    if cx.tables.has_conn_to(slot, peer) {
        return refuse(cx, out, ErrorCode::ConnectionAlreadyExists);
    }
    let a = cx.tables.get(slot)?;
    if a.conns.len() >= cx.cfg.tcp_relay_max_connections as usize {
        return refuse(cx, out, ErrorCode::InsufficientCapacity);
    }
    let Some(conn) = cx.tables.new_conn_id(cx.shard_index) else {
        return refuse(cx, out, ErrorCode::InsufficientCapacity);
    };
    if let Err(e) = io.tcp_connect(relay.id, peer, conn) {
        tracing::debug!(client = %ctx.from.client, %peer, error = %e, "TCP relay connect could not start");
        cx.stats.tcp_connects[CONNECT_FAILED] += 1;
        return cx.fail(ctx, out, ErrorCode::ConnectionTimeoutOrFailure, v);
    }
    let state = ConnState::Connecting {
        txid: ctx.txid,
        cred: v.clone(),
    };
    add_conn(cx, slot, conn, peer, state, ctx.now.mono);
    None
}

/// ConnectionBind (RFC 6062 §5.4), authenticated, on a new TCP/TLS connection: it
/// becomes the client data connection of peer connection CONNECTION-ID.
pub(super) fn bind(
    cx: &mut Cx,
    ctx: &Ctx,
    m: &Message<'_>,
    out: &mut [u8],
    v: &Verified,
    username: &str,
) -> Option<Output> {
    let reject = |cx: &mut Cx, out: &mut [u8], code: ErrorCode| {
        cx.stats.tcp_binds[BIND_REJECTED] += 1;
        cx.respond(ctx, out, Err(code), Some(v), |_| Ok(()))
    };
    let Some(conn) = connection_id(m) else {
        return reject(cx, out, ErrorCode::BadRequest);
    };
    if conn.shard() != usize::from(cx.shard_index) {
        return reject(cx, out, ErrorCode::BadRequest);
    }
    let Some(pc) = cx.tables.conn(conn) else {
        return reject(cx, out, ErrorCode::BadRequest);
    };
    if !matches!(pc.state, ConnState::Pending) {
        return reject(cx, out, ErrorCode::BadRequest);
    }
    // A control connection cannot turn into a data connection (§5.4).
    if cx.tables.slot_of(&ctx.from).is_some() {
        return reject(cx, out, ErrorCode::BadRequest);
    }
    let Some(a) = cx.tables.live(pc.slot, pc.alloc_id) else {
        return reject(cx, out, ErrorCode::BadRequest);
    };
    if a.username != username {
        return reject(cx, out, ErrorCode::WrongCredentials);
    }
    let deadline = pc.deadline;
    set_state(cx, conn, ConnState::Bound { data: ctx.from }, deadline);
    cx.stats.tcp_binds[BIND_OK] += 1;
    tracing::debug!(client = %ctx.from.client, conn = conn.to_wire(), "TCP relay connection bound");
    match cx.respond(ctx, out, Ok(()), Some(v), |_| Ok(())) {
        Some(Output::Reply { len }) => Some(Output::BindData { conn, len }),
        other => other,
    }
}

/// A peer connection's 30 s wait ended (RFC 6062 §5.2, §5.3): still connecting → the
/// Connect gets 447; still waiting for its ConnectionBind → closed.
pub(in crate::turn) fn conn_timeout(cx: &mut Cx, now: Now, conn: ConnId) {
    let Some(pc) = cx.tables.conn(conn) else {
        return;
    };
    // A later deadline: the id was reused, or the state moved on and re-armed.
    if pc.deadline > now.mono {
        return;
    }
    let tuple = cx.tables.live(pc.slot, pc.alloc_id).map(|a| a.tuple);
    match &pc.state {
        ConnState::Connecting { txid, cred } => {
            let (txid, cred) = (*txid, cred.clone());
            cx.emit(Output::ClosePeerConn(conn));
            forget_conn(cx, conn);
            cx.stats.tcp_connects[CONNECT_TIMEOUT] += 1;
            if let Some(tuple) = tuple {
                tracing::debug!(client = %tuple.client, conn = conn.to_wire(), "TCP relay connect timed out");
                queue_connect_failed(cx, tuple, txid, now, &cred);
            }
        }
        ConnState::Pending => {
            cx.emit(Output::ClosePeerConn(conn));
            forget_conn(cx, conn);
            cx.stats.tcp_binds[BIND_EXPIRED] += 1;
        }
        ConnState::Bound { .. } => {}
    }
}

/// Records a new peer connection of the allocation in `slot`, with its 30 s timer.
fn add_conn(
    cx: &mut Cx,
    slot: usize,
    conn: ConnId,
    peer: SocketAddr,
    state: ConnState,
    now: Instant,
) {
    let deadline = now + TCP_CONN_TIMEOUT;
    let index = state.index();
    if cx.tables.add_conn(slot, conn, peer, state, deadline) {
        cx.stats.tcp_conns_by_state[index] += 1;
        cx.push_timer(deadline, TimerKind::TcpConn { conn });
    }
}

fn set_state(cx: &mut Cx, conn: ConnId, state: ConnState, deadline: Instant) {
    let index = state.index();
    if let Some(old) = cx.tables.set_conn_state(conn, state, deadline) {
        cx.stats.tcp_conns_by_state[old.index()] -= 1;
        cx.stats.tcp_conns_by_state[index] += 1;
    }
}

/// Drops `conn` from the tables (no IO).
fn forget_conn(cx: &mut Cx, conn: ConnId) {
    if let Some(pc) = cx.tables.remove_conn(conn) {
        cx.stats.tcp_conns_by_state[pc.state.index()] -= 1;
    }
}

/// Queues the deferred 447 to a Connect whose peer connection failed or timed out
/// (RFC 6062 §5.2).
fn queue_connect_failed(cx: &mut Cx, tuple: FiveTuple, txid: [u8; 12], now: Now, cred: &Verified) {
    let failed = Err(ErrorCode::ConnectionTimeoutOrFailure);
    queue_connect_response(cx, tuple, txid, now, failed, cred, None);
}

/// Queues the deferred answer to a Connect: success with CONNECTION-ID, or 447.
fn queue_connect_response(
    cx: &mut Cx,
    tuple: FiveTuple,
    txid: [u8; 12],
    now: Now,
    result: Result<(), ErrorCode>,
    cred: &Verified,
    conn: Option<ConnId>,
) {
    let ctx = Ctx {
        method: method::CONNECT,
        label: MethodLabel::Connect,
        txid,
        from: tuple,
        now,
    };
    let mut buf = vec![0u8; 512];
    let reply = cx.respond(&ctx, &mut buf, result, Some(cred), |w| match conn {
        Some(c) => w.attr_u32(attr::CONNECTION_ID, c.to_wire()),
        None => Ok(()),
    });
    if let Some(Output::Reply { len: n }) = reply {
        buf.truncate(n);
        cx.emit(Output::Send {
            to: tuple,
            msg: buf,
        });
    }
}
