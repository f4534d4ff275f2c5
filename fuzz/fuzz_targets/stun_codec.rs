//! Arbitrary bytes through Tern's STUN wire code as the IO driver and the TURN core use
//! it: UDP classification (RFC 8656 §12), TCP stream framing (RFC 8489 §6.2.2, RFC 8656
//! §12.5), the stun-types message parser and attribute access, and MESSAGE-INTEGRITY /
//! MESSAGE-INTEGRITY-SHA256 lookup and verification (RFC 8489 §14.5, §14.6).
//!
//! Besides "no panic", it asserts the bounds every caller relies on (a ChannelData
//! length inside the datagram, a frame inside the buffer, an attribute value inside the
//! message), and that a message our writer signs verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;

use stun_types::attribute::AttributeType;
use stun_types::message::Message;
use tern::stun::{
    attr, classify, find_integrity, tcp_frame_len, verify_integrity, IntegrityError, IntegrityKind,
    Kind, MessageWriter, CHANNEL_DATA_HEADER, HEADER_LEN,
};
use tern::stun::{pad4, write_data_indication, DATA_INDICATION_HEADROOM};
use turn_types::attribute::XorPeerAddress;

const KEY: &[u8] = b"0123456789abcdef";

/// The attributes the TURN core reads by type (`requests.rs`, `tcp_relay.rs`).
const READ_BY_CORE: &[u16] = &[
    attr::USERNAME,
    attr::USERHASH,
    attr::REALM,
    attr::NONCE,
    attr::LIFETIME,
    attr::REQUESTED_TRANSPORT,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::ADDITIONAL_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    attr::DONT_FRAGMENT,
    attr::CHANNEL_NUMBER,
    attr::DATA,
    attr::CONNECTION_ID,
    attr::XOR_PEER_ADDRESS,
];

fuzz_target!(|data: &[u8]| {
    udp(data);
    tcp_stream(data);
    // Integrity on bytes nobody classified first: both functions take any slice.
    integrity(data);
    signed_round_trip(data);
    data_indication(data);
});

/// A datagram on a STUN/TURN UDP port, as `net::worker` handles it.
fn udp(data: &[u8]) {
    match classify(data) {
        Kind::Stun => {
            assert!(data.len() >= HEADER_LEN);
            assert_eq!((data.len() - HEADER_LEN) % 4, 0);
            parse_as_core(data);
        }
        Kind::ChannelData { channel, len } => {
            assert!((0x4000..=0x7FFE).contains(&channel.get()));
            // The driver slices the payload with this length.
            let _ = &data[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
        }
        Kind::Invalid => {}
    }
}

/// The same bytes as a TCP/TLS stream: frame by frame, each frame classified, as
/// `net::worker::tcp_conns` does; every prefix of a frame must ask for more bytes.
fn tcp_stream(mut rest: &[u8]) {
    while let Ok(Some(n)) = tcp_frame_len(rest) {
        assert!(n >= 4 && n <= rest.len(), "frame {n} of {}", rest.len());
        let frame = &rest[..n];
        for cut in [n - 1, n / 2, 4] {
            if cut < n {
                assert!(
                    matches!(tcp_frame_len(&rest[..cut]), Ok(None) | Err(_)),
                    "a prefix of {cut} bytes framed as a whole frame"
                );
            }
        }
        match classify(frame) {
            Kind::Stun => parse_as_core(frame),
            Kind::ChannelData { len, .. } => {
                let _ = &frame[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
            }
            // The frame length comes from the same fields classify checks.
            Kind::Invalid => panic!("a whole TCP frame does not classify"),
        }
        rest = &rest[n..];
    }
}

/// What `turn::requests` does with a message: parse (FINGERPRINT checked), read
/// attributes by type and slice their values out of the message, decode every
/// XOR-PEER-ADDRESS.
fn parse_as_core(msg: &[u8]) {
    let Ok(m) = Message::from_bytes(msg) else {
        return;
    };
    let b = m.as_bytes();
    for &t in READ_BY_CORE {
        if let Some((off, a)) = m.raw_attribute_and_offset(AttributeType::new(t)) {
            // `requests::raw` slices exactly this.
            let end = off + 4 + a.header.length() as usize;
            assert!(end <= b.len(), "attribute {t:#06x} past the end");
            let _ = &b[off + 4..end];
        }
    }
    let tid = m.transaction_id();
    for (off, a) in m.iter_attributes() {
        assert!(off + 4 + a.header.length() as usize <= b.len());
        if a.header.get_type().value() == attr::XOR_PEER_ADDRESS {
            if let Ok(p) = XorPeerAddress::try_from(&a) {
                let _ = p.addr(tid);
            }
        }
    }
    integrity(msg);
}

fn integrity(msg: &[u8]) {
    let found = find_integrity(msg);
    if let Some((_, off)) = found {
        assert!(off >= HEADER_LEN && off + 4 <= msg.len());
    }
    match verify_integrity(msg, KEY) {
        Ok(_) | Err(IntegrityError::Malformed) | Err(IntegrityError::Mismatch) => {
            assert!(found.is_some())
        }
        Err(IntegrityError::Missing) => assert!(found.is_none()),
    }
}

/// Our writer signing attributes taken from the input: the result classifies as STUN,
/// parses, and verifies with the key it was signed with (the core signs every
/// authenticated answer this way).
fn signed_round_trip(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let mut buf = [0u8; 1024];
    let Ok(mut w) = MessageWriter::new(&mut buf, 0x0001, [7; 12]) else {
        return;
    };
    // Attributes: 2 type bytes, 1 length byte, value. Types that mean something to the
    // writer's own attributes are mapped away so the message stays well formed.
    while rest.len() >= 3 && w.len() < 600 {
        let t = u16::from_be_bytes([rest[0], rest[1]]);
        let l = (rest[2] as usize).min(rest.len() - 3);
        let v = &rest[3..3 + l];
        rest = &rest[3 + l..];
        let t = match t {
            attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT => {
                attr::SOFTWARE
            }
            t => t,
        };
        if w.attr(t, v).is_err() {
            return;
        }
    }
    let sha256 = sel & 1 == 1;
    let r = if sha256 {
        w.integrity_sha256(KEY)
    } else {
        w.integrity_sha1(KEY)
    };
    if r.is_err() {
        return;
    }
    let Ok(n) = w.finish_with_fingerprint() else {
        return;
    };
    let msg = &buf[..n];
    assert_eq!(classify(msg), Kind::Stun);
    assert_eq!(tcp_frame_len(msg), Ok(Some(n)));
    let want = if sha256 {
        IntegrityKind::Sha256
    } else {
        IntegrityKind::Sha1
    };
    assert_eq!(verify_integrity(msg, KEY), Ok(want));
    assert_eq!(
        verify_integrity(msg, b"another key"),
        Err(IntegrityError::Mismatch)
    );
}

/// A peer's datagram of any UDP size framed as a Data indication for the client (RFC 8656
/// §11.6), as `net::worker` frames what arrives on a relay socket: the message must be
/// one well-formed STUN message carrying the whole payload, or refused when none can.
fn data_indication(data: &[u8]) {
    let [a, b, c, ..] = *data else {
        return;
    };
    // The largest UDP payloads: IPv4 65507 (65535 less IP and UDP headers), IPv6 65527
    // (the payload length field covers only the 8-byte UDP header; no jumbograms).
    let (peer, max): (SocketAddr, usize) = if c & 1 == 1 {
        ("[2001:db8::7]:9".parse().unwrap(), 65527)
    } else {
        ("192.0.2.7:9".parse().unwrap(), 65507)
    };
    let len = usize::from(u16::from_be_bytes([a, b])).min(max);
    let mut buf = vec![0u8; DATA_INDICATION_HEADROOM + len + 3];
    buf[DATA_INDICATION_HEADROOM..DATA_INDICATION_HEADROOM + len].fill(0xAB);
    let Some(r) = write_data_indication(&mut buf, DATA_INDICATION_HEADROOM, len, peer, [1; 12])
    else {
        // Refused (the driver drops and counts it) only when no 16-bit length can hold it.
        let addr = if peer.is_ipv4() { 8 } else { 20 };
        assert!(
            4 + addr + 4 + pad4(len) > 65535,
            "{len} bytes from {peer} refused"
        );
        return;
    };
    let msg = &buf[r];
    assert_eq!(
        classify(msg),
        Kind::Stun,
        "Data indication of {len} bytes from {peer}"
    );
    let m = Message::from_bytes(msg).expect("Data indication parses");
    let d = m
        .raw_attribute(AttributeType::new(attr::DATA))
        .expect("DATA attribute");
    assert_eq!(d.value.len(), len);
}
