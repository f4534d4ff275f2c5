//! RFC 6062 TCP allocations: Connect, ConnectionAttempt, ConnectionBind and the peer
//! connection table with its 30-second timers. The bytes of a bound pair never pass
//! through here: the IO driver splices them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_types::message::Message;

use super::allocation::ConnState;
use super::auth::Verified;
use super::reply::Ctx;
use super::request::{connection_id, one_peer};
use super::server::{Server, TimerKind};
use super::stats::{
    MethodLabel, BIND_EXPIRED, BIND_OK, BIND_REJECTED, CONNECT_FAILED, CONNECT_OK, CONNECT_REFUSED,
    CONNECT_TIMEOUT, PEER_ATTEMPT_SENT, PEER_NO_PERMISSION, PEER_OVER_LIMIT,
};
use super::{conn_shard, Action, ConnId, FiveTuple, Now, RelayId, RelayIo};
use crate::stun::{attr, class, message_type, method, ErrorCode, MessageWriter};

/// How long a peer connection may stay connecting, or wait for its ConnectionBind
/// (RFC 6062 §5.2, §5.3: 30 seconds).
pub(super) const TCP_CONN_TIMEOUT: Duration = Duration::from_secs(30);

impl Server {
    /// Sets the index of this shard's worker; it becomes the top 8 bits of every
    /// CONNECTION-ID this shard hands out (see [`super::conn_shard`]).
    pub fn set_shard_index(&mut self, index: u8) {
        self.shard_index = index;
    }

    /// Whether `tuple` is the control connection of an allocation on this shard.
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.tables.slot_of(tuple).is_some()
    }

    /// The driver's connect for peer connection `conn` finished (RFC 6062 §5.2): on
    /// success the Connect success response (with CONNECTION-ID) is queued in the outbox
    /// and the 30 s ConnectionBind timer starts; on failure a 447 response is queued and
    /// the core forgets `conn`. Returns whether the driver keeps the socket (`false`:
    /// close it, e.g. the allocation went meanwhile or `ok` was false).
    pub fn tcp_connect_done(&mut self, now: Now, conn: ConnId, ok: bool) -> bool {
        let Some(pc) = self.tables.conn(conn) else {
            return false;
        };
        let ConnState::Connecting { txid, cred } = &pc.state else {
            return false;
        };
        let (txid, cred) = (*txid, cred.clone());
        let Some(tuple) = self.live(pc.slot, pc.alloc_id).map(|a| a.tuple) else {
            self.forget_conn(conn);
            return false;
        };
        if !ok {
            self.forget_conn(conn);
            self.stats.tcp_connects[CONNECT_FAILED] += 1;
            tracing::debug!(client = %tuple.client, conn, "TCP relay connect failed");
            self.queue_connect_response(
                tuple,
                txid,
                now,
                Err(ErrorCode::ConnectionTimeoutOrFailure),
                &cred,
                None,
            );
            return false;
        }
        let deadline = now.mono + TCP_CONN_TIMEOUT;
        self.set_state(conn, ConnState::Pending, deadline);
        self.push_timer(deadline, TimerKind::TcpConn { conn });
        self.stats.tcp_connects[CONNECT_OK] += 1;
        self.queue_connect_response(tuple, txid, now, Ok(()), &cred, Some(conn));
        true
    }

    /// A peer connected to TCP relay listener `relay` (RFC 6062 §5.3). `Some(conn)`: keep
    /// the socket without reading from it until it is bound; a ConnectionAttempt
    /// indication is queued in the outbox. `None`: no permission or over the limit, close it.
    pub fn tcp_peer_accepted(
        &mut self,
        now: Now,
        relay: RelayId,
        peer: SocketAddr,
    ) -> Option<ConnId> {
        let slot = self.tables.slot_of_relay(relay)?;
        let a = self.tables.get(slot)?;
        if !a.tcp {
            return None;
        }
        let tuple = a.tuple;
        let permitted = self
            .tables
            .permission(relay, peer.ip())
            .is_some_and(|exp| exp > now.mono);
        if !permitted {
            self.stats.tcp_peer_incoming[PEER_NO_PERMISSION] += 1;
            tracing::debug!(client = %tuple.client, %peer, "TCP peer without permission refused");
            return None;
        }
        if a.conns.len() >= self.cfg.tcp_relay_max_connections as usize {
            self.stats.tcp_peer_incoming[PEER_OVER_LIMIT] += 1;
            tracing::debug!(client = %tuple.client, %peer, "TCP peer over the connection limit");
            return None;
        }
        let Some(conn) = self.tables.new_conn_id(self.shard_index) else {
            self.stats.tcp_peer_incoming[PEER_OVER_LIMIT] += 1;
            return None;
        };
        self.add_conn(slot, conn, peer, ConnState::Pending, now.mono);
        // ConnectionAttempt (RFC 6062 §6.2.2): XOR-PEER-ADDRESS and CONNECTION-ID.
        let mut buf = [0u8; 128];
        let written = (|| {
            let mut w = MessageWriter::new(
                &mut buf,
                message_type(method::CONNECTION_ATTEMPT, class::INDICATION),
                rand::random(),
            )?;
            w.xor_addr(attr::XOR_PEER_ADDRESS, peer)?;
            w.attr_u32(attr::CONNECTION_ID, conn)?;
            w.finish_with_fingerprint()
        })();
        if let Ok(n) = written {
            self.outbox.push((tuple, buf[..n].to_vec()));
        }
        self.stats.tcp_peer_incoming[PEER_ATTEMPT_SENT] += 1;
        Some(conn)
    }

    /// The driver closed peer connection `conn` (either side of a bound pair ended, or a
    /// peer waiting for its ConnectionBind hung up). One still connecting has its Connect
    /// answered with 447, so the client does not wait for an answer that cannot come.
    pub fn tcp_conn_closed(&mut self, conn: ConnId) {
        let Some(pc) = self.tables.conn(conn) else {
            return;
        };
        match &pc.state {
            ConnState::Bound { data } => {
                tracing::debug!(client = %data.client, conn, "TCP relay connection ended");
            }
            ConnState::Connecting { txid, cred } => {
                let (txid, cred) = (*txid, cred.clone());
                if let Some(a) = self.live(pc.slot, pc.alloc_id) {
                    let (tuple, created) = (a.tuple, a.created);
                    self.stats.tcp_connects[CONNECT_FAILED] += 1;
                    // A signed answer does not read the clock (only unauthenticated
                    // ones pass the rate limiter), so this call needs no `now`.
                    let now = Now {
                        mono: created,
                        unix_secs: 0,
                    };
                    self.queue_connect_response(
                        tuple,
                        txid,
                        now,
                        Err(ErrorCode::ConnectionTimeoutOrFailure),
                        &cred,
                        None,
                    );
                }
            }
            ConnState::Pending => {}
        }
        self.forget_conn(conn);
    }

    /// Messages for clients produced outside a request: Connect responses, ConnectionAttempt
    /// indications and 447 timeouts (RFC 6062 §5.2, §5.3). Each goes on control connection
    /// `tuple`; the driver calls this after every call into the core.
    pub fn drain_outbox(&mut self, mut f: impl FnMut(&FiveTuple, &[u8])) {
        for (t, m) in self.outbox.drain(..) {
            f(&t, &m);
        }
    }

    /// Connect (RFC 6062 §5.2), authenticated. Answered now only when it fails early;
    /// otherwise the driver connects and `tcp_connect_done` (or the 30 s timer) answers.
    pub(super) fn connect(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: &str,
        io: &mut impl RelayIo,
    ) -> Action {
        let refuse = |s: &mut Self, out: &mut [u8], code: ErrorCode| {
            s.stats.tcp_connects[CONNECT_REFUSED] += 1;
            s.respond(ctx, out, Err(code), Some(v), |_| Ok(()))
        };
        let slot = match self.own_allocation(ctx, out, v, username) {
            Ok(s) => s,
            Err(a) => {
                self.stats.tcp_connects[CONNECT_REFUSED] += 1;
                return a;
            }
        };
        if !self.tables.get(slot).is_some_and(|a| a.tcp) {
            return refuse(self, out, ErrorCode::BadRequest);
        }
        let peer = match one_peer(m) {
            Ok(p) => p,
            Err(code) => return refuse(self, out, code),
        };
        let relay = match self.check_peer(slot, peer.ip()) {
            Ok(r) => r,
            Err(code) => return refuse(self, out, code),
        };
        // §5.2: one connection per peer address, whether still connecting, waiting for
        // its bind, or bound.
        if self.tables.has_conn_to(slot, peer) {
            return refuse(self, out, ErrorCode::ConnectionAlreadyExists);
        }
        let Some(a) = self.tables.get(slot) else {
            return Action::None;
        };
        if a.conns.len() >= self.cfg.tcp_relay_max_connections as usize {
            return refuse(self, out, ErrorCode::InsufficientCapacity);
        }
        let Some(conn) = self.tables.new_conn_id(self.shard_index) else {
            return refuse(self, out, ErrorCode::InsufficientCapacity);
        };
        if let Err(e) = io.tcp_connect(relay.id, peer, conn) {
            tracing::debug!(client = %ctx.from.client, %peer, error = %e, "TCP relay connect could not start");
            self.stats.tcp_connects[CONNECT_FAILED] += 1;
            return self.fail(ctx, out, ErrorCode::ConnectionTimeoutOrFailure, v);
        }
        let state = ConnState::Connecting {
            txid: ctx.txid,
            cred: v.clone(),
        };
        self.add_conn(slot, conn, peer, state, ctx.now.mono);
        Action::None
    }

    /// ConnectionBind (RFC 6062 §5.4), authenticated, on a new TCP/TLS connection: it
    /// becomes the client data connection of peer connection CONNECTION-ID.
    pub(super) fn connection_bind(
        &mut self,
        ctx: &Ctx,
        m: &Message<'_>,
        out: &mut [u8],
        v: &Verified,
        username: &str,
    ) -> Action {
        let reject = |s: &mut Self, out: &mut [u8], code: ErrorCode| {
            s.stats.tcp_binds[BIND_REJECTED] += 1;
            s.respond(ctx, out, Err(code), Some(v), |_| Ok(()))
        };
        let Some(conn) = connection_id(m) else {
            return reject(self, out, ErrorCode::BadRequest);
        };
        if conn_shard(conn) != usize::from(self.shard_index) {
            return reject(self, out, ErrorCode::BadRequest);
        }
        let Some(pc) = self.tables.conn(conn) else {
            return reject(self, out, ErrorCode::BadRequest);
        };
        if !matches!(pc.state, ConnState::Pending) {
            return reject(self, out, ErrorCode::BadRequest);
        }
        // A control connection cannot turn into a data connection (§5.4).
        if self.tables.slot_of(&ctx.from).is_some() {
            return reject(self, out, ErrorCode::BadRequest);
        }
        let Some(a) = self.live(pc.slot, pc.alloc_id) else {
            return reject(self, out, ErrorCode::BadRequest);
        };
        if a.username != username {
            return reject(self, out, ErrorCode::WrongCredentials);
        }
        let deadline = pc.deadline;
        self.set_state(conn, ConnState::Bound { data: ctx.from }, deadline);
        self.stats.tcp_binds[BIND_OK] += 1;
        tracing::debug!(client = %ctx.from.client, conn, "TCP relay connection bound");
        match self.respond(ctx, out, Ok(()), Some(v), |_| Ok(())) {
            Action::Reply(len) => Action::BindData { conn, len },
            other => other,
        }
    }

    /// A peer connection's 30 s wait ended (RFC 6062 §5.2, §5.3): still connecting → the
    /// Connect gets 447; still waiting for its ConnectionBind → closed.
    pub(super) fn tcp_conn_timeout(&mut self, now: Now, conn: ConnId, io: &mut impl RelayIo) {
        let Some(pc) = self.tables.conn(conn) else {
            return;
        };
        // A later deadline: the id was reused, or the state moved on and re-armed.
        if pc.deadline > now.mono {
            return;
        }
        let tuple = self.live(pc.slot, pc.alloc_id).map(|a| a.tuple);
        match &pc.state {
            ConnState::Connecting { txid, cred } => {
                let (txid, cred) = (*txid, cred.clone());
                io.close_tcp_conn(conn);
                self.forget_conn(conn);
                self.stats.tcp_connects[CONNECT_TIMEOUT] += 1;
                if let Some(tuple) = tuple {
                    tracing::debug!(client = %tuple.client, conn, "TCP relay connect timed out");
                    self.queue_connect_response(
                        tuple,
                        txid,
                        now,
                        Err(ErrorCode::ConnectionTimeoutOrFailure),
                        &cred,
                        None,
                    );
                }
            }
            ConnState::Pending => {
                io.close_tcp_conn(conn);
                self.forget_conn(conn);
                self.stats.tcp_binds[BIND_EXPIRED] += 1;
            }
            ConnState::Bound { .. } => {}
        }
    }

    /// Records a new peer connection of the allocation in `slot`, with its 30 s timer.
    fn add_conn(
        &mut self,
        slot: usize,
        conn: ConnId,
        peer: SocketAddr,
        state: ConnState,
        now: Instant,
    ) {
        let deadline = now + TCP_CONN_TIMEOUT;
        let index = state.index();
        if self.tables.add_conn(slot, conn, peer, state, deadline) {
            self.stats.tcp_conns_by_state[index] += 1;
            self.push_timer(deadline, TimerKind::TcpConn { conn });
        }
    }

    fn set_state(&mut self, conn: ConnId, state: ConnState, deadline: Instant) {
        let index = state.index();
        if let Some(old) = self.tables.set_conn_state(conn, state, deadline) {
            self.stats.tcp_conns_by_state[old.index()] -= 1;
            self.stats.tcp_conns_by_state[index] += 1;
        }
    }

    /// Drops `conn` from the tables (no IO).
    fn forget_conn(&mut self, conn: ConnId) {
        if let Some(pc) = self.tables.remove_conn(conn) {
            self.stats.tcp_conns_by_state[pc.state.index()] -= 1;
        }
    }

    /// Queues the deferred answer to a Connect: success with CONNECTION-ID, or 447.
    fn queue_connect_response(
        &mut self,
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
        let reply = self.respond(&ctx, &mut buf, result, Some(cred), |w| match conn {
            Some(c) => w.attr_u32(attr::CONNECTION_ID, c),
            None => Ok(()),
        });
        if let Action::Reply(n) = reply {
            buf.truncate(n);
            self.outbox.push((tuple, buf));
        }
    }
}
