//! Long-term credentials for TURN (RFC 8489 §9.2): the TURN REST API scheme
//! (draft-uberti-behave-turn-rest-00, coturn's `use-auth-secret`) and static users.
//! Minting, and verifying a request's MESSAGE-INTEGRITY against them in constant time.

use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rustc_hash::FxHashMap;
use sha1::Sha1;
use sha2::Sha256;

use crate::config::StaticUser;
use crate::stun::{find_integrity, verify_integrity, IntegrityError, IntegrityKind};

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

/// A long-term key (RFC 8489 §9.2.2): MD5 (16 bytes) or SHA-256 (32 bytes) of
/// `username:realm:password`. Used to verify requests and sign responses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    len: u8,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material never reaches logs.
        write!(f, "Key(<{} bytes>)", self.len)
    }
}

impl Key {
    fn from_slice(b: &[u8]) -> Key {
        let mut bytes = [0u8; 32];
        bytes[..b.len()].copy_from_slice(b);
        Key {
            bytes,
            len: b.len() as u8,
        }
    }

    /// MD5(username:realm:password), the RFC 8489 §9.2.2 default algorithm.
    pub fn md5(username: &str, realm: &str, password: &str) -> Key {
        let d = Md5::new()
            .chain_update(username)
            .chain_update(":")
            .chain_update(realm)
            .chain_update(":")
            .chain_update(password)
            .finalize();
        Key::from_slice(&d)
    }

    /// SHA-256(username:realm:password), the PASSWORD-ALGORITHM SHA-256 key (RFC 8489 §18.5).
    pub fn sha256(username: &str, realm: &str, password: &str) -> Key {
        let d = Sha256::new()
            .chain_update(username)
            .chain_update(":")
            .chain_update(realm)
            .chain_update(":")
            .chain_update(password)
            .finalize();
        Key::from_slice(&d)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Why a request's credentials were refused (all answered with 401, counted by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown user")]
    UnknownUser,
    #[error("bad message integrity")]
    BadIntegrity,
}

/// A request whose MESSAGE-INTEGRITY verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The key that verified the request: responses are signed with it.
    pub key: Key,
    pub kind: IntegrityKind,
    /// Expiry of a REST credential (Unix seconds); `None` for static users.
    pub expiry_unix: Option<u64>,
    /// The key per-user quotas count against: the user id of a REST username (the part
    /// after the separator, or the whole username when it has none), a static user's name.
    pub quota_user: String,
}

impl Verified {
    /// Verifies `msg` with this earlier-verified key again: an allocation keeps the
    /// credential it was created with, so a reload that removes its secret does not cut it.
    pub fn reverify(&self, msg: &[u8]) -> Option<Verified> {
        match check(msg, &self.key) {
            Ok(Some(kind)) => Some(Verified {
                kind,
                ..self.clone()
            }),
            _ => None,
        }
    }

    /// The REST credential's timestamp is in the past (the caller decides what that
    /// refuses: always a new allocation, everything under `strict_expiry`).
    pub fn expired(&self, now_unix: u64) -> bool {
        self.expiry_unix.is_some_and(|e| e < now_unix)
    }
}

struct StaticKey {
    md5: Key,
    /// Only when the password is configured (a pre-computed MD5 key cannot give it).
    sha256: Option<Key>,
}

/// Every credential the server accepts: REST secrets (any of them, for rotation) and
/// static users. Built once from the config; lookups are control-path only.
pub struct Credentials {
    realm: String,
    separator: char,
    secrets: Vec<String>,
    users: FxHashMap<String, StaticKey>,
    /// USERHASH (RFC 8489 §14.4) to user name, for static users.
    userhash: FxHashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("secrets", &self.secrets.len())
            .field("users", &self.users.len())
            .finish()
    }
}

/// A static user's `key` was not 32 hex digits (config validation normally catches it).
#[derive(Debug, thiserror::Error)]
#[error("static user {0}: key must be 32 hex digits")]
pub struct BadStaticKey(pub String);

impl Credentials {
    pub fn new(
        realm: &str,
        separator: char,
        secrets: Vec<String>,
        users: &[StaticUser],
    ) -> Result<Credentials, BadStaticKey> {
        let mut map = FxHashMap::default();
        let mut userhash = FxHashMap::default();
        for u in users {
            let k = match (&u.password, &u.key) {
                (Some(p), _) => StaticKey {
                    md5: Key::md5(&u.name, realm, p),
                    sha256: Some(Key::sha256(&u.name, realm, p)),
                },
                (None, Some(hex)) => StaticKey {
                    md5: Key::from_slice(
                        &parse_hex16(hex).ok_or_else(|| BadStaticKey(u.name.clone()))?,
                    ),
                    sha256: None,
                },
                (None, None) => return Err(BadStaticKey(u.name.clone())),
            };
            let h: [u8; 32] = Sha256::new()
                .chain_update(&u.name)
                .chain_update(":")
                .chain_update(realm)
                .finalize()
                .into();
            userhash.insert(h, u.name.clone());
            map.insert(u.name.clone(), k);
        }
        Ok(Credentials {
            realm: realm.to_string(),
            separator,
            secrets,
            users: map,
            userhash,
        })
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The user name a USERHASH stands for (static users only: a REST username cannot
    /// be recovered from its hash).
    pub fn user_for_hash(&self, hash: &[u8]) -> Option<&str> {
        let h: [u8; 32] = hash.try_into().ok()?;
        self.userhash.get(&h).map(String::as_str)
    }

    /// Verifies `msg`'s integrity for `username` (RFC 8489 §9.2.4). Static users first,
    /// then the REST scheme with every configured secret.
    pub fn verify(&self, username: &str, msg: &[u8]) -> Result<Verified, AuthError> {
        if let Some(k) = self.users.get(username) {
            for key in std::iter::once(k.md5).chain(k.sha256) {
                if let Some(kind) = check(msg, &key)? {
                    return Ok(Verified {
                        key,
                        kind,
                        expiry_unix: None,
                        quota_user: username.to_string(),
                    });
                }
            }
            return Err(AuthError::BadIntegrity);
        }
        let Some((expiry, user)) = self.parse_rest(username) else {
            return Err(AuthError::UnknownUser);
        };
        if self.secrets.is_empty() {
            return Err(AuthError::UnknownUser);
        }
        // The SHA-256 key is only worth computing for MESSAGE-INTEGRITY-SHA256.
        let sha256 = matches!(find_integrity(msg), Some((IntegrityKind::Sha256, _)));
        for secret in &self.secrets {
            let password = rest_password(secret, username);
            let md5 = Key::md5(username, &self.realm, &password);
            let sha = sha256.then(|| Key::sha256(username, &self.realm, &password));
            for key in std::iter::once(md5).chain(sha) {
                if let Some(kind) = check(msg, &key)? {
                    return Ok(Verified {
                        key,
                        kind,
                        expiry_unix: Some(expiry),
                        quota_user: user.to_string(),
                    });
                }
            }
        }
        Err(AuthError::BadIntegrity)
    }

    /// `expiry<sep>user` or just `expiry` (draft-uberti-behave-turn-rest-00 §2.2).
    fn parse_rest<'a>(&self, username: &'a str) -> Option<(u64, &'a str)> {
        let (ts, user) = match username.split_once(self.separator) {
            Some((ts, user)) => (ts, user),
            None => (username, username),
        };
        if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((ts.parse().ok()?, user))
    }
}

/// `Ok(Some)` verified, `Ok(None)` mismatch (try the next key), `Err` malformed.
fn check(msg: &[u8], key: &Key) -> Result<Option<IntegrityKind>, AuthError> {
    match verify_integrity(msg, key.as_bytes()) {
        Ok(kind) => Ok(Some(kind)),
        Err(IntegrityError::Mismatch) => Ok(None),
        Err(_) => Err(AuthError::BadIntegrity),
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
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

    fn signed(username: &str, key: &Key) -> Vec<u8> {
        use crate::stun::{attr, class, message_type, method, MessageWriter};
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(
            &mut buf,
            message_type(method::ALLOCATE, class::REQUEST),
            [7; 12],
        )
        .unwrap();
        w.attr(attr::USERNAME, username.as_bytes()).unwrap();
        w.integrity_sha1(key.as_bytes()).unwrap();
        let n = w.finish_with_fingerprint().unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn rest_credentials_verify_with_any_secret() {
        let c = Credentials::new("r", ':', vec!["old".into(), "new".into()], &[]).unwrap();
        let cred = mint_rest_credential("new", "alice", 60, 1000, ":");
        let msg = signed(
            &cred.username,
            &Key::md5(&cred.username, "r", &cred.password),
        );
        let v = c.verify(&cred.username, &msg).unwrap();
        assert_eq!(v.expiry_unix, Some(1060));
        assert_eq!(v.quota_user, "alice");
        assert!(!v.expired(1060));
        assert!(v.expired(1061));
        // Signed with a password from a secret we don't have.
        let bad = rest_password("other", &cred.username);
        let msg = signed(&cred.username, &Key::md5(&cred.username, "r", &bad));
        assert_eq!(
            c.verify(&cred.username, &msg).unwrap_err(),
            AuthError::BadIntegrity
        );
        assert_eq!(c.verify("alice", &msg).unwrap_err(), AuthError::UnknownUser);
    }

    #[test]
    fn static_users_with_password_or_key() {
        let key_hex = "0123456789abcdef0123456789abcdef";
        let users = vec![
            StaticUser {
                name: "bob".into(),
                password: Some("pw".into()),
                key: None,
            },
            StaticUser {
                name: "carol".into(),
                password: None,
                key: Some(key_hex.into()),
            },
        ];
        let c = Credentials::new("r", ':', vec![], &users).unwrap();
        let msg = signed("bob", &Key::md5("bob", "r", "pw"));
        assert!(c.verify("bob", &msg).unwrap().expiry_unix.is_none());
        let msg = signed("carol", &Key::from_slice(&parse_hex16(key_hex).unwrap()));
        assert!(c.verify("carol", &msg).is_ok());
        let msg = signed("bob", &Key::md5("bob", "r", "wrong"));
        assert_eq!(c.verify("bob", &msg).unwrap_err(), AuthError::BadIntegrity);
        let hash: [u8; 32] = Sha256::digest("bob:r").into();
        assert_eq!(c.user_for_hash(&hash), Some("bob"));
    }

    #[test]
    fn mint_builds_expiry_user() {
        let c = mint_rest_credential("s", "bob", 60, 1000, ":");
        assert_eq!(c.username, "1060:bob");
        assert_eq!(c.expiry_unix, 1060);
        assert_eq!(c.password, rest_password("s", "1060:bob"));
    }
}
