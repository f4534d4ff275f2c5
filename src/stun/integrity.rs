//! MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256 verification with a raw key
//! (RFC 8489 §14.5, §14.6), in constant time, without allocation.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{attr, attributes, HEADER_LEN};

/// Which integrity attribute a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated to 16..=32 bytes).
    Sha256,
}

/// Why a message failed the integrity check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("no MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 attribute")]
    Missing,
    #[error("integrity attribute has a bad length")]
    Malformed,
    #[error("integrity does not match")]
    Mismatch,
}

/// Finds the integrity attribute to check: MESSAGE-INTEGRITY-SHA256 when present (the
/// stronger one, RFC 8489 §9.2.4), else MESSAGE-INTEGRITY. Returns its kind and offset.
pub fn find_integrity(msg: &[u8]) -> Option<(IntegrityKind, usize)> {
    let mut found = None;
    for a in attributes(msg) {
        match a.ty {
            attr::MESSAGE_INTEGRITY_SHA256 => return Some((IntegrityKind::Sha256, a.offset)),
            attr::MESSAGE_INTEGRITY if found.is_none() => {
                found = Some((IntegrityKind::Sha1, a.offset))
            }
            _ => {}
        }
    }
    found
}

/// Verifies the message's integrity attribute with `key` (RFC 8489 §9.2.2 long-term key or
/// §9.1.1 short-term password). The HMAC covers the message up to the attribute, with the
/// header length rewritten to end right after it.
pub fn verify_integrity(msg: &[u8], key: &[u8]) -> Result<IntegrityKind, IntegrityError> {
    let (kind, off) = find_integrity(msg).ok_or(IntegrityError::Missing)?;
    let l = u16::from_be_bytes([msg[off + 2], msg[off + 3]]) as usize;
    let value_ok = match kind {
        IntegrityKind::Sha1 => l == 20,
        IntegrityKind::Sha256 => (16..=32).contains(&l) && l % 4 == 0,
    };
    if !value_ok || off + 4 + l > msg.len() {
        return Err(IntegrityError::Malformed);
    }
    let expected = &msg[off + 4..off + 4 + l];
    let len_field = ((off + 4 + l - HEADER_LEN) as u16).to_be_bytes();
    let ok: bool = match kind {
        IntegrityKind::Sha1 => {
            let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(&msg[..2]);
            mac.update(&len_field);
            mac.update(&msg[4..off]);
            mac.finalize().into_bytes().ct_eq(expected).into()
        }
        IntegrityKind::Sha256 => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(&msg[..2]);
            mac.update(&len_field);
            mac.update(&msg[4..off]);
            mac.finalize().into_bytes()[..l].ct_eq(expected).into()
        }
    };
    if ok {
        Ok(kind)
    } else {
        Err(IntegrityError::Mismatch)
    }
}
