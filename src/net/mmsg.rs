//! Batched UDP syscalls (`recvmmsg`/`sendmmsg`) over buffers allocated once per worker and
//! reused forever: the relayed-packet path makes no heap allocation here. Packet-info
//! control messages carry the local address of wildcard listeners both ways, so a reply
//! leaves from the address the client reached on a multi-homed host.
//!
//! UDP GRO (`UDP_GRO`, Linux 5.0+, enabled by `socket::enable_gro`): the kernel may hand
//! over several datagrams of one flow as one buffer with their segment size in a control
//! message. [`RecvBatch::recv`] splits such a buffer back into datagrams, so callers see one
//! datagram per index as without GRO: in place when no headroom is asked for, otherwise each
//! further segment is copied into a spill area with its own headroom and tail room (a copy
//! of the payload costs far less than the per-datagram trip through the stack GRO saves).
//! The batch has room for every segment of a full buffer in every slot
//! (`udp_segment::MAX_GRO_SEGMENTS`); a segment that still finds none is counted as the
//! drop reason `gro_overflow`, never lost silently. GRO buffers are counted per worker in
//! its [`NetStats`] (`tern_relay_gro_buffers_total`), not in a process-wide counter.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

use super::stats::NetStats;
use super::udp_segment::{self, MAX_GRO_SEGMENTS};

/// Writes `addr` into `storage` as a `sockaddr_in`/`sockaddr_in6`; returns its length.
pub fn write_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr type.
            let sin = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a `sockaddr_in`/`sockaddr_in6` the kernel wrote; `None` for other families.
pub fn read_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Control-message room per datagram: one IPv4 or IPv6 packet-info message, plus a
/// UDP_SEGMENT size after it (in `gso::GsoBatch`) or a UDP_GRO size (received).
const CTRL_LEN: usize = 64;
/// Headroom plus tail room a split GRO segment can get in the spill area; a larger request
/// drops the further segments of a coalesced buffer (counted as `gro_overflow`).
const MAX_SPILL_ROOM: usize = 64;

/// A control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(super) struct Ctrl(pub(super) [u8; CTRL_LEN]);

/// What the control messages of a received datagram say: its destination address, from
/// IP_PKTINFO / IPV6_PKTINFO (present only on sockets where packet info was enabled), and
/// the segment size when it is a GRO buffer of several datagrams (UDP_GRO).
///
/// # Safety
/// `hdr` must be a msghdr the kernel just filled, its control buffer still alive.
// msg_controllen is size_t on glibc but socklen_t on musl.
#[allow(clippy::unnecessary_cast)]
unsafe fn read_cmsgs(hdr: &libc::msghdr) -> (Option<IpAddr>, usize) {
    let (mut dst, mut gro) = (None, 0);
    if hdr.msg_control.is_null() || (hdr.msg_controllen as usize) < mem::size_of::<libc::cmsghdr>()
    {
        return (dst, gro);
    }
    // SAFETY: the control buffer holds `msg_controllen` bytes of cmsgs written by the kernel.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                dst = Some(IpAddr::V4(Ipv4Addr::from(
                    info.ipi_addr.s_addr.to_ne_bytes(),
                )));
            } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            } else if let Some(size) = udp_segment::read_gro(c) {
                gro = size;
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    (dst, gro)
}

/// Writes a packet-info control message asking the kernel to send from `src`; returns the
/// control length to put in the msghdr.
pub(super) fn write_pktinfo(ctrl: &mut Ctrl, hdr: &mut libc::msghdr, src: IpAddr) {
    ctrl.0 = [0; CTRL_LEN];
    hdr.msg_control = ctrl.0.as_mut_ptr().cast();
    // SAFETY: CMSG_* only compute sizes and offsets inside the CTRL_LEN-byte buffer set
    // just above, which is large enough for one in6_pktinfo message.
    unsafe {
        let (level, ty, len) = match src {
            IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                mem::size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                mem::size_of::<libc::in6_pktinfo>(),
            ),
        };
        hdr.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
        let c = libc::CMSG_FIRSTHDR(hdr);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        match src {
            IpAddr::V4(a) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
            IpAddr::V6(a) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
        }
    }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn zeroed_hdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data (pointers may be null); all-zero is valid.
    unsafe { mem::zeroed() }
}

/// One datagram received by [`RecvBatch::recv`].
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub from: SocketAddr,
    /// Payload length (bytes at `data_at` in the slot).
    pub len: usize,
    /// The datagram did not fit its slot and was cut (MSG_TRUNC): drop it.
    pub truncated: bool,
    /// The local address it was sent to, when the socket reports packet info.
    pub dst: Option<IpAddr>,
}

/// `slots` receive buffers of `slot_size` bytes each, filled by one `recvmmsg` call.
///
/// Each datagram lands at a caller-chosen offset in its slot, so a header can later be
/// written in place before the payload (ChannelData, Data indication: RFC 8656 §11.6, §12.5)
/// and `tail` bytes stay free after it (ChannelData padding over TCP). A GRO buffer is
/// split into its datagrams (module header): indexes count datagrams, not buffers.
pub struct RecvBatch {
    /// The slots, then the spill area for the further segments of GRO buffers.
    buf: Box<[u8]>,
    slots: usize,
    slot_size: usize,
    data_at: usize,
    iov: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    ctrl: Box<[Ctrl]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Per datagram of the last `recv` (up to `slots * segments per slot` of them).
    received: Box<[Received]>,
    /// Per datagram: the region of `buf` that is its slot (payload at `data_at`).
    region: Box<[(usize, usize)]>,
}

impl RecvBatch {
    pub fn new(slots: usize, slot_size: usize) -> RecvBatch {
        // A segment holds at least one byte, so a slot never holds more than slot_size.
        RecvBatch::with_segments(slots, slot_size, MAX_GRO_SEGMENTS.min(slot_size))
    }

    /// A batch with room for `segs` datagrams per slot (the tests provoke `gro_overflow`
    /// with fewer than a GRO buffer can hold).
    fn with_segments(slots: usize, slot_size: usize, segs: usize) -> RecvBatch {
        assert!(slots > 0 && slot_size > 0 && segs > 0);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        // Every payload byte of a batch may need a spill copy, each segment with its own
        // room (at most MAX_SPILL_ROOM, plus up to 7 bytes to keep the next one aligned).
        // The area is only touched when GRO buffers arrive (zeroed pages stay unmapped).
        let spill = slots * slot_size + slots * segs * (MAX_SPILL_ROOM + 8);
        let entries = slots * segs;
        RecvBatch {
            buf: vec![0u8; slots * slot_size + spill].into_boxed_slice(),
            slots,
            slot_size,
            data_at: 0,
            iov: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                slots
            ]
            .into_boxed_slice(),
            addrs: vec![zeroed_storage(); slots].into_boxed_slice(),
            ctrl: vec![Ctrl([0; CTRL_LEN]); slots].into_boxed_slice(),
            hdrs: vec![zeroed_hdr(); slots].into_boxed_slice(),
            received: vec![
                Received {
                    from: unspecified,
                    len: 0,
                    truncated: false,
                    dst: None,
                };
                entries
            ]
            .into_boxed_slice(),
            region: vec![(0, 0); entries].into_boxed_slice(),
        }
    }

    /// Receives up to one batch from the non-blocking socket `fd`, each datagram placed at
    /// `data_at` in its slot with `tail` bytes kept free after the largest accepted payload.
    /// Returns how many datagrams arrived (a GRO buffer counts as its datagrams);
    /// `WouldBlock` when none were waiting. GRO buffers, and segments of them that found no
    /// room (`drop_gro_overflow`), are counted in `stats`.
    pub fn recv(
        &mut self,
        fd: RawFd,
        data_at: usize,
        tail: usize,
        stats: &mut NetStats,
    ) -> io::Result<usize> {
        assert!(data_at + tail < self.slot_size);
        self.data_at = data_at;
        let room = self.slot_size - data_at - tail;
        let base = self.buf.as_mut_ptr();
        for i in 0..self.hdrs.len() {
            // SAFETY: i * slot_size + data_at stays inside buf (checked above).
            self.iov[i].iov_base = unsafe { base.add(i * self.slot_size + data_at) }.cast();
            self.iov[i].iov_len = room;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = CTRL_LEN as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        let n = loop {
            // SAFETY: every header points at live buffers owned by self with correct lengths.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as libc::c_uint,
                    0,
                    ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let entries = self.received.len();
        let mut count = 0;
        let mut spill = self.slots * self.slot_size;
        for i in 0..n {
            // One entry stays free for the first datagram of each later buffer, so a long
            // GRO buffer cannot take their place (`entries >= slots >= n`).
            let limit = entries - (n - 1 - i);
            let h = &self.hdrs[i];
            let slot = (i * self.slot_size, (i + 1) * self.slot_size);
            let Some(from) = read_sockaddr(&self.addrs[i]) else {
                // An unknown address family is marked truncated so the caller drops it.
                self.received[count] = Received {
                    from: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                    len: 0,
                    truncated: true,
                    dst: None,
                };
                self.region[count] = slot;
                count += 1;
                continue;
            };
            let len = h.msg_len as usize;
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // SAFETY: the kernel just filled this header and its control buffer.
            let (dst, gro) = unsafe { read_cmsgs(&h.msg_hdr) };
            let first = if gro > 0 && !truncated {
                gro.min(len)
            } else {
                len
            };
            self.received[count] = Received {
                from,
                len: first,
                truncated,
                dst,
            };
            self.region[count] = slot;
            count += 1;
            if first == len {
                continue;
            }
            // A GRO buffer: segments of `gro` bytes (the last may be shorter) after the
            // first, which stays where it is.
            stats.gro_buffers += 1;
            let in_place = data_at == 0 && tail == 0;
            let end = slot.0 + data_at + len;
            let mut at = slot.0 + data_at + first;
            while at < end {
                if count == limit {
                    // More segments than a GRO buffer can hold today: count what is left.
                    stats.drop_gro_overflow += (end - at).div_ceil(gro) as u64;
                    break;
                }
                let seg = gro.min(end - at);
                let need = (data_at + seg + tail).next_multiple_of(8);
                let region = if in_place {
                    Some((at, at + seg))
                } else if data_at + tail <= MAX_SPILL_ROOM && spill + need <= self.buf.len() {
                    self.buf.copy_within(at..at + seg, spill + data_at);
                    spill += need;
                    Some((spill - need, spill - need + data_at + seg + tail))
                } else {
                    None
                };
                at += seg;
                let Some(region) = region else {
                    // More room asked around each datagram than the spill area has.
                    stats.drop_gro_overflow += 1;
                    continue;
                };
                self.received[count] = Received {
                    from,
                    len: seg,
                    truncated: false,
                    dst,
                };
                self.region[count] = region;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Metadata of datagram `i` of the last `recv`.
    pub fn received(&self, i: usize) -> Received {
        self.received[i]
    }

    /// Offset of the payload inside each slot for the last `recv`.
    pub fn data_at(&self) -> usize {
        self.data_at
    }

    /// Payload of datagram `i`.
    pub fn payload(&self, i: usize) -> &[u8] {
        let start = self.region[i].0 + self.data_at;
        &self.buf[start..start + self.received[i].len]
    }

    /// The whole slot of datagram `i` (payload at [`Self::data_at`], the requested tail
    /// room after it), for in-place framing.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let (start, end) = self.region[i];
        &mut self.buf[start..end]
    }
}

/// Outcome of [`SendBatch::flush`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    pub sent_bytes: usize,
    /// Datagrams the kernel refused (full socket buffer, unreachable destination, ...).
    pub failed: usize,
}

/// Up to `capacity` outgoing datagrams for one `sendmmsg` call. Holds pointers to bytes the
/// caller owns (usually a [`RecvBatch`] slot), so nothing is copied.
pub struct SendBatch {
    iov: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    ctrl: Box<[Ctrl]>,
    hdrs: Box<[libc::mmsghdr]>,
    len: usize,
}

impl SendBatch {
    pub fn new(capacity: usize) -> SendBatch {
        assert!(capacity > 0);
        SendBatch {
            iov: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ]
            .into_boxed_slice(),
            addrs: vec![zeroed_storage(); capacity].into_boxed_slice(),
            ctrl: vec![Ctrl([0; CTRL_LEN]); capacity].into_boxed_slice(),
            hdrs: vec![zeroed_hdr(); capacity].into_boxed_slice(),
            len: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.hdrs.len()
    }

    /// Queues `data` for `to`, sent from local address `src` if given (a wildcard socket's
    /// packet info). The caller must flush before `data`'s memory is written again or freed;
    /// on a full batch it returns `false` and queues nothing.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until the next [`Self::flush`].
    pub unsafe fn push(&mut self, data: &[u8], to: SocketAddr, src: Option<IpAddr>) -> bool {
        if self.is_full() {
            return false;
        }
        let i = self.len;
        let namelen = write_sockaddr(to, &mut self.addrs[i]);
        self.iov[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut self.iov[i];
        h.msg_iovlen = 1;
        h.msg_flags = 0;
        match src {
            Some(ip) => write_pktinfo(&mut self.ctrl[i], h, ip),
            None => {
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        self.len += 1;
        true
    }

    /// Sends everything queued from the non-blocking socket `fd`. A datagram the kernel
    /// refuses is counted in `failed` and skipped; a full socket buffer drops the rest
    /// (UDP: better than stalling every other client of this worker).
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let mut out = Flushed::default();
        let mut i = 0;
        while i < self.len {
            // SAFETY: headers i..len point at live iovecs/addresses owned by self and at
            // caller data that `push`'s contract keeps valid until now.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[i..].as_mut_ptr(),
                    (self.len - i) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                for h in &self.hdrs[i..i + r as usize] {
                    out.sent_bytes += h.msg_len as usize;
                }
                out.sent += r as usize;
                i += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    out.failed += self.len - i;
                    break;
                }
                // This datagram's destination is refused: skip it, keep the others.
                _ => {
                    out.failed += 1;
                    i += 1;
                }
            }
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "127.0.0.1:3478",
            "[::1]:49152",
            "[fe80::1%2]:5",
            "0.0.0.0:0",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut s = zeroed_storage();
            write_sockaddr(a, &mut s);
            assert_eq!(read_sockaddr(&s), Some(a));
        }
    }

    #[test]
    fn batch_send_and_receive_with_headroom() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
        let mut sb = SendBatch::new(4);
        let mut sent = 0;
        for p in &payloads {
            // SAFETY: payloads outlive every flush below.
            if !unsafe { sb.push(p, to, None) } {
                sent += sb.flush(tx.as_raw_fd()).sent;
                assert!(unsafe { sb.push(p, to, None) });
            }
        }
        let f = sb.flush(tx.as_raw_fd());
        sent += f.sent;
        assert_eq!(sent, 5);
        assert_eq!(f.failed, 0);

        let mut rb = RecvBatch::new(8, 128);
        let mut stats = NetStats::default();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            match rb.recv(rx.as_raw_fd(), 48, 4, &mut stats) {
                Ok(n) => {
                    for i in 0..n {
                        let r = rb.received(i);
                        assert_eq!(r.from, tx.local_addr().unwrap());
                        assert!(!r.truncated);
                        got.push(rb.payload(i).to_vec());
                        // The payload really sits at the headroom offset of its slot.
                        let at = rb.data_at();
                        assert_eq!(&rb.slot_mut(i)[at..at + r.len], &got.last().unwrap()[..]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(stats, NetStats::default(), "no GRO buffer, nothing dropped");
    }

    /// `count` datagrams of `len` bytes (first byte: the index) sent to `to` as one GSO
    /// message, so a GRO receiver gets them as one buffer.
    fn gso_burst(to: SocketAddr, count: usize, len: usize) -> Vec<Vec<u8>> {
        let data: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let mut d = vec![0x40 + i as u8; len];
                d[0] = i as u8;
                d
            })
            .collect();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut b = crate::net::gso::GsoBatch::new(count);
        for d in &data {
            // SAFETY: `data` outlives the flush.
            assert!(unsafe { b.push(d, to, None) });
        }
        assert_eq!(b.flush(tx.as_raw_fd()).sent, count);
        data
    }

    /// Receives until `want` datagrams arrived or were counted as `gro_overflow` in `stats`
    /// (or 5 s passed): the payloads received, each also checked to sit at the headroom
    /// offset of its slot with `tail` bytes after it.
    fn recv_datagrams(
        rb: &mut RecvBatch,
        rx: &UdpSocket,
        want: usize,
        (at, tail): (usize, usize),
        stats: &mut NetStats,
    ) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() + (stats.drop_gro_overflow as usize) < want
            && std::time::Instant::now() < deadline
        {
            match rb.recv(rx.as_raw_fd(), at, tail, stats) {
                Ok(n) => {
                    for i in 0..n {
                        let r = rb.received(i);
                        assert!(!r.truncated);
                        let p = rb.payload(i).to_vec();
                        let slot = rb.slot_mut(i);
                        assert!(slot.len() >= at + r.len + tail, "room after datagram {i}");
                        assert_eq!(&slot[at..at + r.len], &p[..]);
                        got.push(p);
                    }
                    // Framing in place (headroom before, tail after each payload) must not
                    // touch another datagram of the same GRO buffer.
                    if at > 0 || tail > 0 {
                        let before: Vec<Vec<u8>> = (0..n).map(|i| rb.payload(i).to_vec()).collect();
                        for i in 0..n {
                            let len = rb.received(i).len;
                            let slot = rb.slot_mut(i);
                            slot[..at].fill(0xEE);
                            slot[at + len..at + len + tail].fill(0xEE);
                        }
                        for (i, b) in before.iter().enumerate() {
                            assert_eq!(rb.payload(i), &b[..], "datagram {i} intact");
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn a_gro_buffer_is_split_into_its_datagrams_in_place_and_with_headroom() {
        // A relay socket has UDP_GRO on.
        let rx = crate::net::socket::relay_socket("127.0.0.1:0".parse().unwrap(), 1 << 20, true)
            .unwrap();
        let to = rx.local_addr().unwrap();
        let mut rb = RecvBatch::new(4, 48 + 65536 + 16);
        let mut stats = NetStats::default();

        // No headroom (a listener): the datagrams are used where they landed.
        let sent = gso_burst(to, 20, 100);
        assert_eq!(recv_datagrams(&mut rb, &rx, 20, (0, 0), &mut stats), sent);
        assert!(stats.gro_buffers > 0, "the kernel coalesced the burst");

        // Headroom and tail room (a relay socket): the further datagrams are copied out.
        let split = stats.gro_buffers;
        let mut sent = gso_burst(to, 40, 1200);
        sent.extend(gso_burst(to, 3, 7));
        assert_eq!(recv_datagrams(&mut rb, &rx, 43, (48, 16), &mut stats), sent);
        assert!(stats.gro_buffers > split, "the kernel coalesced the bursts");
        assert_eq!(stats.drop_gro_overflow, 0);
    }

    /// Sends `data` to `to` as one GSO message of `seg`-byte segments, straight through
    /// `sendmsg` (past `GsoBatch`'s limit of MAX_GSO_SEGMENTS per message).
    fn send_segments(to: SocketAddr, data: &[u8], seg: usize) -> io::Result<()> {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut addr = zeroed_storage();
        let namelen = write_sockaddr(to, &mut addr);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut ctrl = udp_segment::SegmentCtrl::new(seg as u16);
        let mut h = zeroed_hdr().msg_hdr;
        h.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        ctrl.attach(&mut h);
        // SAFETY: every pointer in `h` points at a local alive for the call.
        if unsafe { libc::sendmsg(tx.as_raw_fd(), &h, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[test]
    fn a_full_gro_buffer_of_the_largest_count_finds_room() {
        let rx = crate::net::socket::relay_socket("127.0.0.1:0".parse().unwrap(), 1 << 20, true)
            .unwrap();
        let to = rx.local_addr().unwrap();
        // MAX_GRO_SEGMENTS one-byte datagrams reach the GRO socket as one buffer.
        let data: Vec<u8> = (0..MAX_GRO_SEGMENTS as u8).collect();
        if let Err(e) = send_segments(to, &data, 1) {
            // Kernels before 6.10 take at most 64 segments per GSO message (the receive
            // side of those cannot see more either).
            eprintln!("SKIP: this kernel refuses {MAX_GRO_SEGMENTS} GSO segments: {e}");
            return;
        }
        let sent = gso_burst(to, 3, 7);
        let mut rb = RecvBatch::new(2, 48 + 65536 + 16);
        let mut stats = NetStats::default();
        let got = recv_datagrams(&mut rb, &rx, data.len() + 3, (48, 16), &mut stats);
        let want: Vec<Vec<u8>> = data.iter().map(|&b| vec![b]).chain(sent).collect();
        assert_eq!(got, want);
        assert_eq!(stats.drop_gro_overflow, 0);
        assert!(stats.gro_buffers >= 1);
    }

    #[test]
    fn gro_segments_without_room_are_counted_as_gro_overflow() {
        let rx = crate::net::socket::relay_socket("127.0.0.1:0".parse().unwrap(), 1 << 20, true)
            .unwrap();
        let to = rx.local_addr().unwrap();

        // Room for 8 datagrams per slot, a buffer of 20: 12 have no entry.
        let mut rb = RecvBatch::with_segments(1, 48 + 65536 + 16, 8);
        let mut stats = NetStats::default();
        let sent = gso_burst(to, 20, 100);
        let got = recv_datagrams(&mut rb, &rx, 20, (0, 0), &mut stats);
        assert!(stats.gro_buffers >= 1, "the kernel coalesced the burst");
        assert!(stats.drop_gro_overflow > 0, "overflow counted");
        assert_eq!(got.len() + stats.drop_gro_overflow as usize, 20);
        // What was delivered is whole and in order: the head of each buffer.
        assert!(got.iter().all(|d| sent.contains(d)));
        assert!(got.windows(2).all(|w| w[0][0] < w[1][0]));

        // More head and tail room than the spill area gives each datagram: only the first
        // of each buffer (it stays in its slot) is delivered, the rest counted.
        let mut rb = RecvBatch::new(1, 48 + 65536 + 64);
        let mut stats = NetStats::default();
        let sent = gso_burst(to, 5, 100);
        let got = recv_datagrams(&mut rb, &rx, 5, (48, MAX_SPILL_ROOM), &mut stats);
        assert!(stats.gro_buffers >= 1, "the kernel coalesced the burst");
        assert_eq!(got.len() + stats.drop_gro_overflow as usize, 5);
        assert_eq!(got.len() as u64, stats.gro_buffers, "one per buffer");
        assert_eq!(got[0], sent[0]);
        assert_eq!(stats.drop_truncated, 0, "not reported as truncated");
    }

    #[test]
    fn a_long_gro_buffer_leaves_an_entry_for_each_later_buffer() {
        let rx = crate::net::socket::relay_socket("127.0.0.1:0".parse().unwrap(), 1 << 20, true)
            .unwrap();
        let to = rx.local_addr().unwrap();
        // Two slots of 4 entries: 8 in all. A first buffer of 20 may use 7, never the 8th,
        // which the next buffer's first datagram needs.
        let mut rb = RecvBatch::with_segments(2, 65536, 4);
        let mut stats = NetStats::default();
        let first = gso_burst(to, 20, 100);
        let second = gso_burst(to, 1, 50);
        let got = recv_datagrams(&mut rb, &rx, 21, (0, 0), &mut stats);
        assert_eq!(got.len() + stats.drop_gro_overflow as usize, 21);
        assert_eq!(
            got.last(),
            second.last(),
            "the later datagram was delivered"
        );
        assert_eq!(got[0], first[0]);
    }

    #[test]
    fn oversized_datagram_is_flagged_truncated() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 200], rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Wait until it is queued, then read it non-blocking through the batch.
        let mut peek = [0u8; 1];
        rx.peek_from(&mut peek).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut rb = RecvBatch::new(2, 100);
        let mut stats = NetStats::default();
        assert_eq!(rb.recv(rx.as_raw_fd(), 0, 0, &mut stats).unwrap(), 1);
        assert!(rb.received(0).truncated);
        assert_eq!(
            rb.recv(rx.as_raw_fd(), 0, 0, &mut stats)
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn refused_destination_is_skipped_not_fatal() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let good = rx.local_addr().unwrap();
        // An IPv6 destination from an IPv4 socket fails with EAFNOSUPPORT / EINVAL.
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let data = [1u8; 8];
        let mut sb = SendBatch::new(4);
        unsafe {
            assert!(sb.push(&data, bad, None));
            assert!(sb.push(&data, good, None));
        }
        let f = sb.flush(tx.as_raw_fd());
        assert_eq!((f.sent, f.failed, f.sent_bytes), (1, 1, 8));
    }
}
