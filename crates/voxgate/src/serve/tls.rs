//! TLS on the listener (`server.tls_cert_file` / `server.tls_key_file`, PEM): rustls with the
//! aws-lc-rs provider, HTTP/1.1 only. Clients that insist on `wss://` (OpenAI's JS SDK, browsers
//! on other origins) can then reach voxgate without a proxy in front. The handshake runs in the
//! connection's task under the header-read deadline, so a client that stalls it holds nothing
//! past that.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls_cert_file {path:?}: {why}")]
    Cert { path: String, why: String },
    #[error("server.tls_key_file {path:?}: {why}")]
    Key { path: String, why: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The acceptor for a PEM certificate chain and private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |why: String| TlsError::Cert {
        path: cert.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        why: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
