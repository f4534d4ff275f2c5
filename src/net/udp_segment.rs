//! The UDP segmentation control messages of linux/udp.h: `UDP_SEGMENT` (GSO on send, Linux
//! 4.18+: one message the kernel cuts into equal datagrams) and `UDP_GRO` (on receive,
//! Linux 5.0+: the segment size of a buffer holding several coalesced datagrams), with the
//! limits both sides work within.
//!
//! Owns only the constants and the writing/reading of these control messages; it must not
//! send, receive or hold state. Shared by `gso.rs` and `mmsg.rs`, the hot-path test
//! (public for it) and the load generator (`bench/loadgen`, through `#[path]`), so there is
//! one copy of the cmsg layout.

/// linux/udp.h: the GSO segment size control message and socket option (not in every libc
/// target).
pub const UDP_SEGMENT: libc::c_int = 103;
/// linux/udp.h: the GRO socket option and the segment size control message on receive.
pub const UDP_GRO: libc::c_int = 104;
/// Segments in one GSO message: UDP_MAX_SEGMENTS is 64 on kernels before 6.10, 128 since;
/// 64 works on both.
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes in one GSO message: an IPv6 UDP payload's limit (65535 - 40 - 8), rounded down.
pub const MAX_GSO_BYTES: usize = 65000;
/// Datagrams one received GRO buffer can hold at most: forwarded traffic is coalesced up to
/// UDP_GRO_CNT_MAX (64), but a local GSO message reaches a GRO socket uncut, with up to
/// UDP_MAX_SEGMENTS (128 since Linux 6.10) segments.
pub const MAX_GRO_SEGMENTS: usize = 128;

/// Writes a `UDP_SEGMENT` control message for segments of `seg` bytes at byte `at` of the
/// control buffer `buf` (after the messages already in `buf[..at]`); returns the control
/// length to put in the `msghdr` (`at` plus the message's `CMSG_SPACE`).
///
/// Panics when `buf` is not aligned for `cmsghdr`, `at` is not a `CMSG_ALIGN` boundary or
/// the message does not fit: the buffers are fixed at build time, so that is a bug.
pub fn write_segment(buf: &mut [u8], at: usize, seg: u16) -> usize {
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
    let align = std::mem::align_of::<libc::cmsghdr>();
    assert!(
        (buf.as_ptr() as usize) % align == 0 && at % align == 0 && at + space <= buf.len(),
        "UDP_SEGMENT control message does not fit"
    );
    let msg = &mut buf[at..at + space];
    msg.fill(0);
    let hdr = libc::cmsghdr {
        cmsg_len: len as _,
        cmsg_level: libc::SOL_UDP,
        cmsg_type: UDP_SEGMENT,
    };
    let data_at = len - 2;
    // SAFETY: `msg` holds CMSG_SPACE(2) bytes, room for the header and its u16 at CMSG_DATA's
    // offset (CMSG_LEN(2) - 2); the pointer is aligned for cmsghdr (asserted above).
    unsafe {
        std::ptr::write(msg.as_mut_ptr().cast::<libc::cmsghdr>(), hdr);
    }
    msg[data_at..data_at + 2].copy_from_slice(&seg.to_ne_bytes());
    at + space
}

/// The segment size a `UDP_GRO` control message carries; `None` for any other message (or
/// a nonsensical size).
///
/// # Safety
/// `c` must point at a control message header the kernel wrote, its data following it.
pub unsafe fn read_gro(c: *const libc::cmsghdr) -> Option<usize> {
    // SAFETY: the caller's contract: a complete control message at `c`.
    unsafe {
        if (*c).cmsg_level != libc::SOL_UDP || (*c).cmsg_type != UDP_GRO {
            return None;
        }
        let size: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
        usize::try_from(size).ok().filter(|&s| s > 0)
    }
}

/// A control buffer holding just one `UDP_SEGMENT` message, for senders without other
/// control messages (the load generator, tests).
#[repr(C, align(8))]
pub struct SegmentCtrl([u8; 32]);

impl SegmentCtrl {
    /// A control buffer asking for segments of `seg` bytes.
    pub fn new(seg: u16) -> SegmentCtrl {
        let mut c = SegmentCtrl([0; 32]);
        let len = write_segment(&mut c.0, 0, seg);
        debug_assert!(len <= c.0.len());
        c
    }

    /// Points `hdr`'s control buffer at this message; it must outlive the send.
    pub fn attach(&mut self, hdr: &mut libc::msghdr) {
        // SAFETY: CMSG_SPACE only computes a size.
        let len = unsafe { libc::CMSG_SPACE(2) };
        hdr.msg_control = self.0.as_mut_ptr().cast();
        hdr.msg_controllen = len as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_segment_message_reads_back_through_the_cmsg_macros() {
        let mut ctrl = SegmentCtrl::new(1200);
        // SAFETY: an all-zero msghdr is valid; only its control fields are used.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        ctrl.attach(&mut h);
        // SAFETY: the control buffer set by `attach` is alive and holds one message.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            assert!(!c.is_null());
            assert_eq!(
                ((*c).cmsg_level, (*c).cmsg_type),
                (libc::SOL_UDP, UDP_SEGMENT)
            );
            let seg: u16 = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
            assert_eq!(seg, 1200);
            assert!(libc::CMSG_NXTHDR(&h, c).is_null(), "one message only");
            // A segment message is not a GRO message.
            assert_eq!(read_gro(c), None);
        }
    }

    #[test]
    fn a_segment_message_goes_after_those_already_in_the_buffer() {
        #[repr(C, align(8))]
        struct Buf([u8; 64]);
        let mut b = Buf([0xAA; 64]);
        let first = write_segment(&mut b.0, 0, 100);
        let end = write_segment(&mut b.0, first, 7);
        assert_eq!(end, 2 * first);
        // SAFETY: an all-zero msghdr; its control buffer points at `b`, alive below.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_control = b.0.as_mut_ptr().cast();
        h.msg_controllen = end as _;
        let mut sizes = Vec::new();
        // SAFETY: `b` holds `end` bytes of well-formed control messages.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h);
            while !c.is_null() {
                sizes.push(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>()));
                c = libc::CMSG_NXTHDR(&h, c);
            }
        }
        assert_eq!(sizes, [100, 7]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_message_past_the_buffer_is_refused() {
        let mut c = SegmentCtrl([0; 32]);
        write_segment(&mut c.0, 16, 1);
    }
}
