//! Batched UDP syscalls (sendmmsg/recvmmsg) for the load generator's data path.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::RawFd;

use crate::udp_segment::{SegmentCtrl, MAX_GSO_BYTES};

/// Largest batch one call handles.
pub const MAX_BATCH: usize = 64;
/// Receive buffer per datagram.
pub const SLOT: usize = 2048;

/// Receive buffers and source addresses for one recvmmsg call.
pub struct RecvBatch {
    bufs: Vec<[u8; SLOT]>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: [usize; MAX_BATCH],
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; SLOT]; MAX_BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { zeroed() }; MAX_BATCH],
            lens: [0; MAX_BATCH],
        }
    }

    /// Receives up to MAX_BATCH datagrams without blocking (or, with `wait_one`, blocking
    /// until at least one arrives or SO_RCVTIMEO passes). Returns how many arrived.
    pub fn recv(&mut self, fd: RawFd, wait_one: bool) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr are valid; every pointer set below points into
        // self.bufs/self.addrs, which outlive the call and are not otherwise borrowed.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..MAX_BATCH {
            iov[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = SLOT;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        }
        let flags = if wait_one {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: hdrs holds MAX_BATCH initialised headers as set up above.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                MAX_BATCH as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs[..n]) {
            *len = h.msg_len as usize;
        }
        Ok(n)
    }

    /// The i-th datagram of the last `recv`.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Sends the first `n` received datagrams back to where each came from (an echo).
    /// Returns how many the kernel accepted.
    pub fn echo(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        // SAFETY: as in `recv`; lengths come from the previous recvmmsg.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..n {
            iov[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = self.lens[i];
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = sockaddr_len(&self.addrs[i]);
        }
        send_all(fd, &mut hdrs[..n])
    }

    /// As [`Self::echo`], but a batch of equal-size datagrams from one address goes back as
    /// one UDP GSO message (`--gso`); anything else as `echo` does.
    pub fn echo_gso(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        let same = n > 1
            && n * self.lens[0] <= MAX_GSO_BYTES
            && (1..n)
                .all(|i| self.lens[i] == self.lens[0] && same_addr(&self.addrs[i], &self.addrs[0]));
        if !same {
            return self.echo(fd, n);
        }
        // SAFETY: as in `recv`.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        for ((v, b), &len) in iov.iter_mut().zip(&mut self.bufs).zip(&self.lens).take(n) {
            v.iov_base = b.as_mut_ptr().cast();
            v.iov_len = len;
        }
        let to = self.addrs[0];
        send_gso(fd, Some(&to), &mut iov[..n], self.lens[0]).map(|_| n)
    }
}

fn same_addr(a: &libc::sockaddr_storage, b: &libc::sockaddr_storage) -> bool {
    let len = sockaddr_len(a) as usize;
    // SAFETY: both are sockaddr_storage, at least `len` bytes.
    unsafe {
        std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), len)
            == std::slice::from_raw_parts((b as *const libc::sockaddr_storage).cast::<u8>(), len)
    }
}

/// One sendmsg of `iov` as UDP GSO segments of `seg` bytes (to `to`, or on a connected
/// socket). Returns the bytes sent.
pub fn send_gso(
    fd: RawFd,
    to: Option<&libc::sockaddr_storage>,
    iov: &mut [libc::iovec],
    seg: usize,
) -> io::Result<usize> {
    let mut ctrl = SegmentCtrl::new(seg as u16);
    // SAFETY: a msghdr whose pointers point at locals and at `iov`, alive for the call.
    let r = unsafe {
        let mut h: libc::msghdr = zeroed();
        if let Some(to) = to {
            h.msg_name =
                (to as *const libc::sockaddr_storage as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = sockaddr_len(to);
        }
        h.msg_iov = iov.as_mut_ptr();
        h.msg_iovlen = iov.len() as _;
        ctrl.attach(&mut h);
        libc::sendmsg(fd, &h, libc::MSG_DONTWAIT)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Sends `count` packets of `packet_len` bytes (back to back in `buf`) on a connected socket
/// as one UDP GSO message. Returns how many the kernel accepted (all or none).
pub fn send_connected_gso(
    fd: RawFd,
    buf: &mut [u8],
    packet_len: usize,
    count: usize,
) -> io::Result<usize> {
    let count = count
        .min(MAX_BATCH)
        .min(buf.len() / packet_len)
        .min(MAX_GSO_BYTES / packet_len);
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: count * packet_len,
    }];
    send_gso(fd, None, &mut iov, packet_len).map(|_| count)
}

/// The length of the sockaddr in `a` (IPv6 or IPv4), for msg_namelen.
pub fn sockaddr_len(a: &libc::sockaddr_storage) -> u32 {
    if a.ss_family as i32 == libc::AF_INET6 {
        size_of::<libc::sockaddr_in6>() as u32
    } else {
        size_of::<libc::sockaddr_in>() as u32
    }
}

/// sendmmsg until every header is sent or the socket would block; returns the count sent.
fn send_all(fd: RawFd, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let mut done = 0;
    while done < hdrs.len() {
        // SAFETY: hdrs[done..] are initialised headers whose buffers outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[done..].as_mut_ptr(),
                (hdrs.len() - done) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || done > 0 {
                return Ok(done);
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(done)
}

/// Sends `packets` (equal-length slices of `buf`) on a connected socket in one batch.
/// Returns how many the kernel accepted.
pub fn send_connected(
    fd: RawFd,
    buf: &mut [u8],
    packet_len: usize,
    count: usize,
) -> io::Result<usize> {
    let count = count.min(MAX_BATCH).min(buf.len() / packet_len);
    // SAFETY: zeroed iovec/mmsghdr are valid; pointers point into `buf`, which outlives the call.
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    for i in 0..count {
        iov[i].iov_base = buf[i * packet_len..].as_mut_ptr().cast();
        iov[i].iov_len = packet_len;
        hdrs[i].msg_hdr.msg_iov = &mut iov[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    send_all(fd, &mut hdrs[..count])
}

/// Sets SO_RCVBUF and SO_SNDBUF (best effort: the kernel caps them at rmem_max/wmem_max).
pub fn set_buffers(fd: RawFd, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt reads an int from a valid pointer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd for the call's duration.
    unsafe {
        libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms);
    }
}
