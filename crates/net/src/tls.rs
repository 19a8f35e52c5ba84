//! TLS settings for `wss://`: a client trusting the system's roots or a given CA file,
//! and a server presenting a certificate chain and key from PEM files.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls::{ClientConfig, ServerConfig};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What went wrong setting TLS up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("reading {path}: {cause}")]
    Pem {
        path: String,
        cause: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("a certificate in {path} is not usable as a root: {cause}")]
    BadRoot { path: String, cause: rustls::Error },
    #[error("the system has no usable root certificates")]
    NoSystemRoots,
    #[error("certificate and key do not make a server identity: {0}")]
    Identity(rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|cause| TlsError::Pem {
            path: shown.clone(),
            cause,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(shown));
    }
    Ok(certs)
}

/// A client configuration that trusts the certificates in `ca` (PEM), or the system's
/// roots when `ca` is `None` (read once, then shared).
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|cause| TlsError::BadRoot {
                    path: path.display().to_string(),
                    cause,
                })?;
            }
            roots
        }
        None => return system_client_config(),
    };
    Ok(Arc::new(build_client(roots)))
}

fn build_client(roots: rustls::RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The client configuration with the system's roots, loaded on first use.
fn system_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    static SYSTEM: OnceLock<Option<Arc<ClientConfig>>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for error in &loaded.errors {
                tracing::warn!(%error, "reading the system's root certificates");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            (added > 0).then(|| Arc::new(build_client(roots)))
        })
        .clone()
        .ok_or(TlsError::NoSystemRoots)
}

/// A server configuration presenting the chain in `cert` (PEM, leaf first) with the
/// private key in `key` (PEM: PKCS#8, PKCS#1 or SEC1), offering HTTP/1.1 and, with
/// `http2`, HTTP/2 first (ALPN).
pub fn server_config(cert: &Path, key: &Path, http2: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|cause| TlsError::Pem {
        path: key.display().to_string(),
        cause,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}
