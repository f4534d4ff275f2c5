//! The byte stream under a TURN TCP connection: plain TCP, TLS (RFC 8656 §3.1, rustls'
//! non-async `ServerConnection` driven by the worker's mio socket), or not yet known on a
//! sniffing listener (the first byte decides: 0x16 opens a TLS handshake record).

use std::io::{self, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::ServerConnection;

use super::tcp::{InBuf, OutBuf};
use crate::stun::tcp_frame_len;

/// First byte of a TLS record carrying a handshake message (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;
/// Plaintext handed to rustls per round, only once its previous records have reached the
/// socket; the rest waits in [`OutBuf`], whose limits decide what is dropped, so the two
/// together stay bounded.
const TLS_ROUND: usize = 64 * 1024;

/// What a client connection speaks.
pub enum Link {
    Plain,
    /// A sniffing listener has not seen the first byte yet.
    Sniff,
    Tls(Box<ServerConnection>),
}

/// A TLS protocol failure (bad record, failed handshake), told apart from socket errors.
pub fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<rustls::Error>())
}

impl Link {
    /// A TLS link for a new connection.
    pub fn tls(config: &Arc<rustls::ServerConfig>) -> io::Result<Link> {
        let mut c = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        // Bounded by TLS_ROUND instead: a limit inside rustls could split a message.
        c.set_buffer_limit(None);
        Ok(Link::Tls(Box::new(c)))
    }

    /// True while a TLS handshake (or the sniffing byte) is still awaited.
    pub fn handshaking(&self) -> bool {
        match self {
            Link::Plain => false,
            Link::Sniff => true,
            Link::Tls(c) => c.is_handshaking(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// Reads application bytes into `inbuf`. `Ok(0)` is end of stream; `WouldBlock` means
    /// nothing more for now. A sniffing link first decides what it is (needs `tls`).
    pub fn fill(
        &mut self,
        sock: &mut TcpStream,
        inbuf: &mut InBuf,
        tls: Option<&Arc<rustls::ServerConfig>>,
    ) -> io::Result<usize> {
        if let Link::Sniff = self {
            let mut first = [0u8; 1];
            if sock.peek(&mut first)? == 0 {
                return Ok(0);
            }
            *self = match (first[0], tls) {
                (TLS_HANDSHAKE, Some(cfg)) => Link::tls(cfg)?,
                _ => Link::Plain,
            };
        }
        match self {
            Link::Plain | Link::Sniff => inbuf.fill(sock),
            Link::Tls(c) => loop {
                // Plaintext rustls already holds comes first: read_tls refuses more while
                // its plaintext buffer is full.
                match inbuf.fill(&mut c.reader()) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed TCP without close_notify: an end of stream all the same.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if c.read_tls(sock)? == 0 {
                    return Ok(0);
                }
                if let Err(e) = c.process_new_packets() {
                    // Best effort: tell the client why (the alert rustls queued).
                    let _ = c.write_tls(sock);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            },
        }
    }

    /// Writes queued TURN frames (and TLS handshake records) as far as the socket takes
    /// them. `Ok(true)` when nothing is left.
    pub fn flush(&mut self, sock: &mut TcpStream, out: &mut OutBuf) -> io::Result<bool> {
        self.flush_as(sock, out, true)
    }

    /// As [`Self::flush`]; `framed: false` for the raw bytes of a spliced RFC 6062 data
    /// connection (§5.4), which must not be cut at what looks like a TURN frame.
    pub fn flush_as(
        &mut self,
        sock: &mut TcpStream,
        out: &mut OutBuf,
        framed: bool,
    ) -> io::Result<bool> {
        let Link::Tls(c) = self else {
            return out.write_to(sock);
        };
        loop {
            while c.wants_write() {
                match c.write_tls(sock) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if out.queued() == 0 {
                return Ok(true);
            }
            if c.is_handshaking() {
                // rustls would hold the plaintext until the handshake ends; it stays here.
                return Ok(false);
            }
            out.write_to(&mut Plaintext {
                conn: c,
                budget: TLS_ROUND,
                framed,
            })?;
        }
    }

    /// Starts closing the sending direction: TLS queues close_notify (RFC 8446 §6.1),
    /// which [`Self::flush`] then writes; the caller shuts TCP down once that returns true.
    pub fn send_close(&mut self) {
        if let Link::Tls(c) = self {
            c.send_close_notify();
        }
    }
}

/// rustls' plaintext writer taking one TURN message per call, so each message travels in
/// its own TLS record as coturn sends them: clients such as coturn's uclient read one
/// record as one message. Past `budget` it reports `WouldBlock` and [`OutBuf`] keeps the rest.
/// Unframed (spliced raw bytes) it takes up to `budget` bytes per call.
struct Plaintext<'a> {
    conn: &'a mut ServerConnection,
    budget: usize,
    framed: bool,
}

impl Write for Plaintext<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Only whole frames are ever queued; the fallback just keeps bytes moving. `b` is
        // never empty (OutBuf writes only what it holds), so neither is the slice.
        let n = match (self.framed, tcp_frame_len(b)) {
            (true, Ok(Some(n))) if n > 0 && n <= b.len() => n,
            (true, _) => b.len(),
            (false, _) => b.len().min(self.budget),
        };
        let n = self.conn.writer().write(&b[..n])?;
        self.budget = self.budget.saturating_sub(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
