//! RFC 6455 server side for the signaling sockets (`/ws`, `/peerjs`): the opening handshake
//! (§4.2), a sans-IO decoder of client frames (§5: masking, fragmentation, control frames
//! between fragments, size limit, UTF-8 text, close codes) and the encoding of server frames.
//!
//! Built for many idle connections: the decoder owns no read buffer. The driver reads into
//! a scratch buffer of its own (on its stack, only while it polls) and hands the bytes here;
//! a message that arrives whole within one read is unmasked in place and handed out as a
//! slice of that buffer, and only a message (or control frame) split over reads is kept,
//! in an allocation of its size that is freed once it is complete.
//!
//! It must not know signaling messages, peers or sockets (that is [`super::driver`]); it
//! negotiates no extension (RSV bits set are a protocol error) and serves the relay's
//! `/relay` sockets not at all (those keep their own codec and buffers).

use axum::extract::FromRequestParts;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Opcodes (§5.2).
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The longest control frame payload (§5.5).
const MAX_CONTROL: usize = 125;

/// The `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (§4.2.2, step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Whether a comma-separated header holds `token` (case-insensitive, §4.2.1).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A valid WebSocket opening request (§4.2.1), its socket to come once the 101 is sent.
pub struct Upgrade {
    key: HeaderValue,
    offered: Vec<String>,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is not a WebSocket opening handshake.
fn refuse(status: StatusCode, why: &'static str) -> Response {
    let mut r = (status, why).into_response();
    if status == StatusCode::UPGRADE_REQUIRED {
        // §4.2.2: a version we do not speak is answered with the one we do.
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    r
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket opening request is a GET",
            ));
        }
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade")
            || !header_has_token(h, header::UPGRADE, "websocket")
        {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "expected Connection: upgrade and Upgrade: websocket",
            ));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
        };
        let offered = h
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Self {
            key,
            offered,
            on_upgrade,
        })
    }
}

impl Upgrade {
    /// The 101 answer selecting `protocol` when the client offered it (§4.2.2 step 5.5:
    /// never one it did not offer), and the upgraded socket to come.
    pub fn accept(self, protocol: Option<&'static str>) -> (Response, hyper::upgrade::OnUpgrade) {
        let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept_key(self.key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(p) = protocol.filter(|p| self.offered.iter().any(|o| o == p)) {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        (r, self.on_upgrade)
    }
}

/// A frame or message decoded from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The client's Close: its status code and reason, if it gave one (§5.5.1).
    Close(Option<(u16, &'a str)>),
}

/// A client breaking the protocol: the connection is closed with [`Fault::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 1002 (§7.4.1), with what was wrong.
    Protocol(&'static str),
    /// 1007: a text message (or close reason) that is not UTF-8 (§8.1).
    BadUtf8,
    /// 1009: a message over the limit, refused at its frame header before buffering.
    TooBig,
}

impl Fault {
    /// The close status code and reason sent for it (§7.4.1).
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Fault::Protocol(why) => (1002, why),
            Fault::BadUtf8 => (1007, "text is not UTF-8"),
            Fault::TooBig => (1009, "message too large"),
        }
    }
}

/// The frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    len: u64,
    /// Payload bytes not yet read.
    remaining: u64,
    mask: [u8; 4],
    /// Where in the mask the next payload byte is.
    mask_pos: usize,
    /// Read past, not kept: part of a message refused as too large.
    skip: bool,
}

/// The client-frame decoder of one connection (§5.2, §5.4): a few dozen bytes while idle.
#[derive(Debug)]
pub struct Decoder {
    /// The largest message (all its fragments) accepted.
    limit: usize,
    /// A frame header split over reads (at most 14 bytes).
    head: [u8; 14],
    head_len: u8,
    frame: Option<Frame>,
    /// The opcode of a fragmented data message in progress (§5.4).
    message: Option<u8>,
    /// The bytes of a data message split over frames or reads; empty (no allocation)
    /// otherwise.
    data: Vec<u8>,
    /// A control frame's payload split over reads.
    control: Vec<u8>,
    /// The message in progress was refused as too large: its frames are read past.
    skip_message: bool,
    /// A Close was decoded: nothing after it is read (§5.5.1).
    closed: bool,
}

/// The header of a masked client frame, if `b` holds all of it: (frame, header bytes).
fn parse_header(b: &[u8]) -> Result<Option<(Frame, usize)>, Fault> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(Fault::Protocol("reserved bits set without an extension"));
    }
    let opcode = b[0] & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(Fault::Protocol("unknown opcode"));
    }
    if b[1] & 0x80 == 0 {
        return Err(Fault::Protocol("client frames must be masked"));
    }
    let (len, at) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[2..10]);
            let len = u64::from_be_bytes(x);
            if len >> 63 != 0 {
                return Err(Fault::Protocol("frame length has its top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && (!fin || len > MAX_CONTROL as u64) {
        return Err(Fault::Protocol(
            "control frames are unfragmented and at most 125 bytes",
        ));
    }
    if b.len() < at + 4 {
        return Ok(None);
    }
    let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    Ok(Some((
        Frame {
            opcode,
            fin,
            len,
            remaining: len,
            mask,
            mask_pos: 0,
            skip: false,
        },
        at + 4,
    )))
}

/// XORs `b` with the mask, starting at `pos` in it (§5.3).
fn unmask(b: &mut [u8], mask: [u8; 4], pos: usize) {
    let m = [
        mask[pos % 4],
        mask[(pos + 1) % 4],
        mask[(pos + 2) % 4],
        mask[(pos + 3) % 4],
    ];
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = b.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut x = [0u8; 8];
        x.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(x) ^ m8).to_ne_bytes());
    }
    for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x ^= m[i % 4];
    }
}

/// Close codes a client may send (§7.4.1, §7.4.2 and the IANA registry): never 1004-1006,
/// 1015 or an unassigned one.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl Decoder {
    /// A decoder accepting messages of up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            head: [0; 14],
            head_len: 0,
            frame: None,
            message: None,
            data: Vec::new(),
            control: Vec::new(),
            skip_message: false,
            closed: false,
        }
    }

    /// Bytes held for a message or frame split over reads (0 while idle).
    pub fn held(&self) -> usize {
        self.data.capacity() + self.control.capacity()
    }

    /// Decodes `buf` (just read; unmasked in place), calling `on` for each message and
    /// control frame in order. Stops after a Close. A fault ends the connection; what
    /// came before it in `buf` has been handed out. After [`Fault::TooBig`] the refused
    /// message is read past and only a Close is still handed out (from this read and later
    /// ones), so that the closing handshake can complete.
    pub fn feed(&mut self, buf: &mut [u8], on: &mut impl FnMut(Event<'_>)) -> Result<(), Fault> {
        let mut i = 0;
        let r = self.feed_from(buf, &mut i, on);
        if r == Err(Fault::TooBig) {
            let _ = self.feed_from(buf, &mut i, &mut |e| {
                if let Event::Close(_) = e {
                    on(e)
                }
            });
        }
        r
    }

    fn feed_from(
        &mut self,
        buf: &mut [u8],
        i: &mut usize,
        on: &mut impl FnMut(Event<'_>),
    ) -> Result<(), Fault> {
        while !self.closed {
            let mut f = match self.frame {
                Some(f) if f.remaining > 0 && *i == buf.len() => return Ok(()),
                Some(f) => f,
                None if *i == buf.len() => return Ok(()),
                None => match self.header(buf, i)? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            let take = usize::try_from(f.remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len() - *i);
            if f.skip {
                *i += take;
                f.remaining -= take as u64;
                self.frame = (f.remaining > 0).then_some(f);
                continue;
            }
            let chunk = &mut buf[*i..*i + take];
            *i += take;
            unmask(chunk, f.mask, f.mask_pos);
            f.mask_pos = (f.mask_pos + take) % 4;
            f.remaining -= take as u64;
            // The whole payload is in this read: hand it out from here.
            let whole = take as u64 == f.len;
            if f.opcode >= OP_CLOSE {
                if f.remaining > 0 || !whole {
                    self.control.extend_from_slice(chunk);
                }
                if f.remaining > 0 {
                    self.frame = Some(f);
                    continue;
                }
                self.frame = None;
                let control = std::mem::take(&mut self.control);
                let payload = if whole { &*chunk } else { &control[..] };
                self.control_frame(f.opcode, payload, on)?;
                continue;
            }
            let single = f.fin && self.message.is_none() && whole;
            if !single {
                if self.data.is_empty() {
                    // One allocation for the frame (at most the limit, checked at its head).
                    self.data.reserve_exact(usize::try_from(f.len).unwrap_or(0));
                }
                self.data.extend_from_slice(chunk);
            }
            if f.remaining > 0 {
                self.frame = Some(f);
                continue;
            }
            self.frame = None;
            if !f.fin {
                continue;
            }
            let opcode = self.message.take().unwrap_or(f.opcode);
            let data = std::mem::take(&mut self.data);
            let payload = if single { &*chunk } else { &data[..] };
            match opcode {
                OP_TEXT => on(Event::Text(
                    std::str::from_utf8(payload).map_err(|_| Fault::BadUtf8)?,
                )),
                _ => on(Event::Binary(payload)),
            }
        }
        Ok(())
    }

    /// Reads the next frame header from `buf[*i..]` (or what is held of it) and checks it
    /// against the message in progress and the limit.
    fn header(&mut self, buf: &[u8], i: &mut usize) -> Result<Option<Frame>, Fault> {
        let held = usize::from(self.head_len);
        let rest = &buf[*i..];
        let parsed = if held == 0 {
            parse_header(rest)?
        } else {
            let add = (self.head.len() - held).min(rest.len());
            self.head[held..held + add].copy_from_slice(&rest[..add]);
            parse_header(&self.head[..held + add])?
        };
        let Some((f, n)) = parsed else {
            // Keep the partial header (under 14 bytes) for the next read.
            let add = (self.head.len() - held).min(rest.len());
            if held == 0 {
                self.head[..add].copy_from_slice(&rest[..add]);
            }
            self.head_len = (held + add) as u8;
            *i = buf.len();
            return Ok(None);
        };
        *i += n - held;
        self.head_len = 0;
        if f.opcode == OP_CONT && self.skip_message {
            self.skip_message = !f.fin;
            self.message = self.message.filter(|_| !f.fin);
            self.frame = Some(Frame { skip: true, ..f });
            return Ok(Some(Frame { skip: true, ..f }));
        }
        if f.opcode < OP_CLOSE {
            match (f.opcode, self.message) {
                (OP_CONT, None) => {
                    return Err(Fault::Protocol("continuation frame without a message"))
                }
                (OP_TEXT | OP_BINARY, Some(_)) => {
                    return Err(Fault::Protocol(
                        "new message before the fragmented one ended",
                    ))
                }
                _ => {}
            }
            let so_far = self.data.len() as u64;
            if so_far.saturating_add(f.len) > self.limit as u64 {
                // Read past the rest of the message, never keeping it, so that the client's
                // Close can still be found while the connection closes.
                self.data = Vec::new();
                self.skip_message = !f.fin;
                self.message = if f.fin { None } else { Some(f.opcode) };
                self.frame = Some(Frame { skip: true, ..f });
                return Err(Fault::TooBig);
            }
            if f.opcode != OP_CONT && !f.fin {
                self.message = Some(f.opcode);
            }
        }
        self.frame = Some(f);
        Ok(Some(f))
    }

    fn control_frame(
        &mut self,
        opcode: u8,
        payload: &[u8],
        on: &mut impl FnMut(Event<'_>),
    ) -> Result<(), Fault> {
        match opcode {
            OP_PING => on(Event::Ping(payload)),
            OP_PONG => on(Event::Pong),
            _ => {
                let close = match payload.len() {
                    0 => None,
                    1 => return Err(Fault::Protocol("close payload of one byte")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !valid_close_code(code) {
                            return Err(Fault::Protocol("invalid close code"));
                        }
                        let reason =
                            std::str::from_utf8(&payload[2..]).map_err(|_| Fault::BadUtf8)?;
                        Some((code, reason))
                    }
                };
                self.closed = true;
                on(Event::Close(close));
            }
        }
        Ok(())
    }
}

/// The header of an unmasked server frame with FIN set (§5.2): bytes and length.
pub fn frame_header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(l) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&l.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A Close payload: the code, then the reason cut at 123 bytes on a character boundary
/// (§5.5.1).
pub fn close_payload(code: u16, reason: &str) -> ([u8; MAX_CONTROL], usize) {
    let mut p = [0u8; MAX_CONTROL];
    p[..2].copy_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    (p, 2 + end)
}

#[cfg(test)]
#[path = "ws_tests.rs"]
pub(crate) mod tests;
