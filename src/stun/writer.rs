//! An allocation-free STUN message writer into a caller's buffer (RFC 8489 §5, §14).

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::{attr, pad4, HEADER_LEN, MAGIC_COOKIE};

/// The buffer was too small for the message (the caller drops it and counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("STUN message does not fit in the output buffer")]
pub struct WriteError;

/// Writes one STUN message into a borrowed buffer; the header length is kept current so
/// MESSAGE-INTEGRITY and FINGERPRINT can be computed over what is written so far.
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    txid: [u8; 12],
}

impl<'a> MessageWriter<'a> {
    /// Starts a message of type `msg_type` (see [`super::message_type`]).
    pub fn new(buf: &'a mut [u8], msg_type: u16, txid: [u8; 12]) -> Result<Self, WriteError> {
        if buf.len() < HEADER_LEN {
            return Err(WriteError);
        }
        buf[..2].copy_from_slice(&msg_type.to_be_bytes());
        buf[2..4].fill(0);
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..20].copy_from_slice(&txid);
        Ok(Self {
            buf,
            len: HEADER_LEN,
            txid,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a message has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Reserves an attribute of `value_len` bytes (zero padded) and returns its value.
    fn reserve(&mut self, atype: u16, value_len: usize) -> Result<&mut [u8], WriteError> {
        let total = 4 + pad4(value_len);
        if value_len > u16::MAX as usize || self.len + total > self.buf.len() {
            return Err(WriteError);
        }
        let at = self.len;
        self.buf[at..at + 2].copy_from_slice(&atype.to_be_bytes());
        self.buf[at + 2..at + 4].copy_from_slice(&(value_len as u16).to_be_bytes());
        self.buf[at + 4 + value_len..at + total].fill(0);
        self.len += total;
        let body = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        Ok(&mut self.buf[at + 4..at + 4 + value_len])
    }

    /// Appends an attribute with the given value.
    pub fn attr(&mut self, atype: u16, value: &[u8]) -> Result<(), WriteError> {
        self.reserve(atype, value.len())?.copy_from_slice(value);
        Ok(())
    }

    /// Appends a 32-bit attribute (LIFETIME, REQUESTED-TRANSPORT, ...).
    pub fn attr_u32(&mut self, atype: u16, v: u32) -> Result<(), WriteError> {
        self.attr(atype, &v.to_be_bytes())
    }

    /// Appends an XOR-encoded address attribute (RFC 8489 §14.2).
    pub fn xor_addr(&mut self, atype: u16, addr: SocketAddr) -> Result<(), WriteError> {
        let n = if addr.is_ipv4() { 8 } else { 20 };
        let txid = self.txid;
        xor_address(self.reserve(atype, n)?, addr, &txid);
        Ok(())
    }

    /// Appends a plain (not XOR-encoded) address attribute, the MAPPED-ADDRESS format
    /// (RFC 8489 §14.1) that ALTERNATE-SERVER uses (§14.15).
    pub fn addr(&mut self, atype: u16, addr: SocketAddr) -> Result<(), WriteError> {
        let n = if addr.is_ipv4() { 8 } else { 20 };
        let v = self.reserve(atype, n)?;
        v[0] = 0;
        v[2..4].copy_from_slice(&addr.port().to_be_bytes());
        match addr {
            SocketAddr::V4(a) => {
                v[1] = 0x01;
                v[4..8].copy_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                v[1] = 0x02;
                v[4..20].copy_from_slice(&a.ip().octets());
            }
        }
        Ok(())
    }

    /// Appends ERROR-CODE (RFC 8489 §14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<(), WriteError> {
        let v = self.reserve(attr::ERROR_CODE, 4 + reason.len())?;
        v[0] = 0;
        v[1] = 0;
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(())
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 over the message so far (RFC 8489 §14.5).
    pub fn integrity_sha1(&mut self, key: &[u8]) -> Result<(), WriteError> {
        let start = self.len;
        self.reserve(attr::MESSAGE_INTEGRITY, 20)?;
        let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&self.buf[..start]);
        let out = mac.finalize().into_bytes();
        self.buf[start + 4..start + 24].copy_from_slice(&out);
        Ok(())
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), full 32 bytes.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> Result<(), WriteError> {
        let start = self.len;
        self.reserve(attr::MESSAGE_INTEGRITY_SHA256, 32)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&self.buf[..start]);
        let out = mac.finalize().into_bytes();
        self.buf[start + 4..start + 36].copy_from_slice(&out);
        Ok(())
    }

    /// Appends FINGERPRINT (RFC 8489 §14.7) and returns the message length.
    pub fn finish_with_fingerprint(mut self) -> Result<usize, WriteError> {
        let start = self.len;
        self.reserve(attr::FINGERPRINT, 4)?;
        let crc = fingerprint(&self.buf[..start]);
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(self.len)
    }

    /// Overwrites one written byte (tests reproduce vectors with non-zero padding).
    #[cfg(test)]
    pub(crate) fn patch_byte(&mut self, at: usize, v: u8) {
        self.buf[at] = v;
    }

    /// Returns the message length without a FINGERPRINT.
    pub fn finish(self) -> usize {
        self.len
    }
}

/// Test message builder shared by every unit test that needs hand-made input: a message
/// of type `ty` with transaction id `txid` and these attributes in order, no FINGERPRINT.
#[cfg(test)]
pub(crate) fn test_message(ty: u16, txid: [u8; 12], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = MessageWriter::new(&mut buf, ty, txid).expect("room for a header");
    for (t, v) in attrs {
        w.attr(*t, v).expect("test message fits");
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// CRC-32 of the message XOR 0x5354554e (RFC 8489 §14.7).
pub(crate) fn fingerprint(data: &[u8]) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(data) ^ 0x5354_554e
}

/// Writes the XOR-mapped form of `addr` (RFC 8489 §14.2) into `dst` (8 or 20 bytes).
pub(crate) fn xor_address(dst: &mut [u8], addr: SocketAddr, txid: &[u8; 12]) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    dst[0] = 0;
    dst[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr {
        SocketAddr::V4(a) => {
            dst[1] = 0x01;
            for (i, b) in a.ip().octets().iter().enumerate() {
                dst[4 + i] = b ^ cookie[i];
            }
        }
        SocketAddr::V6(a) => {
            dst[1] = 0x02;
            for (i, b) in a.ip().octets().iter().enumerate() {
                let k = if i < 4 { cookie[i] } else { txid[i - 4] };
                dst[4 + i] = b ^ k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{class, message_type, verify_integrity, IntegrityKind};
    use proptest::prelude::*;
    use stun_types::attribute::{AttributeType, ErrorCode, XorMappedAddress};
    use stun_types::message::Message;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::from((std::net::Ipv4Addr::from(ip), p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::from((std::net::Ipv6Addr::from(ip), p))),
        ]
    }

    proptest! {
        /// Whatever we write, stun-types parses back (FINGERPRINT checked) with the same
        /// attributes, and the integrity verifies with the key and fails with another.
        #[test]
        fn written_messages_round_trip(
            method in 1u16..0x0FFF,
            txid in any::<[u8; 12]>(),
            // Comprehension-optional types, none of the ending ones.
            attrs in proptest::collection::vec(
                (0x8030u16..0xFFFF, proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
            mapped in addr(),
            code in 300u16..700,
            reason in "[a-zA-Z ]{0,40}",
            key in proptest::collection::vec(any::<u8>(), 1..40),
            sha256 in any::<bool>(),
        ) {
            let mut buf = [0u8; 2048];
            let mut w = MessageWriter::new(&mut buf, message_type(method, class::ERROR), txid).unwrap();
            w.error_code(code, &reason).unwrap();
            for (t, v) in &attrs {
                w.attr(*t, v).unwrap();
            }
            w.xor_addr(attr::XOR_MAPPED_ADDRESS, mapped).unwrap();
            if sha256 {
                w.integrity_sha256(&key).unwrap();
            } else {
                w.integrity_sha1(&key).unwrap();
            }
            let n = w.finish_with_fingerprint().unwrap();
            let bytes = &buf[..n];
            prop_assert_eq!(crate::stun::classify(bytes), crate::stun::Kind::Stun);
            let m = Message::from_bytes(bytes).unwrap();
            prop_assert_eq!(m.method().value(), method);
            let e = m.attribute::<ErrorCode>().unwrap();
            prop_assert_eq!(e.code(), code);
            prop_assert_eq!(e.reason(), reason.as_str());
            for (t, v) in &attrs {
                // First attribute of that type is ours or an earlier one with the same type.
                let got = m.raw_attribute(AttributeType::new(*t)).unwrap();
                let first = attrs.iter().find(|(t2, _)| t2 == t).unwrap();
                prop_assert_eq!(&got.value[..], &first.1[..]);
                let _ = v;
            }
            let tid = m.transaction_id();
            prop_assert_eq!(m.attribute::<XorMappedAddress>().unwrap().addr(tid), mapped);
            let kind = if sha256 { IntegrityKind::Sha256 } else { IntegrityKind::Sha1 };
            prop_assert_eq!(verify_integrity(bytes, &key), Ok(kind));
            let mut other = key.clone();
            other[0] ^= 1;
            prop_assert!(verify_integrity(bytes, &other).is_err());
        }
    }

    #[test]
    fn too_small_buffer_is_an_error_not_a_panic() {
        let mut buf = [0u8; 30];
        let mut w = MessageWriter::new(&mut buf, 0x0101, [0; 12]).unwrap();
        assert_eq!(w.attr(attr::SOFTWARE, &[0; 20]), Err(WriteError));
        assert!(w.attr(attr::SOFTWARE, &[0; 4]).is_ok());
        assert_eq!(w.finish_with_fingerprint(), Err(WriteError));
        assert!(MessageWriter::new(&mut [0u8; 10], 1, [0; 12]).is_err());
    }
}
