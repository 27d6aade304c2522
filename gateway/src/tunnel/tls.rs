//! TLS 1.3 with mutual certificate authentication for the QUIC tunnel.
//!
//! Both sides trust only the private CA (`gatewayctl pki init`). The connector requires a
//! client certificate; the client checks the connector's certificate names `server_name`.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsPaths;

/// ALPN of the tunnel protocol; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"gateway/1";
/// ALPN of `gatewayctl access` connections: one byte stream to a VPC host, no tunnel.
pub const ALPN_ACCESS: &[u8] = b"gateway-access/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in file".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// The connector's TLS: TLS 1.3 only, a client certificate from the CA required. The same
/// settings serve QUIC and the TCP fallback, so both authenticate alike.
pub fn rustls_server(paths: &TlsPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&paths.ca)?, provider()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&paths.cert)?, key(&paths.key)?)?;
    config.alpn_protocols = vec![ALPN.to_vec(), ALPN_ACCESS.to_vec()];
    Ok(Arc::new(config))
}

/// The client's TLS for `alpn` ([`ALPN`] for the tunnel, [`ALPN_ACCESS`] for access streams).
pub fn rustls_client(paths: &TlsPaths, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&paths.ca)?)
        .with_client_auth_cert(certs(&paths.cert)?, key(&paths.key)?)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

pub fn server_config(paths: &TlsPaths) -> Result<QuicServerConfig, TlsError> {
    QuicServerConfig::try_from(rustls_server(paths)?).map_err(|e| TlsError::Quic(e.to_string()))
}

pub fn client_config(paths: &TlsPaths, alpn: &[u8]) -> Result<QuicClientConfig, TlsError> {
    QuicClientConfig::try_from(rustls_client(paths, alpn)?)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// The ALPN protocol a QUIC connection agreed on.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The identity a verified certificate chain names (its leaf's name).
pub fn identity_of_chain(chain: &[CertificateDer<'_>]) -> Option<String> {
    chain.first().and_then(|c| crate::pki::identity_of(c))
}

/// The identity of the peer of an established connection: its certificate's name.
pub fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    identity_of_chain(&chain)
}
