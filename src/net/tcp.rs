//! TURN over TCP (RFC 8656 §3.1) connection plumbing: a bounded read buffer cut into frames,
//! a bounded write queue, and the per-source-IP connection limit.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Largest frame a client may send: a STUN header plus the largest length field, or a
/// ChannelData header plus the largest payload and its padding (RFC 8656 §12.5).
pub const MAX_FRAME: usize = 20 + 0xffff;

/// Initial read buffer size; it grows to [`MAX_FRAME`] only for clients sending big frames,
/// so idle or control-only connections stay small.
const INITIAL_READ: usize = 4096;

/// Capacity an empty buffer may keep; past it, [`InBuf::trim`] and [`OutBuf::trim`] give
/// the memory back, so a burst (up to 256 KiB a queue) is not held for the connection's
/// life.
const KEEP_WHEN_EMPTY: usize = 16 * 1024;

/// Bytes received on a TCP connection and not yet consumed as whole frames.
#[derive(Debug)]
pub struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Largest size the buffer grows to: [`MAX_FRAME`] for framed TURN, more for a
    /// spliced RFC 6062 data connection (where it is the client→peer queue).
    max: usize,
}

impl Default for InBuf {
    fn default() -> Self {
        InBuf {
            buf: vec![0; INITIAL_READ],
            start: 0,
            end: 0,
            max: MAX_FRAME,
        }
    }
}

impl InBuf {
    /// Reads once from `r` into free space. `Ok(0)` is end of stream.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < self.max {
                let grown = (self.buf.len() * 2).min(self.max);
                self.buf.resize(grown, 0);
            } else {
                // Only reachable if the framer accepted a frame longer than MAX_FRAME.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame too large",
                ));
            }
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Lets the buffer grow to `max` bytes (a spliced data connection's queue).
    pub fn set_max(&mut self, max: usize) {
        self.max = self.max.max(max);
    }

    /// Whether [`Self::fill`] has room to read into (otherwise the reader must wait
    /// until bytes are consumed).
    pub fn has_room(&self) -> bool {
        self.end < self.buf.len() || self.start > 0 || self.buf.len() < self.max
    }

    /// Unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Shrinks an empty buffer that grew for a burst back to its initial size; returns the
    /// bytes released. Called from housekeeping, not per read, so a steady stream does not
    /// reallocate.
    pub fn trim(&mut self) -> usize {
        if self.start != self.end || self.buf.len() <= KEEP_WHEN_EMPTY {
            return 0;
        }
        let freed = self.buf.len() - INITIAL_READ;
        self.buf = vec![0; INITIAL_READ];
        self.start = 0;
        self.end = 0;
        freed
    }

    /// Drops the first `n` unconsumed bytes (a processed frame).
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Bytes queued for a TCP client. Peer data respects `data_limit` (dropped past it, since a
/// slow client must not grow memory without bound); control responses may use up to
/// `hard_limit`, past which the connection is closed rather than losing one silently.
#[derive(Debug)]
pub struct OutBuf {
    buf: Vec<u8>,
    start: usize,
    data_limit: usize,
    hard_limit: usize,
}

impl OutBuf {
    pub fn new(data_limit: usize, hard_limit: usize) -> OutBuf {
        OutBuf {
            buf: Vec::new(),
            start: 0,
            data_limit,
            hard_limit: hard_limit.max(data_limit),
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Room left for data before [`Self::push_data`] refuses it.
    pub fn data_room(&self) -> usize {
        self.data_limit.saturating_sub(self.queued())
    }

    fn push(&mut self, bytes: &[u8], limit: usize) -> bool {
        if self.queued() + bytes.len() > limit {
            return false;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        true
    }

    /// Queues relayed peer data; `false` (nothing queued) when the queue is at its data limit.
    pub fn push_data(&mut self, bytes: &[u8]) -> bool {
        self.push(bytes, self.data_limit)
    }

    /// Queues a control response; `false` means the client is not reading at all.
    pub fn push_control(&mut self, bytes: &[u8]) -> bool {
        self.push(bytes, self.hard_limit)
    }

    /// Frees an empty queue's memory once it grew past a few frames; returns the bytes
    /// released. Called from housekeeping, like [`InBuf::trim`].
    pub fn trim(&mut self) -> usize {
        if self.queued() != 0 || self.buf.capacity() <= KEEP_WHEN_EMPTY {
            return 0;
        }
        let freed = self.buf.capacity();
        self.buf = Vec::new();
        self.start = 0;
        freed
    }

    /// Writes as much as the socket takes. `Ok(true)` when the queue is now empty.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<bool> {
        while self.start < self.buf.len() {
            match w.write(&self.buf[self.start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.start = 0;
        Ok(true)
    }
}

/// Open TCP connections per client IP, shared by all workers (touched on accept and close
/// only, never per packet).
#[derive(Clone, Debug)]
pub struct PerIpLimit {
    max: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// One counted connection; releases its slot when dropped.
#[derive(Debug)]
pub struct IpPermit {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl PerIpLimit {
    pub fn new(max: u32) -> PerIpLimit {
        PerIpLimit {
            max,
            open: Arc::default(),
        }
    }

    /// A permit for one more connection from `ip`, or `None` at the limit.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<IpPermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            ip,
            open: Arc::clone(&self.open),
        })
    }

    /// Connections open from `ip`.
    #[cfg(test)]
    pub fn open(&self, ip: IpAddr) -> u32 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader handing out its bytes in fixed-size pieces, like a slow TCP stream.
    struct Pieces<'a>(&'a [u8], usize);
    impl Read for Pieces<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(self.0.len()).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn inbuf_reassembles_frames_split_across_reads_and_grows_for_big_ones() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[1u8; 10]);
        stream.extend_from_slice(&[2u8; 50_000]);
        stream.extend_from_slice(&[3u8; 7]);
        let mut r = Pieces(&stream, 1000);
        let mut b = InBuf::default();
        let mut frames = Vec::new();
        for want in [10usize, 50_000, 7] {
            while b.data().len() < want {
                assert!(b.fill(&mut r).unwrap() > 0);
            }
            frames.push(b.data()[..want].to_vec());
            b.consume(want);
        }
        assert_eq!(frames[0], vec![1; 10]);
        assert_eq!(frames[1], vec![2; 50_000]);
        assert_eq!(frames[2], vec![3; 7]);
        assert!(b.data().is_empty());
        assert_eq!(b.fill(&mut r).unwrap(), 0);
    }

    #[test]
    fn inbuf_refuses_to_grow_past_max_frame() {
        let big = vec![0u8; MAX_FRAME + 10];
        let mut r = Pieces(&big, MAX_FRAME + 10);
        let mut b = InBuf::default();
        let mut total = 0;
        let err = loop {
            match b.fill(&mut r) {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(total, MAX_FRAME);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// A writer accepting `room` bytes, then WouldBlock.
    struct Slow {
        got: Vec<u8>,
        room: usize,
    }
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn outbuf_drops_data_past_its_limit_but_keeps_control_and_order() {
        let mut q = OutBuf::new(100, 150);
        assert!(q.push_data(&[1; 60]));
        assert!(
            !q.push_data(&[2; 60]),
            "data past the data limit is refused"
        );
        assert!(q.push_control(&[3; 60]), "control may use the hard limit");
        assert!(
            !q.push_control(&[4; 60]),
            "past the hard limit even control is refused"
        );
        let mut w = Slow {
            got: vec![],
            room: 70,
        };
        assert!(!q.write_to(&mut w).unwrap());
        assert_eq!(q.queued(), 50);
        w.room = 1000;
        assert!(q.write_to(&mut w).unwrap());
        let mut want = vec![1u8; 60];
        want.extend_from_slice(&[3; 60]);
        assert_eq!(w.got, want);
    }

    #[test]
    fn trim_releases_burst_memory_only_when_empty() {
        let burst = vec![7u8; 200_000];
        let mut r = Pieces(&burst, 65_536);
        let mut b = InBuf::default();
        b.set_max(256 * 1024);
        while b.data().len() < burst.len() {
            b.fill(&mut r).unwrap();
        }
        assert_eq!(b.trim(), 0, "queued bytes are never dropped");
        b.consume(burst.len() - 1);
        assert_eq!(b.trim(), 0);
        b.consume(1);
        assert!(b.trim() >= 200_000 - INITIAL_READ);
        assert_eq!(b.trim(), 0, "already small");
        // Still usable after a trim.
        let mut r = Pieces(&[1, 2, 3], 3);
        assert_eq!(b.fill(&mut r).unwrap(), 3);
        assert_eq!(b.data(), &[1, 2, 3]);

        let mut q = OutBuf::new(256 * 1024, 1024 * 1024);
        assert!(q.push_data(&burst));
        assert_eq!(q.trim(), 0, "queued bytes are never dropped");
        let mut w = Slow {
            got: vec![],
            room: usize::MAX,
        };
        assert!(q.write_to(&mut w).unwrap());
        assert_eq!(w.got, burst);
        assert!(q.trim() >= 200_000);
        assert_eq!(q.trim(), 0);
        assert!(q.push_control(&[9; 10]));
        assert_eq!(q.queued(), 10);
    }

    #[test]
    fn per_ip_limit_counts_and_releases() {
        let l = PerIpLimit::new(2);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let other: IpAddr = "127.0.0.10".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire(other).is_some());
        drop(a);
        assert_eq!(l.open(ip), 1);
        assert!(l.try_acquire(ip).is_some());
    }
}
