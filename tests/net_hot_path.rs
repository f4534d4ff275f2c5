//! The relay data path of the IO workers makes no heap allocation per packet (DESIGN.md
//! principle 2): ChannelData client→peer and peer→client over UDP and TCP, and over UDP
//! with a per-user cap (`turn.user_max_bytes_per_sec`, shared atomics), counted with a
//! global counting allocator in this test binary while the real workers relay. Bursts of
//! same-size datagrams take the UDP GSO send path (`src/net/gso.rs`: one message per run to
//! one destination) both ways, and are counted the same way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::config::TurnConfig;
use tern::net::{Shard, TurnService, OUT_LEN};
use tern::stun::ChannelNumber;
use tern::turn::{FiveTuple, Now, Output, PeerRoute, RelayAddr, RelayId, RelayIo};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CHANNEL: u16 = 0x4000;

/// A shard with one allocation: the first STUN message opens a relay for its sender, whose
/// channel 0x4000 is bound to `peer`. Lookups are plain comparisons (no allocation).
struct OneAllocation {
    peer: SocketAddr,
    alloc: Option<(RelayId, FiveTuple)>,
    /// A per-user cap the relay shares, as the TURN core hands it at Allocate.
    cap: Option<Arc<tern::usage::UserCap>>,
    out: Option<Output>,
}

impl Shard for OneAllocation {
    fn handle_stun(
        &mut self,
        _now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    ) {
        if self.alloc.is_none() {
            let id = io.open_relay("127.0.0.1:0".parse().unwrap()).unwrap();
            if let Some(c) = &self.cap {
                io.set_user_cap(id, Arc::clone(c));
            }
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
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn client_closed(&mut self, _client: &FiveTuple, _now: Now, _io: &mut impl RelayIo) {}
}

fn service(peer: SocketAddr, cap: Option<Arc<tern::usage::UserCap>>) -> TurnService {
    let t = TurnConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers: 1,
        socket_buffer_bytes: 1 << 20,
        ..TurnConfig::default()
    };
    let ip = "127.0.0.1".parse().unwrap();
    TurnService::start_with(
        &t,
        vec![RelayAddr {
            local: ip,
            advertised: ip,
        }],
        move || OneAllocation {
            peer,
            alloc: None,
            cap: cap.clone(),
            out: None,
        },
    )
    .unwrap()
}

fn stun_message() -> [u8; 20] {
    let mut m = [0u8; 20];
    m[1] = 0x03;
    m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    m[8..].copy_from_slice(&[7; 12]);
    m
}

const PAYLOAD: usize = 160;

fn channel_data() -> [u8; 4 + PAYLOAD] {
    let mut m = [0x5au8; 4 + PAYLOAD];
    m[..2].copy_from_slice(&CHANNEL.to_be_bytes());
    m[2..4].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    m
}

/// `n` round trips client → relay → peer → relay → client; returns the relay address.
/// Allocation-free itself: fixed buffers, std sockets.
fn udp_round_trips(
    client: &UdpSocket,
    server: SocketAddr,
    peer: &UdpSocket,
    n: usize,
    buf: &mut [u8; 2048],
) -> SocketAddr {
    let cd = channel_data();
    let mut relay = server;
    for _ in 0..n {
        client.send_to(&cd, server).unwrap();
        let (len, from) = peer.recv_from(buf).unwrap();
        assert_eq!(len, PAYLOAD);
        relay = from;
        peer.send_to(&buf[..len], from).unwrap();
        let (len, _) = client.recv_from(buf).unwrap();
        assert_eq!(len, 4 + PAYLOAD);
    }
    relay
}

/// One test, so nothing else in this binary allocates while a window is measured.
#[test]
fn relay_paths_do_not_allocate() {
    udp_relay_path_does_not_allocate(None);
    // A cap far above what the test sends: every packet passes through the shared cells.
    let caps = tern::usage::UserCaps::default();
    caps.set_rate(1 << 30);
    let cap = caps.get("alice").expect("a cap");
    udp_relay_path_does_not_allocate(Some(Arc::clone(&cap)));
    udp_burst_relay_path_does_not_allocate();
    tcp_relay_path_does_not_allocate();
}

/// A worker whose one allocation relays to a fresh peer socket, and a client whose first
/// message (answered) made that allocation: `(service, server address, client, peer)`.
fn udp_setup(
    cap: Option<Arc<tern::usage::UserCap>>,
) -> (TurnService, SocketAddr, UdpSocket, UdpSocket) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let svc = service(peer.local_addr().unwrap(), cap);
    let server = svc.local_addrs()[0];
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 2048];
    client.send_to(&stun_message(), server).unwrap();
    client.recv_from(&mut buf).unwrap();
    (svc, server, client, peer)
}

fn udp_relay_path_does_not_allocate(cap: Option<Arc<tern::usage::UserCap>>) {
    let capped = cap.is_some();
    let (svc, server, client, peer) = udp_setup(cap);
    let mut buf = [0u8; 2048];
    // Warm up (first-use growth of the worker's event and batch structures).
    udp_round_trips(&client, server, &peer, 200, &mut buf);

    let before = ALLOCATIONS.load(Ordering::SeqCst);
    udp_round_trips(&client, server, &peer, 2000, &mut buf);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(
        allocations, 0,
        "allocations while relaying 4000 UDP packets (user cap: {capped})"
    );
    svc.shutdown();
}

/// `n` bursts of BURST ChannelData sent back to back (the worker reads them in one batch and
/// sends the run to the peer as GSO messages), echoed by the peer as a burst (a run to the
/// client). Every datagram must arrive whole, in order per direction.
fn udp_bursts(
    client: &UdpSocket,
    server: SocketAddr,
    peer: &UdpSocket,
    n: usize,
    buf: &mut [u8; 2048],
) {
    const BURST: usize = 24;
    let mut cd = channel_data();
    let mut relay = server;
    for _ in 0..n {
        for i in 0..BURST {
            cd[4] = i as u8;
            client.send_to(&cd, server).unwrap();
        }
        for i in 0..BURST {
            let (len, from) = peer.recv_from(buf).unwrap();
            assert_eq!(
                (len, buf[0]),
                (PAYLOAD, i as u8),
                "peer got datagram {i} whole"
            );
            relay = from;
        }
        for i in 0..BURST {
            cd[4] = i as u8;
            peer.send_to(&cd[4..], relay).unwrap();
        }
        for i in 0..BURST {
            let (len, _) = client.recv_from(buf).unwrap();
            assert_eq!(
                (len, buf[4]),
                (4 + PAYLOAD, i as u8),
                "client got frame {i} whole"
            );
            assert_eq!(buf[..2], CHANNEL.to_be_bytes());
        }
    }
}

fn udp_burst_relay_path_does_not_allocate() {
    let (svc, server, client, peer) = udp_setup(None);
    let mut buf = [0u8; 2048];
    udp_bursts(&client, server, &peer, 20, &mut buf);

    let before = ALLOCATIONS.load(Ordering::SeqCst);
    udp_bursts(&client, server, &peer, 100, &mut buf);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(
        allocations, 0,
        "allocations while relaying 4800 UDP packets in bursts"
    );
    svc.shutdown();
}

fn tcp_relay_path_does_not_allocate() {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let svc = service(peer.local_addr().unwrap(), None);
    let server = svc.local_addrs()[0];
    let mut c = TcpStream::connect(server).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = [0u8; 2048];
    c.write_all(&stun_message()).unwrap();
    c.read_exact(&mut buf[..20]).unwrap();
    let cd = channel_data();
    let mut round_trips = |n: usize, buf: &mut [u8; 2048]| {
        for _ in 0..n {
            c.write_all(&cd).unwrap();
            let (len, from) = peer.recv_from(buf).unwrap();
            assert_eq!(len, PAYLOAD);
            peer.send_to(&buf[..len], from).unwrap();
            // 160 bytes need no padding: the frame is exactly header + payload.
            c.read_exact(&mut buf[..4 + PAYLOAD]).unwrap();
            assert_eq!(buf[..2], CHANNEL.to_be_bytes());
        }
    };
    round_trips(200, &mut buf);

    let before = ALLOCATIONS.load(Ordering::SeqCst);
    round_trips(2000, &mut buf);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(
        allocations, 0,
        "allocations while relaying 4000 TCP-framed packets"
    );
    svc.shutdown();
}
