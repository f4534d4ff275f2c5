//! Data indication framing written around a payload already in place (RFC 8656 §11.6).

use std::net::SocketAddr;
use std::ops::Range;

use super::{attr, class, message_type, method, pad4, writer::xor_address, HEADER_LEN};

/// Bytes needed before the payload: 20 header + XOR-PEER-ADDRESS (up to 4 + 20 for IPv6)
/// + DATA attribute header 4.
pub const DATA_INDICATION_HEADROOM: usize = 48;

/// Writes a Data indication (XOR-PEER-ADDRESS, DATA) around the payload that is already at
/// `buf[payload_at..payload_at + payload_len]`, and zero padding after it (RFC 8656 §11.6).
/// Returns the byte range of the whole message. No allocation, the payload is not moved.
///
/// `None` when the message would not fit the 16-bit STUN length (RFC 8489 §5): an IPv6
/// peer's datagram of more than 65504 bytes. The caller drops it and counts.
///
/// Requires `payload_at >= DATA_INDICATION_HEADROOM` and 3 spare bytes after the payload;
/// panics otherwise (a driver bug, never network input).
pub fn write_data_indication(
    buf: &mut [u8],
    payload_at: usize,
    payload_len: usize,
    peer: SocketAddr,
    txid: [u8; 12],
) -> Option<Range<usize>> {
    let addr_len = if peer.is_ipv4() { 8 } else { 20 };
    let padded = pad4(payload_len);
    let body_len = (4 + addr_len) + 4 + padded;
    // Written as u16 below: a larger body would wrap and garble the client's stream.
    if body_len > usize::from(u16::MAX) {
        return None;
    }
    let start = payload_at - 4 - (4 + addr_len) - HEADER_LEN;
    let end = payload_at + padded;
    buf[payload_at + payload_len..end].fill(0);

    let h = &mut buf[start..start + HEADER_LEN];
    h[..2].copy_from_slice(&message_type(method::DATA, class::INDICATION).to_be_bytes());
    h[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
    h[4..8].copy_from_slice(&super::MAGIC_COOKIE.to_be_bytes());
    h[8..20].copy_from_slice(&txid);

    let a = start + HEADER_LEN;
    buf[a..a + 2].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    buf[a + 2..a + 4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    xor_address(&mut buf[a + 4..a + 4 + addr_len], peer, &txid);

    let d = a + 4 + addr_len;
    buf[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    buf[d + 2..d + 4].copy_from_slice(&(payload_len as u16).to_be_bytes());
    debug_assert_eq!(d + 4, payload_at);
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stun_types::message::Message;
    use turn_types::attribute::{Data, XorPeerAddress};

    proptest! {
        #[test]
        fn parses_back_with_stun_types(
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
            v6 in any::<bool>(),
            ip4 in any::<[u8; 4]>(),
            ip6 in any::<[u8; 16]>(),
            port in any::<u16>(),
            txid in any::<[u8; 12]>(),
            slack in 0usize..8,
        ) {
            let peer: SocketAddr = if v6 {
                (std::net::Ipv6Addr::from(ip6), port).into()
            } else {
                (std::net::Ipv4Addr::from(ip4), port).into()
            };
            let at = DATA_INDICATION_HEADROOM + slack;
            let mut buf = vec![0xAAu8; at + payload.len() + 3];
            buf[at..at + payload.len()].copy_from_slice(&payload);
            let r = write_data_indication(&mut buf, at, payload.len(), peer, txid).unwrap();
            let bytes = &buf[r];
            prop_assert_eq!(crate::stun::classify(bytes), crate::stun::Kind::Stun);
            let msg = Message::from_bytes(bytes).unwrap();
            prop_assert!(msg.has_method(turn_types::message::DATA));
            let tid = msg.transaction_id();
            prop_assert_eq!(msg.attribute::<XorPeerAddress>().unwrap().addr(tid), peer);
            let data = msg.attribute::<Data>().unwrap();
            prop_assert_eq!(data.data(), &payload[..]);
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/stun_codec.rs): a 65527-byte datagram from an
    /// IPv6 peer made a body of 65556 bytes whose length field wrapped to 20.
    #[test]
    fn payload_too_large_for_a_stun_length_is_refused() {
        let v6: SocketAddr = "[2001:db8::7]:9".parse().unwrap();
        let v4: SocketAddr = "192.0.2.7:9".parse().unwrap();
        for (peer, len, fits) in [
            (v6, 65527, false),
            (v6, 65505, false),
            (v6, 65504, true),
            (v4, 65507, true),
        ] {
            let mut buf = vec![0u8; DATA_INDICATION_HEADROOM + len + 3];
            let r = write_data_indication(&mut buf, DATA_INDICATION_HEADROOM, len, peer, [1; 12]);
            assert_eq!(r.is_some(), fits, "{len} bytes from {peer}");
            if let Some(r) = r {
                let msg = Message::from_bytes(&buf[r]).expect("parses");
                assert_eq!(msg.attribute::<Data>().unwrap().data().len(), len);
            }
        }
    }
}
