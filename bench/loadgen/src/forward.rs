//! The batched bare forwarder: the floor a user-space relay can reach with the same syscalls
//! Tern uses (recvmmsg/sendmmsg on epoll, UDP GSO where a batch holds a run of equal-size
//! datagrams to one destination), without any TURN logic: no authentication, permissions,
//! quotas or counters. Clients send ChannelData to `--listen`; the first datagram from a
//! client gives it a relay socket connected to `--peer`, or to the peer a [`BIND`] datagram
//! names (the load generator's `--distinct-peers`: one echo peer per client, like one per
//! TURN allocation); the 4-byte header is stripped toward the peer and written back in
//! front of the peer's datagrams toward the client.
//!
//! Bounded: it exits after `--max-secs` (the bench script also stops it by PID).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::mmsg::{self, MAX_BATCH};
use crate::udp_segment::{MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

const SLOT: usize = 2048;
const HEAD: usize = 4;
/// A client's first datagram `BIND` + "IP:PORT" gives it a relay socket connected to that
/// peer instead of `--peer`; answered by the same datagram (the client waits for it).
pub const BIND: &[u8; 8] = b"TRNBIND:";

pub struct FwdArgs {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub threads: usize,
    pub gso: bool,
    pub max_secs: u64,
    pub buffers: usize,
}

pub fn run(a: &FwdArgs) -> io::Result<()> {
    let mut socks = Vec::new();
    for _ in 0..a.threads.max(1) {
        socks.push(reuseport_socket(a.listen)?);
    }
    let deadline = Instant::now() + Duration::from_secs(a.max_secs);
    let threads: Vec<_> = socks
        .into_iter()
        .map(|s| {
            let (peer, gso, buffers) = (a.peer, a.gso, a.buffers);
            std::thread::spawn(move || worker(s, peer, gso, buffers, deadline))
        })
        .collect();
    eprintln!("forwarder ready on {}", a.listen);
    for t in threads {
        t.join()
            .map_err(|_| io::Error::other("forwarder thread panicked"))??;
    }
    Ok(())
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket/setsockopt/bind calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let mut ss: libc::sockaddr_storage = zeroed();
        let len = write_sockaddr(addr, &mut ss);
        if libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }
}

fn write_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> u32 {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

/// A client's address as a map key (family, port and address bytes).
fn key(ss: &libc::sockaddr_storage) -> [u8; 20] {
    let mut k = [0u8; 20];
    // SAFETY: reading the family-appropriate view of a filled sockaddr_storage.
    unsafe {
        if ss.ss_family as i32 == libc::AF_INET {
            let sin = &*(ss as *const _ as *const libc::sockaddr_in);
            k[0..2].copy_from_slice(&sin.sin_port.to_ne_bytes());
            k[2..6].copy_from_slice(&sin.sin_addr.s_addr.to_ne_bytes());
        } else {
            let sin6 = &*(ss as *const _ as *const libc::sockaddr_in6);
            k[0..2].copy_from_slice(&sin6.sin6_port.to_ne_bytes());
            k[2..18].copy_from_slice(&sin6.sin6_addr.s6_addr);
            k[18] = 6;
        }
    }
    k
}

struct Relay {
    sock: UdpSocket,
    client: libc::sockaddr_storage,
}

struct Bufs {
    data: Vec<[u8; SLOT]>,
    lens: [usize; MAX_BATCH],
    addrs: Vec<libc::sockaddr_storage>,
}

impl Bufs {
    /// recvmmsg into the slots at offset `at`; returns how many arrived (0 on EAGAIN).
    fn recv(&mut self, fd: RawFd, at: usize) -> usize {
        // SAFETY: zeroed iovec/mmsghdr are valid; pointers point into self, which outlives
        // the call.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..MAX_BATCH {
            iov[i].iov_base = self.data[i][at..].as_mut_ptr().cast();
            iov[i].iov_len = SLOT - at;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: hdrs holds MAX_BATCH initialised headers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                MAX_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            return 0;
        }
        for (len, h) in self.lens.iter_mut().zip(&hdrs[..n as usize]) {
            *len = h.msg_len as usize;
        }
        n as usize
    }
}

/// Sends `iovs` (one datagram each) to `dest` (None: the socket is connected): one sendmsg
/// with UDP_SEGMENT per run of equal-size datagrams when `gso`, else one sendmmsg.
fn send_run(fd: RawFd, dest: Option<&libc::sockaddr_storage>, iovs: &mut [libc::iovec], gso: bool) {
    if gso && iovs.len() > 1 && iovs.iter().all(|v| v.iov_len == iovs[0].iov_len) {
        let seg = iovs[0].iov_len;
        let per = MAX_GSO_SEGMENTS.min(MAX_GSO_BYTES / seg.max(1)).max(1);
        for chunk in iovs.chunks_mut(per) {
            // A lone datagram with a segment size of its own length goes out as it is. A
            // refused send is a loss the load generator counts, as for sendmmsg below.
            let _ = mmsg::send_gso(fd, dest, chunk, seg);
        }
        return;
    }
    let (name, namelen) = match dest {
        Some(d) => (
            d as *const libc::sockaddr_storage as *mut libc::c_void,
            mmsg::sockaddr_len(d),
        ),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: zeroed mmsghdrs are valid; one is filled per datagram below.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    let n = iovs.len().min(MAX_BATCH);
    for i in 0..n {
        hdrs[i].msg_hdr.msg_name = name;
        hdrs[i].msg_hdr.msg_namelen = namelen;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut done = 0;
    while done < n {
        // SAFETY: hdrs[done..n] are initialised.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[done..].as_mut_ptr(),
                (n - done) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
}

/// A relay socket for the client at `client`, connected to `to`; returns its index.
fn open_relay(
    relays: &mut Vec<Relay>,
    add: &impl Fn(RawFd, u64),
    to: SocketAddr,
    client: libc::sockaddr_storage,
    buffers: usize,
) -> io::Result<usize> {
    let s = UdpSocket::bind((to.ip(), 0))?;
    s.connect(to)?;
    s.set_nonblocking(true)?;
    mmsg::set_buffers(s.as_raw_fd(), buffers);
    add(s.as_raw_fd(), relays.len() as u64 + 1);
    relays.push(Relay { sock: s, client });
    Ok(relays.len() - 1)
}

fn worker(
    listen: UdpSocket,
    peer: SocketAddr,
    gso: bool,
    buffers: usize,
    deadline: Instant,
) -> io::Result<()> {
    let lfd = listen.as_raw_fd();
    mmsg::set_buffers(lfd, buffers);
    // SAFETY: epoll calls on descriptors we own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let add = |fd: RawFd, data: u64| {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: ev is valid for the call.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    };
    add(lfd, 0);
    let mut by_client: HashMap<[u8; 20], usize> = HashMap::new();
    let mut relays: Vec<Relay> = Vec::new();
    // SAFETY: all-zero sockaddr_storage is valid.
    let zero_ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut b = Bufs {
        data: vec![[0u8; SLOT]; MAX_BATCH],
        lens: [0; MAX_BATCH],
        addrs: vec![zero_ss; MAX_BATCH],
    };
    // SAFETY: zeroed iovecs are valid placeholders.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while Instant::now() < deadline {
        // SAFETY: events has room for 256 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, 100) };
        for ev in events.iter().take(n.max(0) as usize) {
            let token = ev.u64 as usize;
            // Drain the ready socket in batches (edge or level: level-triggered here).
            loop {
                if token == 0 {
                    let got = b.recv(lfd, 0);
                    // Runs of consecutive datagrams from one client go out in one call.
                    let mut i = 0;
                    while i < got {
                        let k = key(&b.addrs[i]);
                        let bind = b.data[i][..b.lens[i]]
                            .strip_prefix(&BIND[..])
                            .and_then(|a| std::str::from_utf8(a).ok()?.parse::<SocketAddr>().ok());
                        if let Some(to) = bind {
                            if let Entry::Vacant(e) = by_client.entry(k) {
                                e.insert(open_relay(&mut relays, &add, to, b.addrs[i], buffers)?);
                            }
                            let mut ack = [libc::iovec {
                                iov_base: b.data[i].as_mut_ptr().cast(),
                                iov_len: b.lens[i],
                            }];
                            send_run(lfd, Some(&b.addrs[i]), &mut ack, false);
                            i += 1;
                            continue;
                        }
                        let ri = match by_client.get(&k) {
                            Some(&ri) => ri,
                            None => {
                                let ri = open_relay(&mut relays, &add, peer, b.addrs[i], buffers)?;
                                by_client.insert(k, ri);
                                ri
                            }
                        };
                        let mut j = i;
                        let mut m = 0;
                        while j < got && (j == i || key(&b.addrs[j]) == k) {
                            if b.lens[j] >= HEAD {
                                iovs[m] = libc::iovec {
                                    iov_base: b.data[j][HEAD..].as_mut_ptr().cast(),
                                    iov_len: b.lens[j] - HEAD,
                                };
                                m += 1;
                            }
                            j += 1;
                        }
                        send_run(relays[ri].sock.as_raw_fd(), None, &mut iovs[..m], gso);
                        i = j;
                    }
                    if got < MAX_BATCH {
                        break;
                    }
                } else {
                    let r = &relays[token - 1];
                    let got = b.recv(r.sock.as_raw_fd(), HEAD);
                    for ((iov, slot), &len) in
                        iovs.iter_mut().zip(&mut b.data).zip(&b.lens).take(got)
                    {
                        slot[..2].copy_from_slice(&0x4000u16.to_be_bytes());
                        slot[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                        *iov = libc::iovec {
                            iov_base: slot.as_mut_ptr().cast(),
                            iov_len: len + HEAD,
                        };
                    }
                    send_run(lfd, Some(&r.client), &mut iovs[..got], gso);
                    if got < MAX_BATCH {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}
