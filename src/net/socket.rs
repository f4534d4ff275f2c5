//! Socket creation: listeners shared by workers through SO_REUSEPORT, relay sockets bound to
//! an exact address, and large kernel buffers (turn.socket_buffer_bytes).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Pending TCP connections per listener (the kernel caps it at somaxconn).
const TCP_BACKLOG: i32 = 1024;

static BUFFER_SIZE_LOGGED: AtomicBool = AtomicBool::new(false);

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        // `[::]` must coexist with `0.0.0.0` on the same port.
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    Ok(s)
}

/// Sets SO_RCVBUF/SO_SNDBUF to `bytes`: the FORCE variants first (root may exceed
/// net.core.rmem_max), then the plain ones. Logs the effective size once per process.
pub fn set_buffers(s: &Socket, bytes: usize) {
    let fd = s.as_raw_fd();
    let val = bytes.min(i32::MAX as usize) as libc::c_int;
    let force = |opt| {
        // SAFETY: fd is a live socket; val is a c_int as the option expects.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !force(libc::SO_RCVBUFFORCE) {
        let _ = s.set_recv_buffer_size(bytes);
    }
    if !force(libc::SO_SNDBUFFORCE) {
        let _ = s.set_send_buffer_size(bytes);
    }
    if !BUFFER_SIZE_LOGGED.swap(true, Ordering::Relaxed) {
        // Linux reports twice the requested size (it counts its bookkeeping).
        let rcv = s.recv_buffer_size().unwrap_or(0);
        let snd = s.send_buffer_size().unwrap_or(0);
        if rcv < bytes || snd < bytes {
            tracing::warn!(
                requested = bytes,
                rcvbuf = rcv,
                sndbuf = snd,
                "socket buffers smaller than turn.socket_buffer_bytes (raise net.core.rmem_max/wmem_max or run as root)"
            );
        } else {
            tracing::info!(rcvbuf = rcv, sndbuf = snd, "socket buffer sizes");
        }
    }
}

/// Asks the kernel to report each datagram's destination address (and accept a source
/// address when sending): needed on wildcard listeners so a reply leaves from the address
/// the client reached, not whatever the routing table prefers on a multi-homed host.
fn enable_pktinfo(s: &Socket, v6: bool) -> io::Result<()> {
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let one: libc::c_int = 1;
    // SAFETY: a live socket and a c_int option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets the kernel coalesce consecutive datagrams of one flow into one GRO buffer
/// (`UDP_GRO`, Linux 5.0+; `mmsg::RecvBatch` splits it again): one trip through the stack
/// for a burst instead of one per datagram. Best effort: an older kernel keeps the socket
/// as it was. Not while the kernel fast path runs where GRO comes first (the callers'
/// `gro` flag, `fastpath::Effective::allows_udp_gro` says why).
fn enable_gro(s: &Socket) {
    let one: libc::c_int = 1;
    // SAFETY: a live socket and a c_int option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            super::udp_segment::UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A UDP listener socket that other workers can bind too (SO_REUSEPORT: the kernel hashes
/// each client's 4-tuple to one of them). Wildcard listeners report packet info; `gro`:
/// UDP GRO on ([`enable_gro`]).
pub fn udp_listener(
    addr: SocketAddr,
    buffer_bytes: usize,
    gro: bool,
) -> io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    s.set_reuse_port(true)?;
    if addr.ip().is_unspecified() {
        enable_pktinfo(&s, addr.is_ipv6())?;
    }
    if gro {
        enable_gro(&s);
    }
    set_buffers(&s, buffer_bytes);
    s.bind(&SockAddr::from(addr))?;
    Ok(s.into())
}

/// A TCP listener socket shared by workers through SO_REUSEPORT.
pub fn tcp_listener(addr: SocketAddr, buffer_bytes: usize) -> io::Result<std::net::TcpListener> {
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    set_buffers(&s, buffer_bytes);
    s.bind(&SockAddr::from(addr))?;
    s.listen(TCP_BACKLOG)?;
    Ok(s.into())
}

/// A relay socket bound to exactly `addr` (no address sharing: the port belongs to one
/// allocation, RFC 8656 §7.2); `gro`: UDP GRO on ([`enable_gro`]).
pub fn relay_socket(
    addr: SocketAddr,
    buffer_bytes: usize,
    gro: bool,
) -> io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    if gro {
        enable_gro(&s);
    }
    set_buffers(&s, buffer_bytes);
    s.bind(&SockAddr::from(addr))?;
    Ok(s.into())
}

/// An RFC 6062 TCP relay listener bound to exactly `addr` (§5.1). SO_REUSEADDR and
/// SO_REUSEPORT let the outgoing peer connections of the same allocation bind this address
/// too (§5.2); a probe first makes sure no other socket holds the port already, so the
/// port still belongs to one allocation.
/// Accepted peer connections inherit its `buffer_bytes` socket buffers.
pub fn tcp_relay_listener(
    addr: SocketAddr,
    buffer_bytes: usize,
) -> io::Result<std::net::TcpListener> {
    if addr.port() != 0 {
        probe_exclusive(addr, Type::STREAM, Protocol::TCP)?;
    }
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    set_buffers(&s, buffer_bytes);
    s.bind(&SockAddr::from(addr))?;
    s.listen(TCP_BACKLOG)?;
    Ok(s.into())
}

/// A non-blocking TCP connect to `peer` from `from`, the address of the allocation's TCP
/// relay listener (RFC 6062 §5.2: the peer sees the relayed transport address).
pub fn tcp_relay_connect(
    from: SocketAddr,
    peer: SocketAddr,
    buffer_bytes: usize,
) -> io::Result<std::net::TcpStream> {
    if from.is_ipv4() != peer.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer and relay address families differ",
        ));
    }
    let s = new_socket(from, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nodelay(true)?;
    set_buffers(&s, buffer_bytes);
    s.bind(&SockAddr::from(from))?;
    match s.connect(&SockAddr::from(peer)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// The UDP and TCP listener sockets of one worker for one listen address.
pub struct ListenerPair {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
}

/// Binds `workers` UDP+TCP socket pairs on `addr` (`gro`: UDP GRO on the UDP ones). With
/// port 0 the first UDP socket picks a port and everything else binds that same port
/// (retrying if TCP finds it taken).
pub fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
    buffer_bytes: usize,
    gro: bool,
) -> io::Result<(SocketAddr, Vec<ListenerPair>)> {
    const ATTEMPTS: usize = 16;
    let mut last_err = None;
    for _ in 0..ATTEMPTS {
        match bind_once(addr, workers, buffer_bytes, gro) {
            Ok(v) => return Ok(v),
            // Only an ephemeral port is worth another try.
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last_err = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Fails with `AddrInUse` if another socket already holds `addr` on `ty`. SO_REUSEPORT
/// would otherwise let our listeners silently join another process's group (a second
/// Tern, or coturn, which uses SO_REUSEPORT too) and split the clients between the two.
fn probe_exclusive(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<()> {
    let s = new_socket(addr, ty, proto)?;
    if ty == Type::STREAM {
        // A listener in TIME_WAIT from our own previous run must not block a restart.
        s.set_reuse_address(true)?;
    }
    s.bind(&SockAddr::from(addr))
}

fn bind_once(
    addr: SocketAddr,
    workers: usize,
    buffer_bytes: usize,
    gro: bool,
) -> io::Result<(SocketAddr, Vec<ListenerPair>)> {
    if addr.port() != 0 {
        probe_exclusive(addr, Type::DGRAM, Protocol::UDP)?;
        probe_exclusive(addr, Type::STREAM, Protocol::TCP)?;
    }
    let first_udp = udp_listener(addr, buffer_bytes, gro)?;
    let bound = first_udp.local_addr()?;
    let mut pairs = Vec::with_capacity(workers);
    let mut first_udp = Some(first_udp);
    for _ in 0..workers {
        let udp = match first_udp.take() {
            Some(u) => u,
            None => udp_listener(bound, buffer_bytes, gro)?,
        };
        let tcp = tcp_listener(bound, buffer_bytes)?;
        pairs.push(ListenerPair { udp, tcp });
    }
    Ok((bound, pairs))
}

/// Binds `workers` TCP-only listeners on `addr` (TURN over TLS, RFC 8656 §3.1), all on the
/// same port when `addr` has port 0.
pub fn bind_tcp_listeners(
    addr: SocketAddr,
    workers: usize,
    buffer_bytes: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    if addr.port() != 0 {
        probe_exclusive(addr, Type::STREAM, Protocol::TCP)?;
    }
    let first = tcp_listener(addr, buffer_bytes)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(tcp_listener(bound, buffer_bytes)?);
    }
    Ok((bound, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gives_every_worker_the_same_port_on_both_transports() {
        let (bound, pairs) =
            bind_listeners("127.0.0.1:0".parse().unwrap(), 3, 1 << 16, true).unwrap();
        assert_ne!(bound.port(), 0);
        assert_eq!(pairs.len(), 3);
        for p in &pairs {
            assert_eq!(p.udp.local_addr().unwrap(), bound);
            assert_eq!(p.tcp.local_addr().unwrap(), bound);
        }
    }

    #[test]
    fn a_port_held_by_another_reuseport_group_is_refused() {
        // Someone else's SO_REUSEPORT listener (another daemon on the same port).
        let (bound, _theirs) =
            bind_listeners("127.0.0.1:0".parse().unwrap(), 1, 1 << 16, true).unwrap();
        let e = bind_listeners(bound, 2, 1 << 16, true)
            .err()
            .expect("must not join their group");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn relay_socket_port_is_exclusive() {
        let a = relay_socket("127.0.0.1:0".parse().unwrap(), 1 << 16, true).unwrap();
        let taken = a.local_addr().unwrap();
        let e = relay_socket(taken, 1 << 16, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    /// UDP_GRO as the kernel reports it for `s` (Linux 5.0+ answers getsockopt too).
    fn gro_of(s: &std::net::UdpSocket) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket; `v` and `len` are valid for the kernel to write.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                crate::net::udp_segment::UDP_GRO,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt UDP_GRO: {}", io::Error::last_os_error());
        v
    }

    /// The `gro` flag decides UDP_GRO on listeners and relay sockets alike (off while the
    /// kernel fast path runs where GRO would hide datagrams from it).
    #[test]
    fn udp_gro_follows_the_flag_on_listeners_and_relay_sockets() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for gro in [true, false] {
            let relay = relay_socket(any, 1 << 16, gro).unwrap();
            assert_eq!(gro_of(&relay), libc::c_int::from(gro), "relay, gro {gro}");
            let (_, pairs) = bind_listeners(any, 2, 1 << 16, gro).unwrap();
            for p in &pairs {
                assert_eq!(
                    gro_of(&p.udp),
                    libc::c_int::from(gro),
                    "listener, gro {gro}"
                );
            }
        }
    }

    #[test]
    fn tcp_relay_listener_is_exclusive_but_lets_its_own_connects_bind_its_address() {
        let l = tcp_relay_listener("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        let addr = l.local_addr().unwrap();
        let e = tcp_relay_listener(addr, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = tcp_relay_connect(addr, target.local_addr().unwrap(), 1 << 16).unwrap();
        assert_eq!(c.local_addr().unwrap(), addr);
        let (_, seen) = target.accept().unwrap();
        assert_eq!(seen, addr, "the peer sees the relayed address");
    }

    #[test]
    fn ipv6_wildcard_coexists_with_ipv4_wildcard() {
        let (v4, _p4) = bind_listeners("0.0.0.0:0".parse().unwrap(), 1, 1 << 16, true).unwrap();
        let v6: SocketAddr = format!("[::]:{}", v4.port()).parse().unwrap();
        match bind_listeners(v6, 1, 1 << 16, true) {
            Ok((b, _)) => assert_eq!(b.port(), v4.port()),
            // No IPv6 on this machine: nothing to check.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {}
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
