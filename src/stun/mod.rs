//! STUN wire format only (RFC 8489): classification, ChannelData framing (RFC 8656 §12),
//! TCP stream framing, Data indication framing (RFC 8656 §11.6), a small allocation-free
//! message writer, one raw attribute walker, error codes and MESSAGE-INTEGRITY checks. Zero-copy over `&[u8]`.
//!
//! Owns bytes-on-the-wire only. It must not hold state, know about allocations or users,
//! touch sockets or clocks. Message parsing itself is `stun_types::message::Message`.

mod attrs;
mod channel_data;
mod data_indication;
mod error_code;
mod framing;
mod integrity;
mod writer;

#[cfg(test)]
mod rfc5769_tests;

pub use attrs::{attributes, connection_bind_id, find_attr, Attributes, RawAttr};
pub use channel_data::{write_channel_data_header, ChannelNumber, CHANNEL_DATA_HEADER};
pub use data_indication::{write_data_indication, DATA_INDICATION_HEADROOM};
pub use error_code::ErrorCode;
pub use framing::{tcp_frame_len, FrameError};
pub use integrity::{find_integrity, verify_integrity, IntegrityError, IntegrityKind};
#[cfg(test)]
pub(crate) use writer::test_message;
pub use writer::{MessageWriter, WriteError};

/// The magic cookie of every RFC 8489 message (§5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// STUN header length (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;

/// First and last accepted channel numbers. RFC 8656 §12 narrowed the range to
/// 0x4000-0x4FFF, but RFC 5766 §11 clients pick from 0x4000-0x7FFF: coturn's client
/// library (`turnutils_uclient` among its users) draws uniformly from it, 0x7FFF included,
/// and coturn accepts every one; so do we (refusing 0x7FFF failed one bind in 16384).
/// Every number of this range starts with the bits 01, so ChannelData stays distinct from
/// STUN, DTLS and RTP.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// Method numbers (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 §6.1.
    pub const CONNECT: u16 = 0x00A;
    pub const CONNECTION_BIND: u16 = 0x00B;
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// Message classes (RFC 8489 §5), as the bits they set in the message type.
pub mod class {
    pub const REQUEST: u16 = 0x0000;
    pub const INDICATION: u16 = 0x0010;
    pub const SUCCESS: u16 = 0x0100;
    pub const ERROR: u16 = 0x0110;
}

/// Builds the 14-bit message type from a method and a class (RFC 8489 §5, figure 3).
pub const fn message_type(method: u16, class: u16) -> u16 {
    (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class
}

/// Splits a message type into its method and class (RFC 8489 §5, figure 3): the inverse
/// of [`message_type`].
pub const fn split_message_type(t: u16) -> (u16, u16) {
    let method = ((t & 0x3E00) >> 2) | ((t & 0x00E0) >> 1) | (t & 0x000F);
    (method, t & 0x0110)
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
}

/// What a datagram received on a STUN/TURN UDP port is (RFC 8656 §12, RFC 7983 demux).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A STUN message whose header and length are consistent with the datagram.
    Stun,
    /// ChannelData: the payload is `datagram[4..4 + len]`.
    ChannelData { channel: ChannelNumber, len: usize },
    /// Neither (drop and count).
    Invalid,
}

/// Classifies a UDP datagram by its first two bits (RFC 8656 §12) and checks lengths.
///
/// STUN: 20-byte header, magic cookie, length a multiple of 4 that matches the datagram.
/// ChannelData: channel 0x4000..=0x7FFF and a length that fits in the datagram (trailing
/// padding is allowed over UDP, RFC 8656 §12.5).
pub fn classify(datagram: &[u8]) -> Kind {
    if datagram.len() < CHANNEL_DATA_HEADER {
        return Kind::Invalid;
    }
    match datagram[0] >> 6 {
        0b00 => {
            if datagram.len() < HEADER_LEN {
                return Kind::Invalid;
            }
            let len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
            let cookie = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
            if cookie != MAGIC_COOKIE || len % 4 != 0 || HEADER_LEN + len != datagram.len() {
                return Kind::Invalid;
            }
            Kind::Stun
        }
        0b01 => {
            let channel = ChannelNumber::new(u16::from_be_bytes([datagram[0], datagram[1]]));
            let len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
            match channel {
                Some(channel) if CHANNEL_DATA_HEADER + len <= datagram.len() => {
                    Kind::ChannelData { channel, len }
                }
                _ => Kind::Invalid,
            }
        }
        _ => Kind::Invalid,
    }
}

/// Rounds `len` up to a multiple of 4 (attribute and TCP ChannelData padding).
pub const fn pad4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_matches_rfc_examples() {
        assert_eq!(message_type(method::BINDING, class::REQUEST), 0x0001);
        assert_eq!(message_type(method::BINDING, class::SUCCESS), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, class::ERROR), 0x0113);
        assert_eq!(message_type(method::SEND, class::INDICATION), 0x0016);
        assert_eq!(message_type(method::DATA, class::INDICATION), 0x0017);
        assert_eq!(message_type(method::CHANNEL_BIND, class::SUCCESS), 0x0109);
    }

    #[test]
    fn classify_stun_and_channel_data() {
        let mut m = [0u8; 28];
        m[1] = 1;
        m[3] = 8;
        m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert_eq!(classify(&m), Kind::Stun);
        // Length not matching the datagram.
        assert_eq!(classify(&m[..24]), Kind::Invalid);
        // Bad cookie.
        m[4] = 0;
        assert_eq!(classify(&m), Kind::Invalid);

        let cd = [0x40, 0x01, 0x00, 0x03, 1, 2, 3, 0];
        assert_eq!(
            classify(&cd),
            Kind::ChannelData {
                channel: ChannelNumber::new(0x4001).unwrap(),
                len: 3
            }
        );
        assert_eq!(classify(&cd[..6]), Kind::Invalid);
        // RFC 5766 numbers above 0x4FFF are accepted, up to 0x7FFF.
        assert_eq!(
            classify(&[0x50, 0, 0, 0]),
            Kind::ChannelData {
                channel: ChannelNumber::new(0x5000).unwrap(),
                len: 0
            }
        );
        assert_eq!(
            classify(&[0x7F, 0xFF, 0, 0]),
            Kind::ChannelData {
                channel: ChannelNumber::new(0x7FFF).unwrap(),
                len: 0
            }
        );
        assert_eq!(classify(&[0x80, 0, 0, 0]), Kind::Invalid);
        assert_eq!(classify(&[0x40, 0]), Kind::Invalid);
    }
}
