//! A send batch that hands the kernel runs of datagrams as one UDP GSO message
//! (`UDP_SEGMENT`, Linux 4.18+): consecutive datagrams to the same destination, from the same
//! source address and of the same size become one `msghdr` whose iovecs the kernel cuts into
//! equal segments, so the stack is traversed once per run instead of once per datagram.
//! Bursty traffic (a video frame's packets from one peer to one client) makes such runs
//! common; anything else goes out as ordinary `sendmmsg` entries in the same call.
//!
//! Owns the batch's buffers (allocated once, reused: no heap allocation per packet). It must
//! not reorder datagrams: a run only ever extends the message pushed last.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr;

use super::mmsg::{write_pktinfo, write_sockaddr, Ctrl, Flushed};
use super::udp_segment::{self, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

/// One message of the batch: a lone datagram or a GSO run.
#[derive(Clone, Copy)]
struct Run {
    to: SocketAddr,
    src: Option<IpAddr>,
    /// Segment size (every datagram of the run has it).
    seg: usize,
    /// Datagrams in the run; their iovecs are `iov[first..first + count]`.
    first: usize,
    count: usize,
}

/// Datagrams queued for one `sendmmsg`, consecutive same-size ones to one destination
/// merged into GSO messages.
pub struct GsoBatch {
    iov: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    ctrl: Box<[Ctrl]>,
    hdrs: Box<[libc::mmsghdr]>,
    runs: Box<[Run]>,
    /// Datagrams queued.
    len: usize,
    /// Messages queued.
    msgs: usize,
    /// Largest segment the kernel took in a GSO message on this batch's sockets; a size it
    /// refused (EINVAL/EMSGSIZE over a small path MTU, EIO without checksum offload) lowers
    /// it, so those datagrams go out one by one from then on.
    max_seg: usize,
}

impl GsoBatch {
    /// A batch of at most `capacity` datagrams.
    pub fn new(capacity: usize) -> GsoBatch {
        assert!(capacity > 0);
        let any: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        GsoBatch {
            iov: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ]
            .into_boxed_slice(),
            // SAFETY: all-zero sockaddr_storage/mmsghdr/Ctrl are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; capacity].into_boxed_slice(),
            ctrl: vec![unsafe { std::mem::zeroed() }; capacity].into_boxed_slice(),
            hdrs: vec![unsafe { std::mem::zeroed() }; capacity].into_boxed_slice(),
            runs: vec![
                Run {
                    to: any,
                    src: None,
                    seg: 0,
                    first: 0,
                    count: 0
                };
                capacity
            ]
            .into_boxed_slice(),
            len: 0,
            msgs: 0,
            max_seg: usize::MAX,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.iov.len()
    }

    /// Queues `data` to `to` (from source address `src` when given). Returns false when full.
    ///
    /// # Safety
    /// `data` must stay valid and unmodified until the next [`Self::flush`].
    pub unsafe fn push(&mut self, data: &[u8], to: SocketAddr, src: Option<IpAddr>) -> bool {
        if self.is_full() {
            return false;
        }
        self.iov[self.len] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let joins = self.msgs > 0 && {
            let r = &self.runs[self.msgs - 1];
            r.to == to
                && r.src == src
                && r.seg == data.len()
                && r.seg > 0
                && r.seg <= self.max_seg
                && r.count < MAX_GSO_SEGMENTS
                && (r.count + 1) * r.seg <= MAX_GSO_BYTES
        };
        if joins {
            self.runs[self.msgs - 1].count += 1;
        } else {
            self.runs[self.msgs] = Run {
                to,
                src,
                seg: data.len(),
                first: self.len,
                count: 1,
            };
            self.msgs += 1;
        }
        self.len += 1;
        true
    }

    /// Sets up message `m`'s header (address, iovecs, packet info, segment size).
    // msg_controllen is usize on glibc and u32 on musl.
    #[allow(clippy::unnecessary_cast)]
    fn prepare(&mut self, m: usize, gso: bool) {
        let r = self.runs[m];
        let namelen = write_sockaddr(r.to, &mut self.addrs[m]);
        let h = &mut self.hdrs[m].msg_hdr;
        h.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut self.iov[r.first];
        h.msg_iovlen = if gso { r.count } else { 1 } as _;
        h.msg_flags = 0;
        h.msg_control = ptr::null_mut();
        h.msg_controllen = 0;
        if let Some(ip) = r.src {
            write_pktinfo(&mut self.ctrl[m], h, ip);
        }
        if gso && r.count > 1 {
            // The segment size goes after the packet info (if any) in the same buffer,
            // which has room for both (CMSG_SPACE of in6_pktinfo plus of a u16).
            let used = h.msg_controllen as usize;
            let ctrl = &mut self.ctrl[m].0;
            h.msg_control = ctrl.as_mut_ptr().cast();
            // A run's segment is at most MAX_GSO_BYTES, so it fits the u16.
            h.msg_controllen = udp_segment::write_segment(ctrl, used, r.seg as u16) as _;
        }
        self.hdrs[m].msg_len = 0;
    }

    /// Sends everything queued on `fd` and empties the batch. Counts are in datagrams.
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let mut out = Flushed::default();
        for m in 0..self.msgs {
            self.prepare(m, true);
        }
        let mut m = 0;
        let mut retried = false;
        while m < self.msgs {
            // SAFETY: hdrs[m..msgs] are prepared; every pointer in them points into this
            // batch's boxes or into data the caller keeps valid until this flush.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[m..].as_mut_ptr(),
                    (self.msgs - m) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                for h in &self.hdrs[m..m + r as usize] {
                    out.sent_bytes += h.msg_len as usize;
                }
                for run in &self.runs[m..m + r as usize] {
                    out.sent += run.count;
                }
                m += r as usize;
                retried = false;
                continue;
            }
            let e = io::Error::last_os_error();
            let run = self.runs[m];
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    out.failed += self.runs[m..self.msgs]
                        .iter()
                        .map(|r| r.count)
                        .sum::<usize>();
                    break;
                }
                // The kernel or the route cannot segment this size: never merge it again,
                // and send this run's datagrams one by one.
                Some(libc::EINVAL | libc::EMSGSIZE | libc::EIO | libc::ENOPROTOOPT)
                    if run.count > 1 =>
                {
                    self.max_seg = self.max_seg.min(run.seg - 1);
                    let f = self.send_singly(fd, m);
                    out.sent += f.sent;
                    out.sent_bytes += f.sent_bytes;
                    out.failed += f.failed;
                    m += 1;
                }
                // A pending ICMP error is reported (and cleared) by this call: once more.
                _ if !retried => retried = true,
                _ => {
                    out.failed += run.count;
                    m += 1;
                    retried = false;
                }
            }
        }
        self.len = 0;
        self.msgs = 0;
        out
    }

    /// Sends run `m`'s datagrams as separate messages (the GSO fallback).
    fn send_singly(&mut self, fd: RawFd, m: usize) -> Flushed {
        let mut out = Flushed::default();
        self.prepare(m, false);
        let run = self.runs[m];
        for k in run.first..run.first + run.count {
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_iov = &mut self.iov[k];
            // SAFETY: the header was prepared above; its iovec points at a queued datagram.
            let r = unsafe { libc::sendmsg(fd, h, 0) };
            if r >= 0 {
                out.sent += 1;
                out.sent_bytes += r as usize;
            } else {
                out.failed += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn receiver() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn recv_all(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = s.recv(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    fn datagram(tag: u8, i: usize, len: usize) -> Vec<u8> {
        let mut d = vec![tag; len];
        d[0] = i as u8;
        d
    }

    #[test]
    fn runs_merge_only_for_one_destination_and_size() {
        let (a, b) = (receiver(), receiver());
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut batch = GsoBatch::new(16);
        let data: Vec<(Vec<u8>, SocketAddr)> = vec![
            (datagram(b'a', 0, 100), aa),
            (datagram(b'a', 1, 100), aa),
            (datagram(b'a', 2, 100), aa),
            (datagram(b'b', 0, 100), ba),
            (datagram(b'b', 1, 100), ba),
            (datagram(b'a', 3, 100), aa),
            // A shorter datagram ends the run; the next one starts a new one.
            (datagram(b'a', 4, 40), aa),
            (datagram(b'a', 5, 100), aa),
        ];
        for (d, to) in &data {
            // SAFETY: `data` outlives the flush below.
            assert!(unsafe { batch.push(d, *to, None) });
        }
        assert_eq!(batch.msgs, 5, "a×3, b×2, a, a(40), a");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = batch.flush(tx.as_raw_fd());
        assert_eq!(f.sent, 8);
        assert_eq!(f.failed, 0);
        assert_eq!(f.sent_bytes, 7 * 100 + 40);
        assert!(batch.is_empty());
        assert_eq!(
            batch.max_seg,
            usize::MAX,
            "the kernel took the GSO messages"
        );
        let want = |to: SocketAddr| -> Vec<Vec<u8>> {
            data.iter()
                .filter(|(_, t)| *t == to)
                .map(|(d, _)| d.clone())
                .collect()
        };
        assert_eq!(
            recv_all(&a, 6),
            want(aa),
            "destination a: each datagram, in order"
        );
        assert_eq!(
            recv_all(&b, 2),
            want(ba),
            "destination b: its two datagrams"
        );
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(a.recv(&mut buf).is_err() && b.recv(&mut buf).is_err());
    }

    #[test]
    fn a_long_run_is_cut_at_the_segment_limit() {
        let a = receiver();
        let to = a.local_addr().unwrap();
        let data: Vec<Vec<u8>> = (0..MAX_GSO_SEGMENTS + 6)
            .map(|i| datagram(b'x', i, 1200))
            .collect();
        let mut batch = GsoBatch::new(data.len());
        for d in &data {
            // SAFETY: `data` outlives the flush below.
            assert!(unsafe { batch.push(d, to, None) });
        }
        // 1200-byte segments: MAX_GSO_BYTES / 1200 = 54 per message.
        assert_eq!(batch.msgs, data.len().div_ceil(MAX_GSO_BYTES / 1200));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = batch.flush(tx.as_raw_fd());
        assert_eq!((f.sent, f.failed), (data.len(), 0));
        assert_eq!(
            batch.max_seg,
            usize::MAX,
            "the kernel took the GSO messages"
        );
        assert_eq!(recv_all(&a, data.len()), data);
    }
}
