//! TEMPORARY stand-in for `crate::stun` framing until the codec lands on main.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;

pub const CHANNEL_DATA_HEADER: usize = 4;
pub const DATA_INDICATION_HEADROOM: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData { channel: u16, len: usize },
    Invalid,
}

pub fn classify(b: &[u8]) -> Kind {
    if b.len() >= 20 && b[0] & 0xc0 == 0 {
        let len = u16::from_be_bytes([b[2], b[3]]) as usize;
        if 20 + len == b.len() {
            return Kind::Stun;
        }
    }
    if b.len() >= 4 && b[0] & 0xc0 == 0x40 {
        let channel = u16::from_be_bytes([b[0], b[1]]);
        let len = u16::from_be_bytes([b[2], b[3]]) as usize;
        if 4 + len <= b.len() && channel <= 0x4fff {
            return Kind::ChannelData { channel, len };
        }
    }
    Kind::Invalid
}

#[derive(Debug)]
pub struct Garbage;

pub fn tcp_frame_len(b: &[u8]) -> Result<Option<usize>, Garbage> {
    if b.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    match b[0] & 0xc0 {
        0 => Ok(Some(20 + len)),
        0x40 => Ok(Some(4 + len.div_ceil(4) * 4)),
        _ => Err(Garbage),
    }
}

pub fn write_channel_data_header(dst: &mut [u8], channel: u16, payload_len: u16) {
    dst[..2].copy_from_slice(&channel.to_be_bytes());
    dst[2..4].copy_from_slice(&payload_len.to_be_bytes());
}

pub fn write_data_indication(
    _buf: &mut [u8],
    payload_at: usize,
    payload_len: usize,
    _peer: SocketAddr,
    _txid: [u8; 12],
) -> Range<usize> {
    payload_at..payload_at + payload_len
}
