//! The event loop driven by a fake shard: control replies, ChannelData both ways over UDP
//! and TCP, TCP framing, garbage, idle timeout and the per-IP limit.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::*;
use crate::stun::ChannelNumber;
use crate::turn::{FiveTuple, Now, Output, PeerRoute, RelayId, RelayIo};

const CHANNEL: u16 = 0x4000;

/// Opens a relay for the first client that sends a STUN message of type 0x0003, binds
/// channel 0x4000 of that client to `peer`, and echoes every STUN message back.
struct Fake {
    peer: SocketAddr,
    alloc: Option<(RelayId, FiveTuple)>,
    out: Option<Output>,
}

impl Shard for Fake {
    fn handle_stun(
        &mut self,
        _now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    ) {
        if msg[..2] == [0, 3] && self.alloc.is_none() {
            let id = io.open_relay("127.0.0.1:0".parse().unwrap()).unwrap();
            self.alloc = Some((id, from));
        }
        out[..msg.len()].copy_from_slice(msg);
        self.out = Some(Output::Reply { len: msg.len() });
    }
    fn poll_output(&mut self) -> Option<Output> {
        self.out.take()
    }
    fn channel_to_peer(
        &mut self,
        from: &FiveTuple,
        ch: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)> {
        match self.alloc {
            Some((id, t)) if t == *from && ch.get() == CHANNEL => Some((id, self.peer)),
            _ => None,
        }
    }
    fn peer_to_client(&mut self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute> {
        match self.alloc {
            Some((id, t)) if id == relay && peer == self.peer => Some(PeerRoute {
                client: t,
                channel: ChannelNumber::new(CHANNEL),
            }),
            _ => None,
        }
    }
    fn handle_timeout(&mut self, _now: Now, _io: &mut impl RelayIo) {}
    fn poll_timeout(&self) -> Option<std::time::Instant> {
        None
    }
    fn client_closed(&mut self, client: &FiveTuple, _now: Now, _io: &mut impl RelayIo) {
        if let Some((id, t)) = self.alloc {
            if t == *client {
                self.out = Some(Output::CloseRelay(id));
                self.alloc = None;
            }
        }
    }
}

fn service(peer: SocketAddr, tweak: impl FnOnce(&mut TurnConfig)) -> TurnService {
    let mut t = TurnConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers: 1,
        socket_buffer_bytes: 1 << 16,
        ..TurnConfig::default()
    };
    tweak(&mut t);
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    TurnService::start_with(
        &t,
        vec![RelayAddr {
            local: ip,
            advertised: ip,
        }],
        move || Fake {
            peer,
            alloc: None,
            out: None,
        },
    )
    .unwrap()
}

/// A STUN-shaped message of `ty` with an empty body.
fn stun(ty: u16) -> Vec<u8> {
    let mut m = vec![0u8; 20];
    m[..2].copy_from_slice(&ty.to_be_bytes());
    m[4..8].copy_from_slice(&0x2112A442u32.to_be_bytes());
    m[8..].copy_from_slice(&[9; 12]);
    m
}

fn channel_data(ch: u16, payload: &[u8], pad: bool) -> Vec<u8> {
    let mut m = ch.to_be_bytes().to_vec();
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    while pad && m.len() % 4 != 0 {
        m.push(0);
    }
    m
}

fn wait_stats(s: &TurnService, ok: impl Fn(&NetStats) -> bool) -> NetStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = s.stats();
        if ok(&st) || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP peer, the service (its fake shard relays to that peer), its listener address and
/// a UDP client; both sockets time out after 10 s.
fn udp_setup(
    tweak: impl FnOnce(&mut TurnConfig),
) -> (UdpSocket, TurnService, SocketAddr, UdpSocket) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let svc = service(peer.local_addr().unwrap(), tweak);
    let server = svc.local_addrs()[0];
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (peer, svc, server, client)
}

#[test]
fn udp_control_and_channel_data_both_ways() {
    let (peer, svc, server, client) = udp_setup(|_| {});
    let mut buf = [0u8; 2048];

    client.send_to(&stun(3), server).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&stun(3)[..], server));

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
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
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
    client.send_to(&stun(1), server).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &stun(1)[..]);
    svc.shutdown();
}

#[test]
fn tcp_framing_padding_and_garbage_close() {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let svc = service(peer.local_addr().unwrap(), |_| {});
    let server = svc.local_addrs()[0];
    let mut c = TcpStream::connect(server).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // An Allocate-like message and a padded ChannelData frame, written byte by byte.
    let mut stream = stun(3);
    stream.extend_from_slice(&channel_data(CHANNEL, b"hello", true));
    for b in &stream {
        c.write_all(std::slice::from_ref(b)).unwrap();
    }
    let mut echoed = [0u8; 20];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed[..], &stun(3)[..]);
    let mut buf = [0u8; 2048];
    let (n, relay) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");

    peer.send_to(b"world!", relay).unwrap();
    let mut framed = [0u8; 12];
    c.read_exact(&mut framed).unwrap();
    assert_eq!(&framed[..], &channel_data(CHANNEL, b"world!", true)[..]);

    c.write_all(&[0xff; 8]).unwrap();
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "garbage closes the connection");
    let st = wait_stats(&svc, |s| s.tcp_closed_garbage == 1);
    assert_eq!(st.tcp_closed_garbage, 1);
    assert_eq!(st.client_to_peer_tcp_packets, 1);
    assert_eq!(st.peer_to_client_tcp_packets, 1);

    // The closed client's relay is gone: a new client can allocate (the fake holds one).
    let mut c2 = TcpStream::connect(server).unwrap();
    c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c2.write_all(&stun(3)).unwrap();
    c2.write_all(&channel_data(CHANNEL, b"again", true))
        .unwrap();
    c2.read_exact(&mut echoed).unwrap();
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"again");
    svc.shutdown();
}

#[test]
fn tcp_idle_timeout_and_per_ip_limit() {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let svc = service(peer.local_addr().unwrap(), |t| {
        t.tcp_idle_timeout_secs = 1;
        t.tcp_max_per_ip = 2;
    });
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
    let mut c = TcpStream::connect(server).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&stun(1)).unwrap();
    let mut echoed = [0u8; 20];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed[..], &stun(1)[..]);
    svc.shutdown();
}

#[test]
fn wildcard_listener_replies_from_the_address_the_client_reached() {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let svc = service(peer.local_addr().unwrap(), |t| {
        t.listen = vec!["0.0.0.0:0".parse().unwrap()];
    });
    // 127.0.0.2 is local but not the address the kernel would pick to answer 127.0.0.1.
    let server: SocketAddr = SocketAddr::new([127, 0, 0, 2].into(), svc.local_addrs()[0].port());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 2048];

    client.send_to(&stun(3), server).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&stun(3)[..], server),
        "control reply source"
    );

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
    let (peer, svc, server, client) = udp_setup(|t| t.max_bytes_per_sec = CAP);
    let mut buf = [0u8; 2048];
    client.send_to(&stun(3), server).unwrap();
    client.recv_from(&mut buf).unwrap();

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
