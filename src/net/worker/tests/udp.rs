//! Control answers and ChannelData over UDP and TCP, TCP framing and garbage, the idle
//! timeout, the per-IP limit, wildcard listeners and the bandwidth cap.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::client::{self, channel_data, type_of, Client, UDP};
use super::{start, wait_stats};
use crate::config::Config;
use crate::net::TurnService;
use crate::stun::{class, message_type, method};

const CHANNEL: u16 = 0x4000;

/// A Binding request (RFC 8489 §3).
fn binding() -> Vec<u8> {
    client::message(
        message_type(method::BINDING, class::REQUEST),
        &[],
        None,
        None,
    )
}

/// Asserts `resp` is the success answer to Binding request `req`.
fn assert_binding_answer(resp: &[u8], req: &[u8]) {
    assert_eq!(type_of(resp), message_type(method::BINDING, class::SUCCESS));
    assert_eq!(resp[8..20], req[8..20], "same transaction");
}

/// A UDP peer, the service, its listener address, and a UDP client whose allocation has
/// channel [`CHANNEL`] bound to that peer.
fn udp_setup(tweak: impl FnOnce(&mut Config)) -> (UdpSocket, TurnService, SocketAddr, Client) {
    let peer = client::udp_socket();
    let mut cfg = client::config(1);
    tweak(&mut cfg);
    let svc = start(&cfg);
    let server = svc.local_addrs()[0];
    let mut c = Client::udp(server);
    c.allocate(UDP);
    c.channel_bind(CHANNEL, peer.local_addr().unwrap());
    (peer, svc, server, c)
}

#[test]
fn udp_control_and_channel_data_both_ways() {
    let (peer, svc, server, c) = udp_setup(|_| {});
    let client = c.sock();
    let mut buf = [0u8; 2048];

    let req = binding();
    client.send_to(&req, server).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, server);
    assert_binding_answer(&buf[..n], &req);

    client
        .send_to(&channel_data(CHANNEL, b"hello", false), server)
        .unwrap();
    let (n, relay) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_ne!(relay, server, "peer data leaves from the relay socket");

    peer.send_to(b"world!", relay).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, server);
    assert_eq!(&buf[..n], &channel_data(CHANNEL, b"world!", false)[..]);

    // Unbound channel, garbage, and data from a stranger are dropped and counted.
    client
        .send_to(&channel_data(0x4001, b"x", false), server)
        .unwrap();
    client.send_to(&[0xff; 3], server).unwrap();
    // Permissions are per IP address (RFC 8656 §9): the stranger is on another one.
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    stranger.send_to(b"spam", relay).unwrap();
    let st = wait_stats(&svc, |s| {
        s.drop_no_channel == 1 && s.drop_invalid == 1 && s.drop_no_permission == 1
    });
    assert_eq!(st.client_to_peer_udp_packets, 1);
    assert_eq!(st.client_to_peer_udp_bytes, 5);
    assert_eq!(st.peer_to_client_udp_packets, 1);
    assert_eq!(st.peer_to_client_udp_bytes, 10);
    assert_eq!(
        (st.drop_no_channel, st.drop_invalid, st.drop_no_permission),
        (1, 1, 1)
    );

    // Still serving after the bad input.
    let req = binding();
    client.send_to(&req, server).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_binding_answer(&buf[..n], &req);
    svc.shutdown();
}

/// `m` written one byte at a time.
fn trickle(c: &mut TcpStream, m: &[u8]) {
    for b in m {
        c.write_all(std::slice::from_ref(b)).unwrap();
    }
}

#[test]
fn tcp_framing_padding_and_garbage_close() {
    let peer = client::udp_socket();
    let svc = start(&client::config(1));
    let server = svc.local_addrs()[0];
    let mut c = Client::tcp(server);

    // A request written byte by byte is framed whole; so is a padded ChannelData frame.
    let req = binding();
    trickle(c.stream(), &req);
    assert_binding_answer(&c.wire.recv(), &req);
    c.allocate(UDP);
    c.channel_bind(CHANNEL, peer.local_addr().unwrap());
    trickle(c.stream(), &channel_data(CHANNEL, b"hello", true));
    let mut buf = [0u8; 2048];
    let (n, relay) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");

    peer.send_to(b"world!", relay).unwrap();
    let mut framed = [0u8; 12];
    c.stream().read_exact(&mut framed).unwrap();
    assert_eq!(&framed[..], &channel_data(CHANNEL, b"world!", true)[..]);

    c.stream().write_all(&[0xff; 8]).unwrap();
    let n = c.stream().read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "garbage closes the connection");
    let st = wait_stats(&svc, |s| s.tcp_closed_garbage == 1);
    assert_eq!(st.tcp_closed_garbage, 1);
    assert_eq!(st.client_to_peer_tcp_packets, 1);
    assert_eq!(st.peer_to_client_tcp_packets, 1);

    // The closed client's allocation (and relay socket) went with its connection.
    super::wait_for("the allocation to go", || svc.allocations() == 0);
    let mut c2 = Client::tcp(server);
    c2.allocate(UDP);
    c2.channel_bind(CHANNEL, peer.local_addr().unwrap());
    c2.stream()
        .write_all(&channel_data(CHANNEL, b"again", true))
        .unwrap();
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"again");
    svc.shutdown();
}

#[test]
fn tcp_idle_timeout_and_per_ip_limit() {
    let mut cfg = client::config(1);
    cfg.turn.tcp_idle_timeout_secs = 1;
    cfg.turn.tcp_max_per_ip = 2;
    let svc = start(&cfg);
    let server = svc.local_addrs()[0];
    let conns: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(server).unwrap())
        .collect();
    let st = wait_stats(&svc, |s| s.tcp_rejected_per_ip == 1 && s.tcp_accepted == 2);
    assert_eq!((st.tcp_accepted, st.tcp_rejected_per_ip), (2, 1));
    // Every connection ends: the refused one at once, the silent ones at the idle timeout.
    for mut c in conns {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    }
    let st = wait_stats(&svc, |s| s.tcp_closed_idle == 2);
    assert_eq!(st.tcp_closed_idle, 2);
    // Slots were released: a new connection is accepted and served.
    let mut c = client::tcp(server);
    let req = binding();
    c.write_all(&req).unwrap();
    assert_binding_answer(&client::read_msg(&mut c), &req);
    svc.shutdown();
}

#[test]
fn wildcard_listener_replies_from_the_address_the_client_reached() {
    let peer = client::udp_socket();
    let mut cfg = client::config(1);
    cfg.turn.listen = vec!["0.0.0.0:0".parse().unwrap()];
    let svc = start(&cfg);
    // 127.0.0.2 is local but not the address the kernel would pick to answer 127.0.0.1.
    let server: SocketAddr = SocketAddr::new([127, 0, 0, 2].into(), svc.local_addrs()[0].port());
    let mut c = Client::udp(server);
    let client = c.sock().try_clone().unwrap();
    let mut buf = [0u8; 2048];

    let req = binding();
    client.send_to(&req, server).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, server, "control reply source");
    assert_binding_answer(&buf[..n], &req);

    c.allocate(UDP);
    c.channel_bind(CHANNEL, peer.local_addr().unwrap());
    client
        .send_to(&channel_data(CHANNEL, b"hello", false), server)
        .unwrap();
    let (n, relay) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    peer.send_to(b"back", relay).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, server, "relayed data source");
    assert_eq!(&buf[..n], &channel_data(CHANNEL, b"back", false)[..]);
    svc.shutdown();
}

#[test]
fn bandwidth_cap_drops_datagrams_past_the_budget_each_way() {
    const CAP: u64 = 10_000;
    const N: u64 = 30;
    let (peer, svc, server, c) = udp_setup(|cfg| cfg.turn.max_bytes_per_sec = CAP);
    let client = c.sock();
    let mut buf = [0u8; 2048];

    // Client → peer: a one-second budget (CAP bytes) passes at once, the rest is dropped.
    let start = Instant::now();
    for _ in 0..N {
        client
            .send_to(&channel_data(CHANNEL, &[1; 1000], false), server)
            .unwrap();
    }
    let st = wait_stats(&svc, |s| {
        s.client_to_peer_udp_packets + s.drop_bandwidth == N
    });
    let earned = CAP + (CAP as f64 * start.elapsed().as_secs_f64()) as u64;
    assert_eq!(st.client_to_peer_udp_packets + st.drop_bandwidth, N);
    assert!(st.client_to_peer_udp_packets >= CAP / 1000, "{st:?}");
    assert!(st.client_to_peer_udp_bytes <= earned, "{st:?}");
    assert!(st.drop_bandwidth > 0);
    let (_, relay) = peer.recv_from(&mut buf).unwrap();

    // Peer → client: the other direction has its own budget.
    let start = Instant::now();
    for _ in 0..N {
        peer.send_to(&[2; 1000], relay).unwrap();
    }
    let before = st.drop_bandwidth;
    let st = wait_stats(&svc, |s| {
        s.peer_to_client_udp_packets + (s.drop_bandwidth - before) == N
    });
    let earned = CAP + (CAP as f64 * start.elapsed().as_secs_f64()) as u64;
    assert_eq!(
        st.peer_to_client_udp_packets + st.drop_bandwidth - before,
        N
    );
    assert!(st.peer_to_client_udp_packets >= CAP / 1000, "{st:?}");
    // Each datagram reached the client with its 4-byte ChannelData header.
    assert!(st.peer_to_client_udp_bytes - 4 * st.peer_to_client_udp_packets <= earned);
    assert!(st.drop_bandwidth > before);
    svc.shutdown();
}
