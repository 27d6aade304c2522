//! TLS 1.3 with mutual certificate authentication, for QUIC and the TCP fallback alike.
//!
//! Both sides trust only the private CA and, with `[tls] crl`, refuse every certificate its CRL
//! lists. The verifiers live in a [`Trust`] that a reload (SIGHUP) swaps: the rustls configs
//! hold a small verifier that asks the trust of the moment, so new handshakes follow a new CRL
//! at once without rebuilding endpoints or acceptors, and live sessions are checked again with
//! [`Trust::check_client`] / [`Trust::check_server`]. Session resumption is off on both sides:
//! a resumed session skips certificate verification, which would let a revoked peer back in.
//!
//! The connector requires a client certificate that allows ClientAuth; the client requires a
//! connector certificate that allows ServerAuth and names `server_name` (a DNS SAN, or an IP
//! SAN when it dials an address).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::TlsPaths;
use crate::pki::crl::{self, Crl};

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
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto: {0}")]
    Quic(String),
    /// `[tls] crl` does not parse or was not signed by `[tls] ca`.
    #[error("{0}")]
    Crl(#[from] crate::pki::PkiError),
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

/// The verifiers for one CA and CRL. Built apart from [`Trust::install`] so a reload can fail
/// (a bad CRL) before anything changes.
pub struct Verifiers {
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
    crl: Option<(PathBuf, Crl)>,
}

impl Verifiers {
    /// Reads `[tls] ca` and, when set, `[tls] crl` (checked to be signed by that CA).
    pub fn build(paths: &TlsPaths) -> Result<Verifiers, TlsError> {
        let ca = certs(&paths.ca)?;
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots.add(c.clone())?;
        }
        let roots = Arc::new(roots);
        let crl = match &paths.crl {
            Some(p) => Some((p.clone(), crl::read(p, &ca[0])?)),
            None => None,
        };
        let crls: Vec<_> = crl.iter().map(|(_, c)| c.rustls()).collect();
        // No intermediates in this PKI: the leaf is all a CRL from the CA can speak for. An
        // ageing CRL is not enforced (nextUpdate), so a late copy never locks a fleet out.
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .build()?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()?;
        Ok(Verifiers {
            clients,
            servers,
            crl,
        })
    }

    /// The CRL these verifiers apply, with the file it came from.
    pub fn crl(&self) -> Option<&(PathBuf, Crl)> {
        self.crl.as_ref()
    }
}

/// The verifiers in force, swapped whole by a reload.
pub struct Trust {
    /// The CA's name, offered to clients; the CA cannot change without a restart.
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<Verifiers>>,
    /// Bumped by every [`install`](Self::install), for what waits on a revocation.
    generation: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

impl Trust {
    pub fn load(paths: &TlsPaths) -> Result<Arc<Trust>, TlsError> {
        let v = Verifiers::build(paths)?;
        Ok(Arc::new(Trust {
            hints: v.clients.root_hint_subjects().to_vec(),
            current: RwLock::new(Arc::new(v)),
            generation: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// From now on every handshake is verified with `v`.
    pub fn install(&self, v: Verifiers) {
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(v),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(v),
        }
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Resolves, with the reason, once the trust in force refuses this client chain: at once if
    /// it does already, else after the reload that makes it so. Never resolves otherwise.
    pub async fn client_refused(&self, chain: &[CertificateDer<'_>]) -> String {
        let mut installed = self.generation.subscribe();
        loop {
            if let Err(reason) = self.check_client(chain) {
                return reason;
            }
            if installed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn current(&self) -> Arc<Verifiers> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The CRL in force and its file.
    pub fn crl(&self) -> Option<(PathBuf, Crl)> {
        self.current().crl.clone()
    }

    /// Whether a client's certificate chain (leaf first), accepted at its handshake, would be
    /// accepted now; the reason to close its session otherwise.
    pub fn check_client(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let v = self.current();
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        v.clients
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map(drop)
            .map_err(|e| verdict(&v, leaf, e))
    }

    /// Whether the connector's chain would be accepted now for `server_name`.
    pub fn check_server(
        &self,
        chain: &[CertificateDer<'_>],
        server_name: &str,
    ) -> Result<(), String> {
        let v = self.current();
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        let name = ServerName::try_from(server_name).map_err(|e| e.to_string())?;
        v.servers
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map(drop)
            .map_err(|e| verdict(&v, leaf, e))
    }

    /// The connector's TLS: TLS 1.3 only, a client certificate from the CA required. The same
    /// config serves QUIC and the TCP fallback, so both authenticate alike.
    pub fn server_config(
        self: &Arc<Self>,
        paths: &TlsPaths,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = Arc::new(CurrentClientVerifier(self.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&paths.cert)?, key(&paths.key)?)?;
        config.alpn_protocols = vec![ALPN.to_vec(), ALPN_ACCESS.to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client's TLS for `alpn` ([`ALPN`] for the tunnel, [`ALPN_ACCESS`] for access).
    pub fn client_config(
        self: &Arc<Self>,
        paths: &TlsPaths,
        alpn: &[u8],
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let verifier = Arc::new(CurrentServerVerifier(self.clone()));
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs(&paths.cert)?, key(&paths.key)?)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    pub fn quic_server(self: &Arc<Self>, paths: &TlsPaths) -> Result<QuicServerConfig, TlsError> {
        QuicServerConfig::try_from(self.server_config(paths)?)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }

    pub fn quic_client(
        self: &Arc<Self>,
        paths: &TlsPaths,
        alpn: &[u8],
    ) -> Result<QuicClientConfig, TlsError> {
        QuicClientConfig::try_from(self.client_config(paths, alpn)?)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// Why a live session's certificate is refused now: `certificate revoked (key-compromise)`.
fn verdict(v: &Verifiers, leaf: &CertificateDer<'_>, e: rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            let reason = crate::pki::CertInfo::from_der(leaf)
                .ok()
                .and_then(|i| v.crl.as_ref()?.1.find(&i.serial).cloned())
                .and_then(|r| r.reason);
            match reason {
                Some(r) => format!("certificate revoked ({})", r.name()),
                None => "certificate revoked".into(),
            }
        }
        other => format!("certificate no longer accepted: {other}"),
    }
}

/// Asks the [`Trust`] of the moment; what rustls holds in the connector's config.
#[derive(Debug)]
struct CurrentClientVerifier(Arc<Trust>);

impl ClientCertVerifier for CurrentClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().clients.supported_verify_schemes()
    }
}

/// Asks the [`Trust`] of the moment; what rustls holds in the client's config.
#[derive(Debug)]
struct CurrentServerVerifier(Arc<Trust>);

impl ServerCertVerifier for CurrentServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().servers.supported_verify_schemes()
    }
}

/// The connector's rustls config with the trust read from `paths` now (no reload).
pub fn rustls_server(paths: &TlsPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Trust::load(paths)?.server_config(paths)
}

/// The client's rustls config for `alpn` with the trust read from `paths` now (no reload):
/// `gatewayctl access` runs once and reads the CRL once.
pub fn rustls_client(paths: &TlsPaths, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Trust::load(paths)?.client_config(paths, alpn)
}

pub fn server_config(paths: &TlsPaths) -> Result<QuicServerConfig, TlsError> {
    Trust::load(paths)?.quic_server(paths)
}

pub fn client_config(paths: &TlsPaths, alpn: &[u8]) -> Result<QuicClientConfig, TlsError> {
    Trust::load(paths)?.quic_client(paths, alpn)
}

/// What `[tls]` must hold for this role, beyond readable files: the CRL signed by the CA, and
/// a certificate whose profile fits (a connector's must allow ServerAuth, a client's
/// ClientAuth). `(key, reason)` per problem.
pub fn check_files(paths: &TlsPaths, connector: bool) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    match crate::pki::read_cert(&paths.cert) {
        Ok(info) if connector && !info.usage.allows_server() => problems.push((
            "tls.cert",
            format!(
                "{}: the certificate of {:?} (profile {}) does not allow serving clients \
                 (ServerAuth); a connector needs one issued with --profile connector",
                paths.cert.display(),
                info.identity,
                info.profile_name()
            ),
        )),
        Ok(info) if !connector && !info.usage.allows_client() => problems.push((
            "tls.cert",
            format!(
                "{}: the certificate of {:?} (profile {}) does not allow TLS client use \
                 (ClientAuth); a client needs one issued with --profile client",
                paths.cert.display(),
                info.identity,
                info.profile_name()
            ),
        )),
        Ok(_) => {}
        Err(e) => problems.push(("tls.cert", e.to_string())),
    }
    if let Some(crl_path) = &paths.crl {
        match crate::pki::read_der(&paths.ca) {
            Ok(ca) => {
                if let Err(e) = crl::read(crl_path, &ca) {
                    problems.push(("tls.crl", e.to_string()));
                }
            }
            Err(e) => problems.push(("tls.ca", e.to_string())),
        }
    }
    problems
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

/// The certificate chain the peer of an established QUIC connection presented.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    let any = conn.peer_identity()?;
    any.downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|c| *c)
}

/// The identity of the peer of an established connection: its certificate's name.
pub fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    identity_of_chain(&peer_chain(conn)?)
}

#[cfg(test)]
mod tests;
