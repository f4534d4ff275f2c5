//! Which interface the kernel routes a destination through (one RTM_GETROUTE request on a
//! netlink socket, as `ip route get DST from SRC`), asked once per binding added (control
//! path only). What the programs do with the answer (the `ifindex` of each map value):
//! - TC (`bpf/tern_fastpath.bpf.c`) redirects through that interface with
//!   `bpf_redirect_neigh`, and the kernel fills in the L2 next hop (FIB next hop for the
//!   rewritten destination, MAC from the neighbour table, resolved there when missing);
//! - XDP (`bpf/tern_fastpath_xdp.bpf.c`) has no `bpf_redirect_neigh`: it asks the FIB per
//!   packet (`bpf_fib_lookup`, egress and both MACs) and ignores the `ifindex`.
//!
//! In both modes a destination with no route, or routed through the loopback (a local
//! peer), gets no map entry here and stays in user space.
//!
//! Owns: the netlink request and the parsing of its answer. Must not: cache routes (a route
//! that changes later is the FIB's business: TC's redirect and XDP's lookup follow it for
//! the next hop, only the egress interface is fixed at binding time).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;
const RTA_HDR: usize = 4;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const NLMSG_ERROR: u16 = 2;

/// A netlink route socket, reused for every lookup of one worker.
pub struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
    loopback: u32,
}

impl RouteSocket {
    pub fn new() -> io::Result<RouteSocket> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a NUL-terminated literal.
        let loopback = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        Ok(RouteSocket {
            fd,
            seq: 0,
            loopback,
        })
    }

    /// The output interface for datagrams from `src` to `dst`; `None` when there is no
    /// route or it is the loopback (a local peer: left to user space).
    pub fn oif(&mut self, src: Ipv4Addr, dst: Ipv4Addr) -> io::Result<Option<u32>> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDR + RTMSG + 2 * (RTA_HDR + 4);
        let mut req = vec![0u8; len];
        req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        req[NLMSG_HDR] = libc::AF_INET as u8;
        req[NLMSG_HDR + 1] = 32;
        req[NLMSG_HDR + 2] = 32;
        let mut at = NLMSG_HDR + RTMSG;
        for (kind, ip) in [(RTA_DST, dst), (RTA_SRC, src)] {
            req[at..at + 2].copy_from_slice(&((RTA_HDR + 4) as u16).to_ne_bytes());
            req[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
            req[at + 4..at + 8].copy_from_slice(&ip.octets());
            at += RTA_HDR + 4;
        }
        let fd = self.fd.as_raw_fd();
        // SAFETY: `req` is a valid buffer of `len` bytes; the kernel is the destination
        // (an unbound netlink socket sends to pid 0).
        let n = unsafe { libc::send(fd, req.as_ptr().cast(), len, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let msg = &buf[..n as usize];
            if msg.len() < NLMSG_HDR {
                return Err(io::Error::other("short netlink answer"));
            }
            let mlen = (u32::from_ne_bytes(msg[0..4].try_into().unwrap_or_default()) as usize)
                .min(msg.len());
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            let seq = u32::from_ne_bytes(msg[8..12].try_into().unwrap_or_default());
            if seq != self.seq {
                continue;
            }
            if kind == NLMSG_ERROR {
                let code = i32::from_ne_bytes(
                    msg.get(NLMSG_HDR..NLMSG_HDR + 4)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or_default(),
                );
                return match code {
                    0 => Ok(None),
                    c if c == -libc::ENETUNREACH || c == -libc::EHOSTUNREACH => Ok(None),
                    c => Err(io::Error::from_raw_os_error(-c)),
                };
            }
            let mut at = NLMSG_HDR + RTMSG;
            while at + RTA_HDR <= mlen {
                let alen = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
                let akind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
                if alen < RTA_HDR || at + alen > mlen {
                    break;
                }
                if akind == RTA_OIF && alen >= RTA_HDR + 4 {
                    let oif =
                        u32::from_ne_bytes(msg[at + 4..at + 8].try_into().unwrap_or_default());
                    return Ok((oif != 0 && oif != self.loopback).then_some(oif));
                }
                at += (alen + 3) & !3;
            }
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 127.0.0.1 routes through the loopback: never offloaded.
    #[test]
    fn loopback_destinations_are_not_offloaded() {
        let mut r = RouteSocket::new().unwrap();
        let lo = Ipv4Addr::LOCALHOST;
        assert_eq!(r.oif(lo, lo).unwrap(), None);
    }
}
