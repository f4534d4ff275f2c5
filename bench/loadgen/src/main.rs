//! tern-loadgen: a TURN load generator for side-by-side benchmarks (Tern vs coturn).
//!
//! Creates N allocations with TURN REST credentials, ChannelBinds each to a UDP echo peer it
//! runs itself on loopback, sends ChannelData (RFC 8656 §12) at a target rate with batched
//! sendmmsg, counts the echoes, and prints one JSON line. Bounded: it stops after
//! `--packets` or `--duration` seconds, whichever comes first, then drains for 2 s.
//!
//! Loads: a target rate (`--rate`), a closed loop (`--inflight K`: K packets in flight per
//! allocation, a new one sent for every echo), or video-like bursts (`--video`: per
//! allocation 20-40 packets of `--size` bytes, 30 bursts/s; the echo makes the other
//! direction). `--bare` skips TURN (plain ChannelData to a forwarder, see `forward`), and
//! `tern-loadgen forward ...` runs the batched bare forwarder itself.

mod control;
mod forward;
mod mmsg;
// Tern's UDP_SEGMENT/UDP_GRO control messages: one copy of the cmsg layout for both.
#[allow(dead_code)]
#[path = "../../../src/net/udp_segment.rs"]
mod udp_segment;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::{Challenge, Session};

const CHANNEL: u16 = 0x4000;
const USAGE: &str = "usage: tern-loadgen --server IP:PORT (--secret S | --secret-file F)
  [--allocations 50] [--rate 20000 (packets/s, 0 = as fast as possible)] [--packets 1000000]
  [--duration 20 (seconds)] [--size 100 (payload bytes, >= 16)] [--batch 32]
  [--user-prefix loadgen] [--peer-ip 127.0.0.1] [--buffers 4194304]
  [--local-ip IP (client sockets; default the loopback of the server's family)]
  [--peer-netns NAME (the echo peer's socket is made in network namespace NAME)]
  [--inflight K (closed loop)] [--video] [--bare --peer-port P] [--distinct-peers]
  [--gso (video bursts and echoes as UDP GSO messages, as a GSO-capable sender would)]
or:    tern-loadgen forward --listen IP:PORT --peer IP:PORT [--threads 2] [--gso 1]
  [--max-secs 3600] [--buffers 4194304]";

struct Args {
    server: SocketAddr,
    secret: String,
    allocations: usize,
    rate: u64,
    packets: u64,
    duration: f64,
    size: usize,
    batch: usize,
    user_prefix: String,
    peer_ip: IpAddr,
    buffers: usize,
    /// Closed loop: packets in flight per allocation (0: rate mode).
    inflight: usize,
    /// Video-like bursts instead of a steady rate.
    video: bool,
    /// No TURN: the server is a bare forwarder; the peer binds `peer_port`.
    bare: bool,
    peer_port: u16,
    /// One echo peer per allocation instead of one shared.
    distinct_peers: bool,
    /// Video bursts and peer echoes leave as UDP GSO messages (one per burst).
    gso: bool,
    local_ip: Option<IpAddr>,
    peer_netns: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut server = None;
    let mut secret = None;
    let mut a = Args {
        server: "127.0.0.1:3478".parse().unwrap(),
        secret: String::new(),
        allocations: 50,
        rate: 20_000,
        packets: 1_000_000,
        duration: 20.0,
        size: 100,
        batch: 32,
        user_prefix: "loadgen".into(),
        peer_ip: "127.0.0.1".parse().unwrap(),
        buffers: 4 << 20,
        inflight: 0,
        video: false,
        bare: false,
        peer_port: 0,
        distinct_peers: false,
        gso: false,
        local_ip: None,
        peer_netns: None,
    };
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        match flag.as_str() {
            "--video" => {
                a.video = true;
                continue;
            }
            "--bare" => {
                a.bare = true;
                continue;
            }
            "--distinct-peers" => {
                a.distinct_peers = true;
                continue;
            }
            "--gso" => {
                a.gso = true;
                continue;
            }
            _ => {}
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--server" => server = Some(v.parse().map_err(|e| bad(&e))?),
            "--secret" => secret = Some(v),
            "--secret-file" => {
                let text = std::fs::read_to_string(&v).map_err(|e| bad(&e))?;
                let line = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .ok_or(format!("{v} holds no secret"))?;
                secret = Some(line.to_string());
            }
            "--allocations" => a.allocations = v.parse().map_err(|e| bad(&e))?,
            "--rate" => a.rate = v.parse().map_err(|e| bad(&e))?,
            "--packets" => a.packets = v.parse().map_err(|e| bad(&e))?,
            "--duration" => a.duration = v.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = v.parse().map_err(|e| bad(&e))?,
            "--batch" => a.batch = v.parse().map_err(|e| bad(&e))?,
            "--user-prefix" => a.user_prefix = v,
            "--peer-ip" => a.peer_ip = v.parse().map_err(|e| bad(&e))?,
            "--buffers" => a.buffers = v.parse().map_err(|e| bad(&e))?,
            "--inflight" => a.inflight = v.parse().map_err(|e| bad(&e))?,
            "--peer-port" => a.peer_port = v.parse().map_err(|e| bad(&e))?,
            "--local-ip" => a.local_ip = Some(v.parse().map_err(|e| bad(&e))?),
            "--peer-netns" => a.peer_netns = Some(v),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    a.server = server.ok_or(format!("--server is required\n{USAGE}"))?;
    a.secret = secret.ok_or(format!("--secret or --secret-file is required\n{USAGE}"))?;
    if a.allocations == 0 || a.size < 16 || a.size > 1400 || a.batch == 0 {
        return Err("need --allocations >= 1, 16 <= --size <= 1400, --batch >= 1".into());
    }
    if !(a.duration > 0.0 && a.duration <= 600.0) {
        return Err("--duration must be in (0, 600] seconds".into());
    }
    a.batch = a.batch.min(mmsg::MAX_BATCH);
    if a.inflight > 0 && a.video {
        return Err("--inflight and --video are separate loads".into());
    }
    Ok(a)
}

fn parse_forward() -> Result<forward::FwdArgs, String> {
    let mut it = std::env::args().skip(2);
    let mut f = forward::FwdArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        peer: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        gso: true,
        max_secs: 3600,
        buffers: 4 << 20,
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--listen" => f.listen = v.parse().map_err(|e| bad(&e))?,
            "--peer" => f.peer = v.parse().map_err(|e| bad(&e))?,
            "--threads" => f.threads = v.parse().map_err(|e| bad(&e))?,
            "--gso" => f.gso = v != "0",
            "--max-secs" => f.max_secs = v.parse().map_err(|e| bad(&e))?,
            "--buffers" => f.buffers = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if f.listen.port() == 0 || f.peer.port() == 0 {
        return Err(format!(
            "forward needs --listen and --peer with ports\n{USAGE}"
        ));
    }
    Ok(f)
}

/// Counters shared by the data-path threads.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    send_eagain: AtomicU64,
    received: AtomicU64,
    bad_packets: AtomicU64,
    rtt_sum_us: AtomicU64,
    rtt_max_us: AtomicU64,
    peer_received: AtomicU64,
    peer_sent: AtomicU64,
    sending_done: AtomicBool,
    receiving_done: AtomicBool,
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("forward") {
        let f = parse_forward().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2);
        });
        if let Err(e) = forward::run(&f) {
            eprintln!("forwarder: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"ok": false, "error": e.to_string()})
            );
            std::process::exit(1);
        }
    }
}

fn run(a: &Args) -> io::Result<serde_json::Value> {
    let counters = Arc::new(Counters::default());

    // The echo peer: every datagram goes back to the relay address it came from.
    let peer_port = if a.bare { a.peer_port } else { 0 };
    let peer = match &a.peer_netns {
        Some(ns) => bind_in_netns(ns, (a.peer_ip, peer_port).into())?,
        None => UdpSocket::bind((a.peer_ip, peer_port))?,
    };
    mmsg::set_buffers(peer.as_raw_fd(), a.buffers);
    peer.set_read_timeout(Some(Duration::from_millis(50)))?;
    // --distinct-peers: one echo socket per allocation (servers that demultiplex a shared
    // relay socket by peer address, like coturn's --multiplex-peer, need distinct peers).
    let mut peers = vec![peer];
    if a.distinct_peers {
        for _ in 1..a.allocations {
            let p = UdpSocket::bind((a.peer_ip, 0))?;
            mmsg::set_buffers(p.as_raw_fd(), a.buffers);
            peers.push(p);
        }
    }
    let peer_addrs = peers
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
    let echo = {
        let c = Arc::clone(&counters);
        let gso = a.gso;
        std::thread::spawn(move || {
            if peers.len() == 1 {
                echo_loop(&peers[0], &c)
            } else {
                echo_many(&peers, &c, gso)
            }
        })
    };

    let setup_start = Instant::now();
    let sessions = if a.bare {
        bare_setup(a, &peer_addrs)
    } else {
        setup(a, &peer_addrs)
    };
    let setup_s = setup_start.elapsed().as_secs_f64();
    let sessions = match sessions {
        Ok(s) => s,
        Err(e) => {
            counters.receiving_done.store(true, Ordering::Relaxed);
            let _ = echo.join();
            return Err(e);
        }
    };

    for s in &sessions {
        s.sock.set_nonblocking(true)?;
    }
    let fds: Vec<_> = sessions.iter().map(|s| s.sock.as_raw_fd()).collect();
    let start = Instant::now();
    let send_s = if a.inflight > 0 {
        let s = closed_loop(a, &fds, start, &counters);
        counters.receiving_done.store(true, Ordering::Release);
        s
    } else {
        let receiver = {
            let c = Arc::clone(&counters);
            let fds = fds.clone();
            let plen = 4 + a.size;
            std::thread::spawn(move || receive_loop(&fds, plen, start, &c))
        };
        let s = if a.video {
            video_loop(a, &fds, start, &counters)
        } else {
            send_loop(a, &fds, start, &counters)
        };
        counters.sending_done.store(true, Ordering::Release);
        let _ = receiver.join();
        s
    };
    let _ = echo.join();

    // Free the allocations so back-to-back runs do not hit quotas.
    let mut release_errors = 0;
    let mut ch = Challenge::default();
    for s in sessions.iter().filter(|_| !a.bare) {
        s.sock.set_nonblocking(false)?;
        if s.release(&mut ch).is_err() {
            release_errors += 1;
        }
    }

    let c = &counters;
    let sent = c.sent.load(Ordering::Relaxed);
    let received = c.received.load(Ordering::Relaxed);
    let peer_received = c.peer_received.load(Ordering::Relaxed);
    let relayed = peer_received + received;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    Ok(serde_json::json!({
        "ok": true,
        "server": a.server.to_string(),
        "allocations": sessions.len(),
        "payload_bytes": a.size,
        "target_pps": a.rate,
        "inflight": a.inflight,
        "video": a.video,
        "setup_s": round(setup_s),
        "duration_s": round(send_s),
        "sent": sent,
        "peer_received": peer_received,
        "peer_sent": c.peer_sent.load(Ordering::Relaxed),
        "received": received,
        "lost": sent.saturating_sub(received),
        "loss_pct": if sent > 0 { round(100.0 * sent.saturating_sub(received) as f64 / sent as f64) } else { 0.0 },
        "relayed_packets": relayed,
        "relayed_pps": round(relayed as f64 / send_s),
        "send_pps": round(sent as f64 / send_s),
        "avg_rtt_us": c.rtt_sum_us.load(Ordering::Relaxed).checked_div(received).unwrap_or(0),
        "max_rtt_us": c.rtt_max_us.load(Ordering::Relaxed),
        "send_eagain": c.send_eagain.load(Ordering::Relaxed),
        "bad_packets": c.bad_packets.load(Ordering::Relaxed),
        "release_errors": release_errors,
        // The load generator's own CPU (all its threads, setup included): near one core
        // per busy thread means the clients, not the server, set the pace.
        "client_cpu_s": round(own_cpu_s()),
    }))
}

/// CPU seconds (user + system) this process has used so far.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Bare sessions: plain sockets connected to the forwarder (no TURN exchange). With one
/// echo peer per session, each session first tells the forwarder its peer (a
/// [`forward::BIND`] datagram, answered by the same datagram: the bare counterpart of a
/// ChannelBind), so the forwarder carries the same load as a TURN server: one relay socket
/// per session, each to its own peer.
fn bare_setup(a: &Args, peers: &[SocketAddr]) -> io::Result<Vec<Session>> {
    (0..a.allocations)
        .map(|i| {
            let sock = UdpSocket::bind((a.peer_ip, 0))?;
            sock.connect(a.server)?;
            mmsg::set_buffers(sock.as_raw_fd(), a.buffers);
            if peers.len() > 1 {
                bare_bind(&sock, peers[i % peers.len()])?;
            }
            Ok(Session {
                sock,
                server: a.server,
                username: String::new(),
                password: String::new(),
            })
        })
        .collect()
}

/// Asks the forwarder to relay this socket's datagrams to `peer`; waits for its answer.
fn bare_bind(sock: &UdpSocket, peer: SocketAddr) -> io::Result<()> {
    let mut msg = forward::BIND.to_vec();
    msg.extend_from_slice(peer.to_string().as_bytes());
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 128];
    for _ in 0..6 {
        sock.send(&msg)?;
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == msg[..] => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("the forwarder did not answer a bind"))
}

/// Stamps `n` packets of `plen` bytes in `buf` with the send time and sequence numbers.
fn stamp(buf: &mut [u8], plen: usize, n: usize, now_ns: u64, seq: &mut u64) {
    for p in buf.chunks_mut(plen).take(n) {
        p[4..12].copy_from_slice(&now_ns.to_le_bytes());
        p[12..20].copy_from_slice(&seq.to_le_bytes());
        *seq += 1;
    }
}

fn channel_frames(a: &Args, count: usize) -> Vec<u8> {
    let plen = 4 + a.size;
    let mut buf = vec![0u8; plen * count];
    for p in buf.chunks_mut(plen) {
        p[..2].copy_from_slice(&CHANNEL.to_be_bytes());
        p[2..4].copy_from_slice(&(a.size as u16).to_be_bytes());
    }
    buf
}

/// Closed loop: `inflight` packets per allocation, one new packet per echo, until the
/// duration or packet budget is spent; then a 2 s drain. One thread sends and receives.
fn closed_loop(a: &Args, fds: &[i32], start: Instant, c: &Counters) -> f64 {
    let plen = 4 + a.size;
    let mut buf = channel_frames(a, mmsg::MAX_BATCH);
    let mut batch = mmsg::RecvBatch::new();
    let limit = Duration::from_secs_f64(a.duration);
    let (mut sent, mut received, mut bad, mut rtt_sum, mut rtt_max, mut seq) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut send = |fd: i32, n: usize, sent: &mut u64, seq: &mut u64| {
        let now_ns = start.elapsed().as_nanos() as u64;
        stamp(&mut buf, plen, n, now_ns, seq);
        match mmsg::send_connected(fd, &mut buf, plen, n) {
            Ok(k) => {
                *sent += k as u64;
                if k < n {
                    c.send_eagain.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                c.send_eagain.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    for &fd in fds {
        send(fd, a.inflight.min(mmsg::MAX_BATCH), &mut sent, &mut seq);
    }
    let mut send_s = None;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let sending = send_s.is_none();
        let mut got = 0usize;
        for &fd in fds {
            while let Ok(n) = batch.recv(fd, false) {
                let now_ns = start.elapsed().as_nanos() as u64;
                let mut good = 0;
                for i in 0..n {
                    let p = batch.packet(i);
                    if p.len() != plen || p[..2] != CHANNEL.to_be_bytes() {
                        bad += 1;
                        continue;
                    }
                    let sent_ns = u64::from_le_bytes(p[4..12].try_into().unwrap());
                    let rtt = now_ns.saturating_sub(sent_ns) / 1000;
                    rtt_sum += rtt;
                    rtt_max = rtt_max.max(rtt);
                    good += 1;
                }
                received += good as u64;
                got += n;
                if sending && sent < a.packets {
                    send(fd, good, &mut sent, &mut seq);
                }
                if n < mmsg::MAX_BATCH {
                    break;
                }
            }
        }
        if sending && (start.elapsed() >= limit || sent >= a.packets) {
            send_s = Some(start.elapsed().as_secs_f64());
            c.sent.store(sent, Ordering::Relaxed);
        }
        if got > 0 {
            continue;
        }
        if let Some(_s) = send_s {
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
            if received >= sent || Instant::now() >= deadline {
                break;
            }
        }
        mmsg::poll_readable(fds, 5);
    }
    c.sent.store(sent, Ordering::Relaxed);
    c.received.store(received, Ordering::Relaxed);
    c.bad_packets.store(bad, Ordering::Relaxed);
    c.rtt_sum_us.store(rtt_sum, Ordering::Relaxed);
    c.rtt_max_us.store(rtt_max, Ordering::Relaxed);
    send_s.unwrap_or_else(|| start.elapsed().as_secs_f64())
}

/// Video-like load: per allocation a burst of 20-40 packets every 1/30 s, the allocations'
/// bursts spread over the frame interval.
fn video_loop(a: &Args, fds: &[i32], start: Instant, c: &Counters) -> f64 {
    const FRAME: Duration = Duration::from_nanos(1_000_000_000 / 30);
    let plen = 4 + a.size;
    let mut buf = channel_frames(a, 40);
    let limit = Duration::from_secs_f64(a.duration);
    let mut next: Vec<Duration> = (0..fds.len())
        .map(|i| FRAME * i as u32 / fds.len() as u32)
        .collect();
    let (mut sent, mut seq) = (0u64, 0u64);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        let elapsed = start.elapsed();
        if sent >= a.packets || elapsed >= limit {
            break;
        }
        let mut earliest = elapsed + FRAME;
        for (i, &fd) in fds.iter().enumerate() {
            if next[i] > elapsed {
                earliest = earliest.min(next[i]);
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let n = 20 + (rng % 21) as usize;
            stamp(
                &mut buf,
                plen,
                n,
                start.elapsed().as_nanos() as u64,
                &mut seq,
            );
            let r = if a.gso {
                mmsg::send_connected_gso(fd, &mut buf, plen, n)
            } else {
                mmsg::send_connected(fd, &mut buf, plen, n)
            };
            match r {
                Ok(k) => {
                    sent += k as u64;
                    if k < n {
                        c.send_eagain.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    c.send_eagain.fetch_add(1, Ordering::Relaxed);
                }
            }
            // A late sender skips frames rather than bursting to catch up.
            next[i] += FRAME;
            if next[i] < elapsed {
                next[i] = elapsed + FRAME;
            }
            earliest = earliest.min(next[i]);
        }
        c.sent.store(sent, Ordering::Relaxed);
        let now = start.elapsed();
        if earliest > now {
            std::thread::sleep((earliest - now).min(Duration::from_millis(2)));
        }
    }
    start.elapsed().as_secs_f64()
}

/// A UDP socket bound to `addr` inside network namespace `ns` (made on a short-lived thread
/// that enters it; the socket stays in that namespace).
fn bind_in_netns(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path)?;
        // SAFETY: setns(2) on this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        UdpSocket::bind(addr)
    })
    .join()
    .map_err(|_| io::Error::other("setns thread panicked"))?
}

/// Allocates and channel-binds every session, one after the other.
fn setup(a: &Args, peers: &[SocketAddr]) -> io::Result<Vec<Session>> {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(io::Error::other)?
        .as_secs()
        + 3600;
    let local: IpAddr = if let Some(ip) = a.local_ip {
        ip
    } else if a.server.is_ipv4() {
        "127.0.0.1".parse().unwrap()
    } else {
        "::1".parse().unwrap()
    };
    let mut ch = Challenge::default();
    let mut out = Vec::with_capacity(a.allocations);
    for i in 0..a.allocations {
        let username = format!("{expiry}:{}{i}", a.user_prefix);
        let password = control::rest_password(&a.secret, &username);
        // 437: the kernel reused a local port whose old allocation (another client's, e.g. a
        // turnutils_uclient run that never deleted its own) is still alive: take a new port.
        let mut attempt = 0;
        let s = loop {
            let sock = UdpSocket::bind((local, 0))?;
            sock.connect(a.server)?;
            mmsg::set_buffers(sock.as_raw_fd(), a.buffers);
            let s = Session {
                sock,
                server: a.server,
                username: username.clone(),
                password: password.clone(),
            };
            match s.allocate(&mut ch) {
                Ok(_) => break s,
                Err(e) if control::refused_code(&e) == Some(437) && attempt < 10 => attempt += 1,
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("allocation {i}: {e}")));
                }
            }
        };
        s.channel_bind(&mut ch, CHANNEL, peers[i % peers.len()])
            .map_err(|e| io::Error::new(e.kind(), format!("channel bind {i}: {e}")))?;
        out.push(s);
    }
    Ok(out)
}

/// Sends ChannelData at the target rate, round-robin over the sessions, in batches.
/// Returns the seconds it spent sending.
fn send_loop(a: &Args, fds: &[i32], start: Instant, c: &Counters) -> f64 {
    let plen = 4 + a.size;
    let mut buf = vec![0u8; plen * a.batch];
    for p in buf.chunks_mut(plen) {
        p[..2].copy_from_slice(&CHANNEL.to_be_bytes());
        p[2..4].copy_from_slice(&(a.size as u16).to_be_bytes());
    }
    let limit = Duration::from_secs_f64(a.duration);
    // Sleep about one batch's worth of time when ahead of schedule.
    let nap = if a.rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64((a.batch as f64 / a.rate as f64).clamp(50e-6, 2e-3))
    };
    let mut sent = 0u64;
    let mut seq = 0u64;
    let mut next = 0usize;
    loop {
        let elapsed = start.elapsed();
        if sent >= a.packets || elapsed >= limit {
            break;
        }
        let due = if a.rate == 0 {
            a.packets
        } else {
            ((a.rate as f64 * elapsed.as_secs_f64()) as u64).min(a.packets)
        };
        if sent >= due {
            std::thread::sleep(nap);
            continue;
        }
        let n = ((due - sent) as usize).min(a.batch);
        let now_ns = start.elapsed().as_nanos() as u64;
        for p in buf.chunks_mut(plen).take(n) {
            p[4..12].copy_from_slice(&now_ns.to_le_bytes());
            p[12..20].copy_from_slice(&seq.to_le_bytes());
            seq += 1;
        }
        match mmsg::send_connected(fds[next], &mut buf, plen, n) {
            Ok(k) => {
                sent += k as u64;
                if k < n {
                    c.send_eagain.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                c.send_eagain.fetch_add(1, Ordering::Relaxed);
            }
        }
        c.sent.store(sent, Ordering::Relaxed);
        next = (next + 1) % fds.len();
    }
    start.elapsed().as_secs_f64()
}

/// Counts echoed ChannelData on every client socket until all sent packets came back or
/// 2 s after sending stopped.
fn receive_loop(fds: &[i32], plen: usize, start: Instant, c: &Counters) {
    let mut batch = mmsg::RecvBatch::new();
    let mut drain_deadline: Option<Instant> = None;
    let (mut received, mut bad, mut rtt_sum, mut rtt_max) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let mut got = 0usize;
        for &fd in fds {
            // Err is WouldBlock (or a queued ICMP error): go on with the next socket.
            while let Ok(n) = batch.recv(fd, false) {
                let now_ns = start.elapsed().as_nanos() as u64;
                for i in 0..n {
                    let p = batch.packet(i);
                    if p.len() != plen || p[..2] != CHANNEL.to_be_bytes() {
                        bad += 1;
                        continue;
                    }
                    let sent_ns = u64::from_le_bytes(p[4..12].try_into().unwrap());
                    let rtt = now_ns.saturating_sub(sent_ns) / 1000;
                    rtt_sum += rtt;
                    rtt_max = rtt_max.max(rtt);
                    received += 1;
                }
                got += n;
                if n < mmsg::MAX_BATCH {
                    break;
                }
            }
        }
        c.received.store(received, Ordering::Relaxed);
        if got > 0 {
            continue;
        }
        if c.sending_done.load(Ordering::Acquire) {
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
            if received >= c.sent.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
        }
        mmsg::poll_readable(fds, 5);
    }
    c.bad_packets.store(bad, Ordering::Relaxed);
    c.rtt_sum_us.store(rtt_sum, Ordering::Relaxed);
    c.rtt_max_us.store(rtt_max, Ordering::Relaxed);
    c.receiving_done.store(true, Ordering::Release);
}

/// Several echo peers on one thread: each readable socket's batches back out.
fn echo_many(socks: &[UdpSocket], c: &Counters, gso: bool) {
    let mut batch = mmsg::RecvBatch::new();
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    while !c.receiving_done.load(Ordering::Acquire) {
        let mut got = 0;
        for &fd in &fds {
            while let Ok(n) = batch.recv(fd, false) {
                got += n;
                c.peer_received.fetch_add(n as u64, Ordering::Relaxed);
                let echoed = if gso {
                    batch.echo_gso(fd, n)
                } else {
                    batch.echo(fd, n)
                };
                if let Ok(k) = echoed {
                    c.peer_sent.fetch_add(k as u64, Ordering::Relaxed);
                }
                if n < mmsg::MAX_BATCH {
                    break;
                }
            }
        }
        if got == 0 {
            mmsg::poll_readable(&fds, 5);
        }
    }
}

/// The echo peer's loop: batches in, the same batches back out.
fn echo_loop(sock: &UdpSocket, c: &Counters) {
    let mut batch = mmsg::RecvBatch::new();
    let fd = sock.as_raw_fd();
    while !c.receiving_done.load(Ordering::Acquire) {
        let n = match batch.recv(fd, true) {
            Ok(n) => n,
            Err(_) => continue, // SO_RCVTIMEO: check the stop flag
        };
        c.peer_received.fetch_add(n as u64, Ordering::Relaxed);
        if let Ok(k) = batch.echo(fd, n) {
            c.peer_sent.fetch_add(k as u64, Ordering::Relaxed);
        }
    }
}
