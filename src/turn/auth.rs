//! Long-term credentials for TURN (RFC 8489 §9.2): the TURN REST API scheme
//! (draft-uberti-behave-turn-rest-00, coturn's `use-auth-secret`) and static users.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Password for a TURN REST API username: `base64(HMAC-SHA1(secret, username))`
/// (draft-uberti-behave-turn-rest-00 §2.2).
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A REST API credential minted for `user`, valid until `expiry_unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCredential {
    pub username: String,
    pub password: String,
    pub expiry_unix: u64,
}

/// Mints `expiry:user` (with the configured separator) and its password.
pub fn mint_rest_credential(
    secret: &str,
    user: &str,
    ttl_secs: u64,
    now_unix: u64,
    separator: &str,
) -> RestCredential {
    let expiry_unix = now_unix.saturating_add(ttl_secs);
    let username = if user.is_empty() {
        expiry_unix.to_string()
    } else {
        format!("{expiry_unix}{separator}{user}")
    };
    let password = rest_password(secret, &username);
    RestCredential {
        username,
        password,
        expiry_unix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_password_matches_reference() {
        // Computed independently: printf '%s' '1700000000:alice' | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            rest_password("secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
    }

    #[test]
    fn mint_builds_expiry_user() {
        let c = mint_rest_credential("s", "bob", 60, 1000, ":");
        assert_eq!(c.username, "1060:bob");
        assert_eq!(c.expiry_unix, 1060);
        assert_eq!(c.password, rest_password("s", "1060:bob"));
    }
}
