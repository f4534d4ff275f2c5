//! The relay data path of the IO workers makes no heap allocation per packet (DESIGN.md
//! principle 2): ChannelData client→peer and peer→client over UDP and TCP, and over UDP
//! with a per-user cap (`turn.user_max_bytes_per_sec`, shared atomics), counted with a
//! global counting allocator in this test binary while the real workers and TURN core relay. Bursts of
//! same-size datagrams take the UDP GSO send path (`src/net/gso.rs`: one message per run to
//! one destination) both ways, and are counted the same way. Bursts sent as one UDP GSO
//! message reach the worker's GRO-enabled sockets as one buffer (`src/net/mmsg.rs` splits
//! it: in place on the listener, copied out with headroom on the relay socket), counted too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tern::net::{udp_segment, NetStats, TurnService};

// The worker tests' TURN client, written against the crate's public paths; these aliases
// give it the same names here.
mod config {
    pub use tern::config::*;
}
mod stun {
    pub use tern::stun::*;
}
mod turn {
    pub use tern::turn::*;
}
#[allow(dead_code)]
#[path = "../src/net/worker/tests/client.rs"]
mod client;

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

/// One worker of the real TURN core on 127.0.0.1 relaying to loopback peers; with a
/// per-user cap (`turn.user_max_bytes_per_sec`, shared atomics, which needs usage
/// accounting on) when `cap` is given.
fn service(cap: Option<u64>) -> TurnService {
    let mut cfg = client::config(1);
    cfg.turn.socket_buffer_bytes = 1 << 20;
    if let Some(rate) = cap {
        cfg.turn.user_max_bytes_per_sec = rate;
    }
    let svc = TurnService::start(&cfg).unwrap();
    if cap.is_some() {
        svc.set_usage(Arc::new(tern::usage::Ledger::new(false)));
    }
    svc
}

const PAYLOAD: usize = 160;

fn channel_data() -> [u8; 4 + PAYLOAD] {
    let mut m = [0x5au8; 4 + PAYLOAD];
    m[..2].copy_from_slice(&CHANNEL.to_be_bytes());
    m[2..4].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    m
}

/// Heap allocations made (by any thread) while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

/// A load on one allocation: `(client, server address, peer, rounds, buffer)`.
type UdpLoad = fn(&UdpSocket, SocketAddr, &UdpSocket, usize, &mut [u8; 2048]);

/// `n` round trips client → relay → peer → relay → client. Allocation-free itself: fixed
/// buffers, std sockets.
fn udp_round_trips(
    client: &UdpSocket,
    server: SocketAddr,
    peer: &UdpSocket,
    n: usize,
    buf: &mut [u8; 2048],
) {
    let cd = channel_data();
    for _ in 0..n {
        client.send_to(&cd, server).unwrap();
        let (len, from) = peer.recv_from(buf).unwrap();
        assert_eq!(len, PAYLOAD);
        peer.send_to(&buf[..len], from).unwrap();
        let (len, _) = client.recv_from(buf).unwrap();
        assert_eq!(len, 4 + PAYLOAD);
    }
}

/// One test, so nothing else in this binary allocates while a window is measured.
#[test]
fn relay_paths_do_not_allocate() {
    udp_load_does_not_allocate(None, "4000 UDP packets", udp_round_trips, 2000);
    // A cap far above what the test sends: every packet passes through the shared cells.
    udp_load_does_not_allocate(
        Some(1 << 30),
        "4000 UDP packets under a user cap",
        udp_round_trips,
        2000,
    );
    udp_load_does_not_allocate(None, "4800 UDP packets in bursts", udp_bursts, 100);
    let st =
        udp_load_does_not_allocate(None, "4800 UDP packets as GRO buffers", udp_gro_bursts, 100);
    // Both directions arrive as GRO buffers (one per burst unless the kernel cut one), in
    // the warm-up's 20 rounds and the measured 100, and every datagram found room.
    assert!(
        st.gro_buffers >= 120,
        "GRO buffers split: {}",
        st.gro_buffers
    );
    assert_eq!((st.drop_gro_overflow, st.drop_truncated), (0, 0));
    tcp_relay_path_does_not_allocate();
}

/// A worker with one allocation whose channel [`CHANNEL`] is bound to a fresh peer socket,
/// and the allocation's client: `(service, server address, client, peer)`.
fn udp_setup(cap: Option<u64>) -> (TurnService, SocketAddr, UdpSocket, UdpSocket) {
    let peer = client::udp_socket();
    let svc = service(cap);
    let server = svc.local_addrs()[0];
    let mut c = client::Client::udp(server);
    c.allocate(client::UDP);
    c.channel_bind(CHANNEL, peer.local_addr().unwrap());
    let client = c.sock().try_clone().unwrap();
    (svc, server, client, peer)
}

/// Runs `load` for `rounds / 5` rounds to warm up (first-use growth of the worker's event
/// and batch structures), then for `rounds` with the allocations counted: there must be
/// none. Returns the worker's data-path counters once it stopped.
fn udp_load_does_not_allocate(
    cap: Option<u64>,
    what: &str,
    load: UdpLoad,
    rounds: usize,
) -> NetStats {
    let (svc, server, client, peer) = udp_setup(cap);
    let mut buf = [0u8; 2048];
    load(&client, server, &peer, rounds / 5, &mut buf);
    let allocations = allocations_during(|| load(&client, server, &peer, rounds, &mut buf));
    assert_eq!(allocations, 0, "allocations while relaying {what}");
    // The workers publish their counters when they stop.
    let stats = svc.stats_source();
    svc.shutdown();
    stats.net()
}

/// Receives `n` datagrams at the peer, datagram `i` of `PAYLOAD` bytes starting with `i`;
/// returns the relayed address they came from.
fn burst_at_peer(peer: &UdpSocket, n: usize, buf: &mut [u8; 2048]) -> SocketAddr {
    let mut relay = None;
    for i in 0..n {
        let (len, from) = peer.recv_from(buf).unwrap();
        assert_eq!(
            (len, buf[0]),
            (PAYLOAD, i as u8),
            "peer got datagram {i} whole"
        );
        relay = Some(from);
    }
    relay.unwrap()
}

/// Receives `n` ChannelData frames on [`CHANNEL`] at the client, frame `i` carrying `i`
/// first.
fn burst_at_client(client: &UdpSocket, n: usize, buf: &mut [u8; 2048]) {
    for i in 0..n {
        let (len, _) = client.recv_from(buf).unwrap();
        assert_eq!(
            (len, buf[4]),
            (4 + PAYLOAD, i as u8),
            "client got frame {i} whole"
        );
        assert_eq!(buf[..2], CHANNEL.to_be_bytes());
    }
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
    for _ in 0..n {
        for i in 0..BURST {
            cd[4] = i as u8;
            client.send_to(&cd, server).unwrap();
        }
        let relay = burst_at_peer(peer, BURST, buf);
        for i in 0..BURST {
            cd[4] = i as u8;
            peer.send_to(&cd[4..], relay).unwrap();
        }
        burst_at_client(client, BURST, buf);
    }
}

/// Sends `count` datagrams of `seg` bytes (back to back in `data`) to `to` as one UDP GSO
/// message (`UDP_SEGMENT`), so a GRO receiver gets them as one buffer. Allocation-free.
fn send_gso(sock: &UdpSocket, data: &[u8], seg: usize, to: SocketAddr) {
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = to.port().to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut ctrl = udp_segment::SegmentCtrl::new(seg as u16);
    // SAFETY: a msghdr whose pointers all point at locals that outlive the call.
    let r = unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        ctrl.attach(&mut h);
        libc::sendmsg(sock.as_raw_fd(), &h, 0)
    };
    assert_eq!(r, data.len() as isize, "GSO send");
}

/// `n` bursts of GRO_BURST ChannelData frames sent as one GSO message by the client, and
/// echoed as one GSO message of payloads by the peer: the worker receives each burst as one
/// GRO buffer. Every datagram must arrive whole, in order per direction.
fn udp_gro_bursts(
    client: &UdpSocket,
    server: SocketAddr,
    peer: &UdpSocket,
    n: usize,
    buf: &mut [u8; 2048],
) {
    const GRO_BURST: usize = 24;
    let mut frames = [0u8; GRO_BURST * (4 + PAYLOAD)];
    let mut payloads = [0u8; GRO_BURST * PAYLOAD];
    for (i, f) in frames.chunks_mut(4 + PAYLOAD).enumerate() {
        f.copy_from_slice(&channel_data());
        f[4] = i as u8;
    }
    for (i, p) in payloads.chunks_mut(PAYLOAD).enumerate() {
        p.fill(0x5a);
        p[0] = i as u8;
    }
    for _ in 0..n {
        send_gso(client, &frames, 4 + PAYLOAD, server);
        let relay = burst_at_peer(peer, GRO_BURST, buf);
        send_gso(peer, &payloads, PAYLOAD, relay);
        burst_at_client(client, GRO_BURST, buf);
    }
}

fn tcp_relay_path_does_not_allocate() {
    let peer = client::udp_socket();
    let svc = service(None);
    let server = svc.local_addrs()[0];
    let mut ctl = client::Client::tcp(server);
    ctl.allocate(client::UDP);
    ctl.channel_bind(CHANNEL, peer.local_addr().unwrap());
    let mut c = ctl.stream().try_clone().unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = [0u8; 2048];
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
    let allocations = allocations_during(|| round_trips(2000, &mut buf));
    assert_eq!(
        allocations, 0,
        "allocations while relaying 4000 TCP-framed packets"
    );
    svc.shutdown();
}
