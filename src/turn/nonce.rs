//! Stateless nonces (RFC 8489 §9.2): `hex(timestamp) || hex(HMAC-SHA256(key, timestamp ||
//! client IP))[..8 bytes]`. The server keeps no per-client state: a nonce is valid when its
//! MAC matches for this client IP and its timestamp is recent.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of a nonce: 8 hex digits of timestamp, 16 of MAC.
pub const NONCE_LEN: usize = 24;

/// The per-process nonce key (random at start, in [`super::Shared`]).
pub struct NonceKey([u8; 32]);

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(<secret>)")
    }
}

/// Result of checking a request's NONCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Ours, but older than the nonce lifetime: 438 with a fresh one.
    Stale,
    /// Not one we issued for this client IP (also answered with 438, RFC 8489 §9.2.4).
    Invalid,
}

impl NonceKey {
    pub fn random() -> NonceKey {
        NonceKey(rand::random())
    }

    #[cfg(test)]
    pub fn fixed(b: u8) -> NonceKey {
        NonceKey([b; 32])
    }

    fn mac(&self, ts: u32, ip: IpAddr) -> [u8; 8] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(&ts.to_be_bytes());
        match ip {
            IpAddr::V4(a) => m.update(&a.octets()),
            IpAddr::V6(a) => m.update(&a.octets()),
        }
        let out = m.finalize().into_bytes();
        out[..8].try_into().expect("8 of 32 bytes")
    }

    /// A nonce for `ip` at `now_unix`.
    pub fn make(&self, ip: IpAddr, now_unix: u64) -> [u8; NONCE_LEN] {
        let ts = now_unix as u32;
        let mut out = [0u8; NONCE_LEN];
        hex_into(&ts.to_be_bytes(), &mut out[..8]);
        hex_into(&self.mac(ts, ip), &mut out[8..]);
        out
    }

    /// Checks a nonce received from `ip`; stale after `lifetime_secs`.
    pub fn check(&self, nonce: &[u8], ip: IpAddr, now_unix: u64, lifetime_secs: u64) -> NonceCheck {
        if nonce.len() != NONCE_LEN {
            return NonceCheck::Invalid;
        }
        let (Some(ts), Some(mac)) = (unhex::<4>(&nonce[..8]), unhex::<8>(&nonce[8..])) else {
            return NonceCheck::Invalid;
        };
        let ts = u32::from_be_bytes(ts);
        if !bool::from(self.mac(ts, ip).ct_eq(&mac)) {
            return NonceCheck::Invalid;
        }
        // Timestamps are Unix seconds truncated to 32 bits; compare in wrapping arithmetic.
        let age = (now_unix as u32).wrapping_sub(ts);
        if age as u64 > lifetime_secs {
            // Also covers a timestamp from the future (huge wrapped age).
            return NonceCheck::Stale;
        }
        NonceCheck::Valid
    }
}

fn hex_into(src: &[u8], dst: &mut [u8]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in src.iter().enumerate() {
        dst[2 * i] = H[(b >> 4) as usize];
        dst[2 * i + 1] = H[(b & 15) as usize];
    }
}

fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (s[2 * i] as char).to_digit(16)?;
        let lo = (s[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_stale_and_foreign_nonces() {
        let k = NonceKey::fixed(1);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let n = k.make(ip, 1_000_000);
        assert_eq!(k.check(&n, ip, 1_000_000, 600), NonceCheck::Valid);
        assert_eq!(k.check(&n, ip, 1_000_600, 600), NonceCheck::Valid);
        assert_eq!(k.check(&n, ip, 1_000_601, 600), NonceCheck::Stale);
        // Another client IP, another server key, or a tampered nonce: invalid.
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert_eq!(k.check(&n, other, 1_000_000, 600), NonceCheck::Invalid);
        assert_eq!(
            NonceKey::fixed(2).check(&n, ip, 1_000_000, 600),
            NonceCheck::Invalid
        );
        let mut t = n;
        t[0] = if t[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.check(&t, ip, 1_000_000, 600), NonceCheck::Invalid);
        assert_eq!(k.check(b"short", ip, 1_000_000, 600), NonceCheck::Invalid);
        // From the future (clock went back): not valid.
        assert_eq!(k.check(&n, ip, 999_000, 600), NonceCheck::Stale);
    }
}
