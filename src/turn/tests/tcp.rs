//! RFC 6062 TCP allocations driven with the simulated clock and the recording fake
//! RelayIo of `tests/mod.rs`: Allocate rules, Connect and its 446/447/403/508 answers, both
//! 30 s timers, ConnectionAttempt, ConnectionBind, teardown, counters. Also the RFC 8656
//! §7.3 per-family Refresh deletion.

use std::net::SocketAddr;

use super::*;
use crate::stun::{attr, class, message_type, method};
use crate::turn::auth::{mint_rest_credential, Key};
use crate::turn::stats::MethodLabel;

const SHARD: u8 = 3;

fn tcp_client(n: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..client(n)
    }
}

/// A data connection the client opens for ConnectionBind (RFC 6062 §5.4).
fn data_conn(n: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        client: SocketAddr::new("203.0.113.5".parse().unwrap(), 45000 + n),
        server: "192.0.2.1:3478".parse().unwrap(),
    }
}

fn tcp_alloc_req() -> Req {
    Req::new(method::ALLOCATE).attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])
}

fn new_h(tweak: impl FnOnce(&mut crate::config::Config)) -> H {
    let mut h = H::new(tweak);
    h.server.set_shard_index(SHARD);
    h
}

/// A TCP allocation for `from` as alice: its listener's id.
fn tcp_allocate(h: &mut H, from: FiveTuple) -> RelayId {
    let (u, k) = h.alice();
    let before: Vec<RelayId> = h.io.tcp_listeners.iter().copied().collect();
    let r = h.auth(from, &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 0);
    *h.io
        .tcp_listeners
        .iter()
        .find(|id| !before.contains(id))
        .expect("a TCP listener opened")
}

/// Sends `req` signed (the nonce must be known) and returns the raw outcome, which for
/// a Connect that started is `None`.
fn signed(
    h: &mut H,
    from: FiveTuple,
    req: &Req,
    user: &str,
    key: &Key,
) -> (Option<Output>, Vec<u8>) {
    if h.nonce.is_empty() {
        let r = h.send(from, &req.encode(None));
        assert_eq!(r.code(), 401);
        h.nonce = r.nonce();
    }
    let nonce = h.nonce.clone();
    h.raw(from, &req.encode(Some((user, key, &nonce))))
}

fn connect_req(peer: &str) -> Req {
    Req::new(method::CONNECT).peer(peer)
}

/// Connect as alice that starts: the CONNECTION-ID the core gave the driver.
fn start_connect(h: &mut H, from: FiveTuple, req: &Req) -> ConnId {
    let (u, k) = h.alice();
    let (a, _) = signed(h, from, req, &u, &k);
    assert_eq!(a, None, "a started Connect is answered later");
    h.io.connects.last().expect("tcp_connect called").2
}

/// The messages the core made outside a request since the last call (`Output::Send`).
fn outbox(h: &mut H) -> Vec<(FiveTuple, Resp)> {
    assert_eq!(h.drain(), None, "no answer without a request");
    std::mem::take(&mut h.sent)
        .into_iter()
        .map(|(t, bytes)| (t, Resp { bytes }))
        .collect()
}

fn conn_id(r: &Resp) -> ConnId {
    ConnId::from_wire(u32::from_be_bytes(
        r.attr(attr::CONNECTION_ID).unwrap().try_into().unwrap(),
    ))
}

fn bind_req(conn: ConnId) -> Req {
    Req::new(method::CONNECTION_BIND).u32(attr::CONNECTION_ID, conn.to_wire())
}

/// A connected peer connection (Connect, connect done, success response read).
fn connected(h: &mut H, ctl: FiveTuple, peer: &str) -> ConnId {
    let conn = start_connect(h, ctl, &connect_req(peer));
    let now = h.now();
    assert!(h.server.tcp_connect_done(now, conn, true));
    let out = outbox(h);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.code(), 0);
    conn
}

fn txid(r: &Resp) -> [u8; 12] {
    r.bytes[8..20].try_into().unwrap()
}

#[test]
fn tcp_allocate_rules() {
    let mut h = new_h(|_| {});
    let (u, k) = h.alice();
    assert_eq!(
        h.auth(client(1), &tcp_alloc_req(), &u, &k).code(),
        400,
        "over UDP (§5.1)"
    );
    for (t, v) in [
        (attr::EVEN_PORT, vec![0x80]),
        (attr::RESERVATION_TOKEN, vec![1; 8]),
        (attr::DONT_FRAGMENT, vec![]),
        (attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
    ] {
        let r = h.auth(tcp_client(1), &tcp_alloc_req().attr(t, &v), &u, &k);
        assert_eq!(r.code(), 400, "attribute {t:#x} on a TCP allocation");
    }
    assert!(h.io.open.is_empty());
    let r = h.auth(tcp_client(1), &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 0);
    assert!(r.verifies_with(&k));
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip(), ADV_V4.parse::<std::net::IpAddr>().unwrap());
    // A TCP listener on the local address, same port.
    assert_eq!(h.io.tcp_listeners.len(), 1);
    let id = *h.io.tcp_listeners.iter().next().unwrap();
    assert_eq!(
        h.io.open[&id],
        SocketAddr::new(RELAY_V4.parse().unwrap(), relayed[0].port())
    );
    let s = h.server.stats();
    assert_eq!(s.tcp_allocations, 1);
    assert_eq!(s.allocations_by[1], [1, 0, 0], "TCP client, IPv4");
    // Refresh works as for UDP; expiry closes the listener.
    let r = h.auth(
        tcp_client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    h.advance(601);
    assert!(h.io.open.is_empty());
    assert_eq!(h.server.stats().tcp_allocations, 0);
    assert_eq!(h.shared.total_allocations(), 0);

    // Switched off: 442.
    let mut h = new_h(|c| c.turn.tcp_relay = false);
    let r = h.auth(tcp_client(1), &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 442);
    // An IO driver that cannot open TCP relays: 442 too, quota and port given back.
    let mut h = new_h(|_| {});
    h.io.no_tcp = true;
    let r = h.auth(tcp_client(1), &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 442);
    assert_eq!(h.shared.total_allocations(), 0);
    assert_eq!(h.server.stats().tcp_allocations, 0);
    h.io.no_tcp = false;
    assert_eq!(h.auth(tcp_client(1), &tcp_alloc_req(), &u, &k).code(), 0);
}

#[test]
fn tcp_allocate_family_quota_and_busy_ports() {
    let mut h = H::with_relays(
        |c| {
            c.turn.user_quota = 2;
            c.turn.min_port = 50000;
            c.turn.max_port = 50002;
        },
        vec![(RELAY_V4, ADV_V4), (RELAY_V6, RELAY_V6)],
    );
    let (u, k) = h.alice();
    let r = h.auth(
        tcp_client(1),
        &tcp_alloc_req().attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].is_ipv6());
    // A port another process holds is skipped (AddrInUse), like for UDP relays.
    h.io.busy.insert("192.0.2.10:50000".parse().unwrap());
    h.io.busy.insert("192.0.2.10:50001".parse().unwrap());
    let r = h.auth(tcp_client(2), &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 0);
    assert_eq!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].port(), 50002);
    // Same per-user quota as UDP allocations.
    let r = h.auth(tcp_client(3), &tcp_alloc_req(), &u, &k);
    assert_eq!(r.code(), 486);
    // Draining: 508 as for UDP.
    h.shared.set_draining(true);
    let (u2, k2) = cred("bob", 3600);
    let r = h.auth(tcp_client(4), &tcp_alloc_req(), &u2, &k2);
    assert_eq!(r.code(), 508);
}

#[test]
fn connect_connection_bind_and_data() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    let relay = tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let req = connect_req(PEER);
    let conn = start_connect(&mut h, ctl, &req);
    assert_eq!(h.io.connects, vec![(relay, PEER.parse().unwrap(), conn)]);
    assert_eq!(conn.shard(), SHARD as usize);
    assert_ne!(conn.to_wire() & 0xFF_FFFF, 0);
    assert_eq!(h.server.stats().tcp_conns_by_state, [1, 0, 0]);
    assert!(
        outbox(&mut h).is_empty(),
        "no answer before the connect ends"
    );
    let now = h.now();
    assert!(h.server.tcp_connect_done(now, conn, true));
    let out = outbox(&mut h);
    assert_eq!(out.len(), 1);
    let (to, r) = &out[0];
    assert_eq!(*to, ctl, "answer on the control connection");
    assert_eq!(r.code(), 0);
    assert_eq!(txid(r), req.txid);
    assert_eq!(
        u16::from_be_bytes([r.bytes[0], r.bytes[1]]),
        message_type(method::CONNECT, class::SUCCESS)
    );
    assert_eq!(conn_id(r), conn);
    assert!(r.verifies_with(&k), "signed like other responses");
    assert_eq!(h.server.stats().tcp_conns_by_state, [0, 1, 0]);
    // A second connect_done for it: not connecting any more.
    assert!(!h.server.tcp_connect_done(now, conn, true));
    // The client binds a new data connection.
    let data = data_conn(1);
    let (a, out) = signed(&mut h, data, &bind_req(conn), &u, &k);
    let Some(Output::BindData { conn: c, len }) = a else {
        panic!("expected BindData, got {a:?}");
    };
    assert_eq!(c, conn);
    let r = Resp {
        bytes: out[..len].to_vec(),
    };
    assert_eq!(r.code(), 0);
    assert!(r.verifies_with(&k));
    let s = h.server.stats();
    assert_eq!(s.tcp_conns_by_state, [0, 0, 1]);
    assert_eq!(s.tcp_binds, [1, 0, 0]);
    assert_eq!(s.tcp_connects, [1, 0, 0, 0]);
    assert_eq!(s.requests_with(MethodLabel::Connect, 0), 1);
    assert_eq!(s.requests_with(MethodLabel::ConnectionBind, 0), 1);
    // Binding again: not awaiting a bind any more.
    let data2 = data_conn(2);
    let (_, out) = signed(&mut h, data2, &bind_req(conn), &u, &k);
    assert_eq!(Resp { bytes: out }.code_prefix(), 400);
    // The bound pair outlives the 30 s bind timer.
    h.advance(60);
    assert!(h.io.closed_conns.is_empty());
    assert_eq!(h.server.stats().tcp_conns_by_state, [0, 0, 1]);
    // The driver reports it closed: forgotten, no IO call, the peer can be connected again.
    h.server.tcp_conn_closed(conn);
    assert!(h.io.closed_conns.is_empty());
    assert_eq!(h.server.stats().tcp_conns_by_state, [0, 0, 0]);
    let again = start_connect(&mut h, ctl, &connect_req(PEER));
    assert_ne!(again, conn);
}

impl Resp {
    /// `code()` of a response that may carry trailing buffer bytes.
    fn code_prefix(&self) -> u16 {
        let len = u16::from_be_bytes([self.bytes[2], self.bytes[3]]) as usize + 20;
        Resp {
            bytes: self.bytes[..len].to_vec(),
        }
        .code()
    }
}

#[test]
fn connect_errors() {
    let mut h = new_h(|c| {
        c.turn.tcp_relay_max_connections = 2;
        c.turn.user_quota = 10;
    });
    let (u, k) = h.alice();
    let ctl = tcp_client(1);
    // No allocation: 437.
    let r = h.auth(ctl, &connect_req(PEER), &u, &k);
    assert_eq!(r.code(), 437);
    tcp_allocate(&mut h, ctl);
    // Another user on this connection: 441.
    let (bu, bk) = cred("bob", 3600);
    assert_eq!(h.auth(ctl, &connect_req(PEER), &bu, &bk).code(), 441);
    // A UDP allocation: 400.
    assert_eq!(h.allocate(client(2)).code(), 0);
    assert_eq!(h.auth(client(2), &connect_req(PEER), &u, &k).code(), 400);
    // Not exactly one XOR-PEER-ADDRESS: 400.
    assert_eq!(h.auth(ctl, &Req::new(method::CONNECT), &u, &k).code(), 400);
    assert_eq!(
        h.auth(ctl, &connect_req(PEER).peer(PEER2), &u, &k).code(),
        400
    );
    // No IPv6 relay: 443.
    assert_eq!(
        h.auth(ctl, &connect_req("[2606:4700::1]:80"), &u, &k)
            .code(),
        443
    );
    // The peer policy: 403, counted.
    let r = h.auth(ctl, &connect_req("127.0.0.1:80"), &u, &k);
    assert_eq!(r.code(), 403);
    assert!(r.verifies_with(&k));
    assert_eq!(h.server.stats().peer_denied, 1);
    assert!(h.io.connects.is_empty(), "nothing was connected");
    // 446 while connecting to the same peer address.
    let c1 = start_connect(&mut h, ctl, &connect_req(PEER));
    let r = h.auth(ctl, &connect_req(PEER), &u, &k);
    assert_eq!(r.code(), 446);
    assert!(r.verifies_with(&k));
    // ... and while it waits for its bind; another port of the same IP is another peer.
    let now = h.now();
    assert!(h.server.tcp_connect_done(now, c1, true));
    assert_eq!(h.auth(ctl, &connect_req(PEER), &u, &k).code(), 446);
    start_connect(&mut h, ctl, &connect_req("8.8.8.8:5001"));
    // At tcp_relay_max_connections (2): 508.
    let r = h.auth(ctl, &connect_req(PEER2), &u, &k);
    assert_eq!(r.code(), 508);
    assert_eq!(h.io.connects.len(), 2);
    let s = h.server.stats();
    assert_eq!(
        s.tcp_connects[crate::turn::stats::CONNECT_REFUSED],
        10,
        "every early error counted as refused"
    );
    assert_eq!(s.requests_with(MethodLabel::Connect, 446), 2);
    assert_eq!(s.requests_with(MethodLabel::Connect, 508), 1);
}

#[test]
fn connect_failures_answer_447() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    // The connect cannot even start: 447 at once.
    h.io.fail_connect = true;
    let r = h.auth(ctl, &connect_req(PEER), &u, &k);
    assert_eq!(r.code(), 447);
    assert!(r.verifies_with(&k));
    h.io.fail_connect = false;
    // The connect fails later: 447 in the outbox, the id forgotten.
    let req = connect_req(PEER);
    let conn = start_connect(&mut h, ctl, &req);
    let now = h.now();
    assert!(!h.server.tcp_connect_done(now, conn, false));
    let out = outbox(&mut h);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, ctl);
    assert_eq!(out[0].1.code(), 447);
    assert_eq!(txid(&out[0].1), req.txid);
    assert!(out[0].1.verifies_with(&k));
    assert!(!h.server.tcp_connect_done(now, conn, true), "unknown id");
    assert!(
        h.io.closed_conns.is_empty(),
        "the driver closes its own socket"
    );
    // The peer can be tried again.
    let conn = start_connect(&mut h, ctl, &connect_req(PEER));
    // The driver drops a connect without reporting its end: the Connect still gets 447.
    h.server.tcp_conn_closed(conn);
    let out = outbox(&mut h);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.code(), 447);
    assert!(out[0].1.verifies_with(&k));
    assert!(h.io.closed_conns.is_empty());
    start_connect(&mut h, ctl, &connect_req(PEER));
    let s = h.server.stats();
    assert_eq!(s.tcp_connects, [0, 3, 0, 0]);
    assert_eq!(s.requests_with(MethodLabel::Connect, 447), 3);
    assert_eq!(s.tcp_conns_by_state, [1, 0, 0]);
}

#[test]
fn connect_times_out_after_30_seconds() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let (_, k) = h.alice();
    let req = connect_req(PEER);
    let conn = start_connect(&mut h, ctl, &req);
    h.advance(29);
    assert!(h.io.closed_conns.is_empty());
    assert!(outbox(&mut h).is_empty());
    h.advance(2);
    assert_eq!(h.io.closed_conns, vec![conn]);
    let out = outbox(&mut h);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, ctl);
    assert_eq!(out[0].1.code(), 447);
    assert_eq!(txid(&out[0].1), req.txid);
    assert!(out[0].1.verifies_with(&k));
    // A late completion is for a forgotten id.
    let now = h.now();
    assert!(!h.server.tcp_connect_done(now, conn, true));
    let s = h.server.stats();
    assert_eq!(s.tcp_connects, [0, 0, 1, 0]);
    assert_eq!(s.tcp_conns_by_state, [0, 0, 0]);
}

#[test]
fn connection_bind_must_come_within_30_seconds() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    h.advance(20);
    // Connected at t=20: its bind timer runs from then, not from the Connect.
    let conn = connected(&mut h, ctl, PEER);
    h.advance(29);
    assert!(h.io.closed_conns.is_empty());
    h.advance(2);
    assert_eq!(h.io.closed_conns, vec![conn]);
    assert!(outbox(&mut h).is_empty(), "nothing to tell the client");
    let (u, k) = h.alice();
    let (_, out) = signed(&mut h, data_conn(1), &bind_req(conn), &u, &k);
    assert_eq!(Resp { bytes: out }.code_prefix(), 400);
    let s = h.server.stats();
    assert_eq!(s.tcp_binds, [0, 1, 1]);
    assert_eq!(s.tcp_conns_by_state, [0, 0, 0]);
}

#[test]
fn incoming_peer_needs_permission_and_room_and_sends_connection_attempt() {
    let mut h = new_h(|c| {
        c.turn.tcp_relay_max_connections = 2;
        c.turn.user_quota = 10;
    });
    let ctl = tcp_client(1);
    let relay = tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let peer: SocketAddr = PEER.parse().unwrap();
    let now = h.now();
    // No permission for the peer's IP.
    assert_eq!(h.server.tcp_peer_accepted(now, relay, peer), None);
    // CreatePermission works on TCP allocations and gates peers (§5.3).
    let r = h.auth(ctl, &Req::new(method::CREATE_PERMISSION).peer(PEER), &u, &k);
    assert_eq!(r.code(), 0);
    let id = h.server.tcp_peer_accepted(now, relay, peer).unwrap();
    let other_port: SocketAddr = "8.8.8.8:6000".parse().unwrap();
    let id2 = h.server.tcp_peer_accepted(now, relay, other_port).unwrap();
    assert_ne!(id, id2);
    assert_eq!(id.shard(), SHARD as usize);
    let out = outbox(&mut h);
    assert_eq!(out.len(), 2);
    for ((to, m), (want_peer, want_id)) in out.iter().zip([(peer, id), (other_port, id2)]) {
        assert_eq!(*to, ctl);
        m.msg(); // parses, FINGERPRINT checked
        assert_eq!(
            u16::from_be_bytes([m.bytes[0], m.bytes[1]]),
            message_type(method::CONNECTION_ATTEMPT, class::INDICATION)
        );
        assert_eq!(m.xor_addrs(attr::XOR_PEER_ADDRESS), vec![want_peer]);
        assert_eq!(conn_id(m), want_id);
        assert!(m.has(attr::FINGERPRINT));
        assert!(!m.has(attr::MESSAGE_INTEGRITY));
    }
    assert_ne!(txid(&out[0].1), txid(&out[1].1), "fresh transaction ids");
    // Over the limit.
    assert_eq!(
        h.server
            .tcp_peer_accepted(now, relay, "8.8.8.8:7000".parse().unwrap()),
        None
    );
    // The client binds the first one.
    let (a, _) = signed(&mut h, data_conn(1), &bind_req(id), &u, &k);
    assert!(matches!(a, Some(Output::BindData { conn, .. }) if conn == id));
    // Unknown relay, a UDP allocation's relay: refused without a count.
    assert_eq!(
        h.server
            .tcp_peer_accepted(now, RelayId::from_index(999), peer),
        None
    );
    assert_eq!(h.allocate(client(5)).code(), 0);
    let udp_relay = *h
        .io
        .open
        .keys()
        .find(|r| !h.io.tcp_listeners.contains(r))
        .unwrap();
    let r = h.auth(
        client(5),
        &Req::new(method::CREATE_PERMISSION).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert_eq!(h.server.tcp_peer_accepted(now, udp_relay, peer), None);
    // The permission expires (300 s): peers are refused again.
    h.server.tcp_conn_closed(id2);
    h.advance(301);
    let now = h.now();
    assert_eq!(h.server.tcp_peer_accepted(now, relay, peer), None);
    let s = h.server.stats();
    assert_eq!(s.tcp_peer_incoming, [2, 2, 1]);
}

#[test]
fn connection_bind_errors() {
    let mut h = new_h(|c| c.turn.user_quota = 10);
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let conn = connected(&mut h, ctl, PEER);
    let data = data_conn(1);
    // Unauthenticated: challenged like any request, on the new connection.
    let r = h.send(data, &bind_req(conn).encode(None));
    assert_eq!(r.code(), 401);
    assert!(r.has(attr::NONCE));
    // Over UDP: 400.
    let (_, out) = signed(&mut h, client(9), &bind_req(conn), &u, &k);
    assert_eq!(Resp { bytes: out }.code_prefix(), 400);
    // Missing CONNECTION-ID, another shard's id, an unknown id: 400.
    let r = h.auth(data, &Req::new(method::CONNECTION_BIND), &u, &k);
    assert_eq!(r.code(), 400);
    let foreign = ConnId::from_wire((u32::from(SHARD + 1) << 24) | (conn.to_wire() & 0xFF_FFFF));
    assert_eq!(h.auth(data, &bind_req(foreign), &u, &k).code(), 400);
    assert_eq!(
        h.auth(
            data,
            &bind_req(ConnId::from_wire(conn.to_wire() + 100)),
            &u,
            &k
        )
        .code(),
        400
    );
    // Still connecting: not awaiting a bind.
    let connecting = start_connect(&mut h, ctl, &connect_req(PEER2));
    assert_eq!(h.auth(data, &bind_req(connecting), &u, &k).code(), 400);
    // Sent on a control connection (this one's or another allocation's): 400.
    assert_eq!(h.auth(ctl, &bind_req(conn), &u, &k).code(), 400);
    tcp_allocate(&mut h, tcp_client(2));
    assert_eq!(h.auth(tcp_client(2), &bind_req(conn), &u, &k).code(), 400);
    // Another user: 441.
    let (bu, bk) = cred("bob", 3600);
    let r = h.auth(data, &bind_req(conn), &bu, &bk);
    assert_eq!(r.code(), 441);
    assert!(r.verifies_with(&bk));
    // Still bindable after all that.
    let (a, _) = signed(&mut h, data, &bind_req(conn), &u, &k);
    assert!(matches!(a, Some(Output::BindData { .. })));
    let s = h.server.stats();
    assert_eq!(s.tcp_binds, [1, 8, 0]);
    assert_eq!(s.requests_with(MethodLabel::ConnectionBind, 441), 1);
}

#[test]
fn connect_and_bind_with_a_rotated_secret_use_the_allocations_credential() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let conn = connected(&mut h, ctl, PEER);
    let sc = reloaded(&h, |c| c.turn.auth_secrets = vec!["rotated".into()]);
    h.server.set_config(sc);
    let (u, k) = h.alice();
    // Connect on the control connection, then ConnectionBind on a new one (found
    // through its CONNECTION-ID) both still verify with the allocation's key.
    start_connect(&mut h, ctl, &connect_req(PEER2));
    let (a, _) = signed(&mut h, data_conn(1), &bind_req(conn), &u, &k);
    assert!(matches!(a, Some(Output::BindData { .. })), "got {a:?}");
    // An unknown id gives nothing to verify against: 401.
    let (_, out) = signed(
        &mut h,
        data_conn(2),
        &bind_req(ConnId::from_wire(conn.to_wire() + 7)),
        &u,
        &k,
    );
    assert_eq!(Resp { bytes: out }.code_prefix(), 401);

    // Under strict_expiry the old credential is not honoured.
    let mut h = new_h(|c| c.turn.strict_expiry = true);
    tcp_allocate(&mut h, ctl);
    let conn = connected(&mut h, ctl, PEER);
    let sc = reloaded(&h, |c| {
        c.turn.auth_secrets = vec!["rotated".into()];
        c.turn.strict_expiry = true;
    });
    h.server.set_config(sc);
    let (_, out) = signed(&mut h, data_conn(1), &bind_req(conn), &u, &k);
    assert_eq!(Resp { bytes: out }.code_prefix(), 401);
    // The new secret's credential of another user is the wrong user.
    let c = mint_rest_credential("rotated", "bob", 3600, T0_UNIX, ":");
    let k2 = Key::md5(&c.username, REALM, &c.password);
    let (_, out) = signed(&mut h, data_conn(1), &bind_req(conn), &c.username, &k2);
    assert_eq!(Resp { bytes: out }.code_prefix(), 441);
}

#[test]
fn deleting_a_tcp_allocation_closes_its_connections_then_its_listener() {
    let mut h = new_h(|c| c.turn.user_quota = 10);
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let bound = connected(&mut h, ctl, PEER);
    let (a, _) = signed(&mut h, data_conn(1), &bind_req(bound), &u, &k);
    assert!(matches!(a, Some(Output::BindData { .. })));
    let pending = connected(&mut h, ctl, "8.8.8.8:1");
    let connecting = start_connect(&mut h, ctl, &connect_req(PEER2));
    assert_eq!(h.server.stats().tcp_conns_by_state, [1, 1, 1]);
    let r = h.auth(
        ctl,
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 0),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let mut closed = h.io.closed_conns.clone();
    closed.sort();
    let mut want = vec![bound, pending, connecting];
    want.sort();
    assert_eq!(closed, want);
    assert!(h.io.open.is_empty(), "listener closed");
    let s = h.server.stats();
    assert_eq!(s.tcp_conns_by_state, [0, 0, 0]);
    assert_eq!(s.tcp_allocations, 0);
    // Their timers fire into nothing; a late connect result is for an unknown id.
    h.advance(31);
    assert_eq!(h.io.closed_conns.len(), 3);
    assert!(outbox(&mut h).is_empty());
    let now = h.now();
    assert!(!h.server.tcp_connect_done(now, connecting, true));

    // The control connection closing does the same.
    tcp_allocate(&mut h, tcp_client(2));
    let c = connected(&mut h, tcp_client(2), PEER);
    let now = h.now();
    h.server.client_closed(&tcp_client(2), now, &mut h.io);
    h.drain();
    assert!(h.io.closed_conns.contains(&c));
    assert!(h.io.open.is_empty());
}

#[test]
fn no_channels_or_send_indications_on_tcp_allocations() {
    let mut h = new_h(|_| {});
    let ctl = tcp_client(1);
    tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let r = h.auth(
        ctl,
        &Req::new(method::CHANNEL_BIND).channel(0x4000).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 400);
    assert!(r.verifies_with(&k));
    assert_eq!(h.server.stats().channels_active, 0);
    let r = h.auth(ctl, &Req::new(method::CREATE_PERMISSION).peer(PEER), &u, &k);
    assert_eq!(r.code(), 0);
    let mut send = Req::new(method::SEND).peer(PEER);
    send.class = class::INDICATION;
    send.data = Some(b"hello".to_vec());
    let (a, _) = h.raw(ctl, &send.encode(None));
    assert_eq!(a, None);
    assert_eq!(h.server.stats().sends_dropped, 1);
    assert_eq!(h.server.stats().sends_forwarded, 0);
}

#[test]
fn connection_ids_skip_zero_and_ids_in_use() {
    let mut h = new_h(|c| c.turn.tcp_relay_max_connections = 10);
    let ctl = tcp_client(1);
    let relay = tcp_allocate(&mut h, ctl);
    let (u, k) = h.alice();
    let r = h.auth(ctl, &Req::new(method::CREATE_PERMISSION).peer(PEER), &u, &k);
    assert_eq!(r.code(), 0);
    let now = h.now();
    let top = u32::from(SHARD) << 24;
    h.server.tables_mut().set_next_conn(0xFF_FFFE);
    let a = h
        .server
        .tcp_peer_accepted(now, relay, "8.8.8.8:1".parse().unwrap())
        .unwrap();
    assert_eq!(a.to_wire(), top | 0xFF_FFFF);
    let b = h
        .server
        .tcp_peer_accepted(now, relay, "8.8.8.8:2".parse().unwrap())
        .unwrap();
    assert_eq!(b.to_wire(), top | 1, "wraps past 0");
    // The counter comes round to an id still in use: skipped.
    h.server.tables_mut().set_next_conn(0);
    let c = h
        .server
        .tcp_peer_accepted(now, relay, "8.8.8.8:3".parse().unwrap())
        .unwrap();
    assert_eq!(c.to_wire(), top | 2);
}

#[test]
fn refresh_zero_with_a_family_deletes_only_that_family() {
    let mut h = H::with_relays(|_| {}, vec![(RELAY_V4, ADV_V4), (RELAY_V6, RELAY_V6)]);
    let (u, k) = h.alice();
    let c = client(1);
    let r = h.auth(
        c,
        &Req::new(method::ALLOCATE)
            .udp()
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let v6_peer = "[2606:4700::1]:9";
    let r = h.auth(
        c,
        &Req::new(method::CHANNEL_BIND).channel(0x4001).peer(v6_peer),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let r = h.auth(
        c,
        &Req::new(method::CHANNEL_BIND).channel(0x4002).peer(PEER),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    assert_eq!(h.server.stats().allocations_by[0], [0, 0, 1]);
    let relay_of = |h: &H, v6: bool| *h.io.open.iter().find(|(_, a)| a.is_ipv6() == v6).unwrap().0;
    let (r4, r6) = (relay_of(&h, false), relay_of(&h, true));
    let refresh0 = |v6: bool| {
        Req::new(method::REFRESH).u32(attr::LIFETIME, 0).attr(
            attr::REQUESTED_ADDRESS_FAMILY,
            &[if v6 { 2 } else { 1 }, 0, 0, 0],
        )
    };
    let r = h.auth(c, &refresh0(true), &u, &k);
    assert_eq!(r.code(), 0);
    assert_eq!(r.lifetime(), 0);
    // The IPv6 relay is gone with its permission and channel; IPv4 still relays.
    assert_eq!(h.io.open.len(), 1);
    assert!(h.io.open.contains_key(&r4));
    assert!(h
        .server
        .peer_to_client(r6, v6_peer.parse().unwrap())
        .is_none());
    assert_eq!(h.server.channel_to_peer(&c, ch(0x4001)), None);
    assert_eq!(
        h.server.channel_to_peer(&c, ch(0x4002)),
        Some((r4, PEER.parse().unwrap()))
    );
    let s = h.server.stats();
    assert_eq!(s.allocations_by[0], [1, 0, 0]);
    assert_eq!(s.allocations_active, 1);
    assert_eq!(s.permissions_by[0], [1, 0]);
    assert_eq!(s.channels_by[0], [1, 0]);
    // That family is no longer there: 443; the allocation still refreshes.
    assert_eq!(h.auth(c, &refresh0(true), &u, &k).code(), 443);
    let r = h.auth(
        c,
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    // Timers of what went fire harmlessly.
    h.advance(400);
    // The last family: the whole allocation goes.
    assert_eq!(h.auth(c, &refresh0(false), &u, &k).code(), 0);
    assert!(h.io.open.is_empty());
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.shared.total_allocations(), 0);
    assert_eq!(h.server.stats().allocations_by[0], [0, 0, 0]);
    assert_eq!(
        h.auth(
            c,
            &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
            &u,
            &k
        )
        .code(),
        437
    );
}
