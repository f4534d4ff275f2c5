//! RFC 5769 test vectors: parsing (stun-types), FINGERPRINT, MESSAGE-INTEGRITY with
//! short-term and long-term keys, XOR-MAPPED-ADDRESS, and our writer reproducing them.

use std::net::SocketAddr;

use md5::{Digest, Md5};
use stun_types::attribute::{Software, Username, XorMappedAddress};
use stun_types::message::Message;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// RFC 5769 §2.1 to §2.4, byte for byte.
const REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
const RESPONSE_V4: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96";
const RESPONSE_V6: &str = "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c";
const LONG_TERM: &str = "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b900000015001c662f2f3439396b39353464364f4c33346f4c394653547679363473410014000b6578616d706c652e6f72670000080014f67024656dd64a3e02b8e0712e85c9a28ca89666";
const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn sample_request() {
    let b = hex(REQUEST);
    assert_eq!(classify(&b), Kind::Stun);
    let m = Message::from_bytes(&b).expect("valid, fingerprint checked");
    assert_eq!(m.attribute::<Username>().unwrap().username(), "evtj:h6vY");
    assert_eq!(
        m.attribute::<Software>().unwrap().software(),
        "STUN test client"
    );
    assert_eq!(
        verify_integrity(&b, SHORT_TERM_PASSWORD),
        Ok(IntegrityKind::Sha1)
    );
    assert_eq!(
        verify_integrity(&b, b"wrong"),
        Err(IntegrityError::Mismatch)
    );
}

fn check_response(vector: &str, addr: SocketAddr) {
    let b = hex(vector);
    let m = Message::from_bytes(&b).unwrap();
    let tid = m.transaction_id();
    assert_eq!(m.attribute::<XorMappedAddress>().unwrap().addr(tid), addr);
    assert_eq!(
        verify_integrity(&b, SHORT_TERM_PASSWORD),
        Ok(IntegrityKind::Sha1)
    );
    // Our writer reproduces the vector byte for byte.
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(
        &mut out,
        message_type(method::BINDING, class::SUCCESS),
        b[8..20].try_into().unwrap(),
    )
    .unwrap();
    w.attr(attr::SOFTWARE, b"test vector").unwrap();
    // The RFC pads SOFTWARE ("test vector", 11 bytes) with a space where we write zero.
    w.patch_byte(w.len() - 1, 0x20);
    w.xor_addr(attr::XOR_MAPPED_ADDRESS, addr).unwrap();
    w.integrity_sha1(SHORT_TERM_PASSWORD).unwrap();
    let n = w.finish_with_fingerprint().unwrap();
    assert_eq!(&out[..n], &b[..]);
}

#[test]
fn sample_ipv4_response() {
    check_response(RESPONSE_V4, "192.0.2.1:32853".parse().unwrap());
}

#[test]
fn sample_ipv6_response() {
    check_response(
        RESPONSE_V6,
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap(),
    );
}

#[test]
fn long_term_request() {
    let b = hex(LONG_TERM);
    let m = Message::from_bytes(&b).unwrap();
    assert_eq!(
        m.attribute::<Username>().unwrap().username(),
        "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}"
    );
    // Key = MD5(username ":" realm ":" SASLprep(password)) (RFC 8489 §9.2.2); the
    // password "The<U+00AD>M<U+00AA>tr<U+2168>" prepares to "TheMatrIX".
    let key = Md5::digest("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}:example.org:TheMatrIX");
    assert_eq!(verify_integrity(&b, &key), Ok(IntegrityKind::Sha1));
    let mut tampered = b.clone();
    tampered[40] ^= 1;
    assert_eq!(
        verify_integrity(&tampered, &key),
        Err(IntegrityError::Mismatch)
    );
}

#[test]
fn fingerprint_mismatch_is_rejected_by_parser() {
    let mut b = hex(REQUEST);
    let last = b.len() - 1;
    b[last] ^= 0xff;
    assert!(Message::from_bytes(&b).is_err());
}
