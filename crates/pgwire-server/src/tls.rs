//! TLS configuration from PEM files: rustls with the ring provider (pgwire's
//! `server-api-ring` feature), so no aws-lc-sys build (DESIGN.md section 8).

use pgwire::tokio::tokio_rustls::rustls;
use pgwire::tokio::TlsAcceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Builds the acceptor for [`crate::ServerConfig::tls`] from a PEM certificate chain
/// and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_acceptor_from_pem(
    cert_chain_pem: &[u8],
    private_key_pem: &[u8],
) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(private_key_pem)
        .map_err(|e| format!("bad private key PEM: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
