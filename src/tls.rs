//! TLS for TURN (RFC 8656 §3.1 "TURN over TLS", port 5349) and the HTTPS API: certificate
//! loading from PEM files, and one certificate store shared by every listener that can be
//! swapped at run time ([`CertStore::reload`], called on SIGHUP).
//!
//! Owns certificate loading and the rustls server configuration (ring provider, TLS 1.2 and
//! 1.3). It must not open sockets: the TURN workers drive `rustls::ServerConnection` with
//! their own mio sockets, and the HTTP face wraps its tokio streams with tokio-rustls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// Why a certificate or key could not be used. Each names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls.key_file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1),
/// and checks that the key belongs to the leaf certificate.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert_file.to_path_buf(),
        message,
    };
    let key_err = |message: String| TlsError::Key {
        path: key_file.to_path_buf(),
        message,
    };
    // Read first so "cannot read" and "not PEM" are told apart.
    let cert_pem = std::fs::read(cert_file).map_err(|e| cert_err(format!("cannot read: {e}")))?;
    let key_pem = std::fs::read(key_file).map_err(|e| key_err(format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| key_err(format!("no usable PRIVATE KEY block: {e}")))?;
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            key_err("does not match the certificate in tls.cert_file".into())
        }
        rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => {
            cert_err(format!("unusable certificate: {e}"))
        }
        other => key_err(format!("unusable key: {other}")),
    })?;
    Ok(ck)
}

/// The certificate every TLS listener presents; read once per handshake, so a
/// [`CertStore::reload`] applies to the next handshake and leaves open sessions alone.
#[derive(Debug)]
pub struct CertStore {
    cert_file: RwLock<(PathBuf, PathBuf)>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads `cert_file` and `key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertStore, TlsError> {
        let ck = load_certified_key(cert_file, key_file)?;
        Ok(CertStore {
            cert_file: RwLock::new((cert_file.to_path_buf(), key_file.to_path_buf())),
            current: RwLock::new(Arc::new(ck)),
        })
    }

    /// Re-reads the certificate and key from `cert_file`/`key_file` (renewal, SIGHUP). On
    /// error the current certificate stays in use.
    pub fn reload(&self, cert_file: &Path, key_file: &Path) -> Result<(), TlsError> {
        let ck = load_certified_key(cert_file, key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        *self.cert_file.write().unwrap_or_else(|p| p.into_inner()) =
            (cert_file.to_path_buf(), key_file.to_path_buf());
        tracing::info!(cert = %cert_file.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Re-reads the files the store was last loaded from.
    pub fn reload_same(&self) -> Result<(), TlsError> {
        let (c, k) = self
            .cert_file
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.reload(&c, &k)
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The shared TLS state: the swappable certificate and the rustls configuration built on
/// it (one per process; cheap to clone).
#[derive(Clone, Debug)]
pub struct TlsContext {
    pub store: Arc<CertStore>,
    pub server_config: Arc<rustls::ServerConfig>,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: std::time::Duration,
}

impl TlsContext {
    /// Builds the context when `[tls]` names a certificate and key; `None` when TLS is off.
    pub fn from_config(cfg: &TlsConfig) -> Result<Option<TlsContext>, TlsError> {
        let (Some(cert), Some(key)) = (cfg.cert_file.as_deref(), cfg.key_file.as_deref()) else {
            return Ok(None);
        };
        let store = Arc::new(CertStore::load(cert, key)?);
        let server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&store) as Arc<dyn ResolvesServerCert>);
        Ok(Some(TlsContext {
            store,
            server_config: Arc::new(server_config),
            handshake_timeout: std::time::Duration::from_secs(
                cfg.handshake_timeout_secs.max(1).into(),
            ),
        }))
    }

    /// Re-reads the certificate files from the config (SIGHUP). New handshakes get the new
    /// certificate; established sessions continue.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        match (cfg.cert_file.as_deref(), cfg.key_file.as_deref()) {
            (Some(c), Some(k)) => self.store.reload(c, k),
            _ => Err(TlsError::Config(
                "tls.cert_file and tls.key_file cannot be removed by a reload".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A self-signed certificate and key from the openssl CLI, in `dir`.
    fn self_signed(dir: &Path, name: &str) -> Option<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .ok()?
            .status
            .success();
        ok.then_some((cert, key))
    }

    #[test]
    fn loads_a_pair_rejects_mismatch_and_garbage_and_reload_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let Some((c1, k1)) = self_signed(dir.path(), "a") else {
            eprintln!("openssl not installed: skipping");
            return;
        };
        let (c2, k2) = self_signed(dir.path(), "b").unwrap();
        let store = CertStore::load(&c1, &k1).unwrap();
        let first = store.current().cert[0].clone();

        let e = load_certified_key(&c1, &k2).unwrap_err();
        assert!(matches!(e, TlsError::Key { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = load_certified_key(&junk, &k1).unwrap_err();
        assert!(e.to_string().starts_with("tls.cert_file"), "{e}");
        let e = load_certified_key(&c1, &junk).unwrap_err();
        assert!(e.to_string().starts_with("tls.key_file"), "{e}");
        let e = load_certified_key(&dir.path().join("missing"), &k1).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");

        // A failed reload keeps the old certificate; a good one swaps it.
        assert!(store.reload(&c1, &k2).is_err());
        assert_eq!(store.current().cert[0], first);
        store.reload(&c2, &k2).unwrap();
        assert_ne!(store.current().cert[0], first);
    }
}
