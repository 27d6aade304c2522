//! Real certificates for the in-process tests: a CA, a connector, clients and a foreign CA,
//! made once per test process, and a TLS 1.3 handshake between the tunnel's own rustls
//! configurations with the bytes passed in memory — so "refused for a foreign certificate" is
//! decided by the same code as in production, without a socket.

use std::path::{Path, PathBuf};

use crate::config::TlsPaths;

pub const CONNECTOR: &str = super::pair::CONNECTOR;

/// Certificates made once per test process: a CA, a connector, clients, and a foreign CA.
pub struct Pki {
    dir: PathBuf,
    foreign: PathBuf,
}

impl Pki {
    pub fn get() -> &'static Pki {
        static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("gateway-pair-{}", std::process::id()));
            let foreign = dir.join("foreign");
            let _ = std::fs::remove_dir_all(&dir);
            crate::pki::init(&dir).expect("ca");
            crate::pki::init(&foreign).expect("foreign ca");
            let client = crate::pki::IssueOptions::default();
            let connector = crate::pki::IssueOptions {
                profile: crate::pki::Profile::Connector,
                ..Default::default()
            };
            crate::pki::issue(&dir, CONNECTOR, &connector).expect("issue");
            for name in ["ops-alice", "ops-bob", "mallory", "site-tokyo"] {
                crate::pki::issue(&dir, name, &client).expect("issue");
            }
            crate::pki::issue(&foreign, "ops-alice", &client).expect("issue foreign");
            Pki { dir, foreign }
        })
    }

    pub fn paths(&self, name: &str, foreign: bool) -> TlsPaths {
        let dir: &Path = if foreign { &self.foreign } else { &self.dir };
        let (ca, _) = crate::pki::ca_paths(dir);
        let (cert, key) = crate::pki::node_paths(dir, name);
        TlsPaths {
            ca,
            cert,
            key,
            crl: None,
        }
    }
}

/// A full TLS 1.3 handshake between the tunnel's real client and server configurations, bytes
/// passed in memory. Returns (the identity the connector sees, the one the client sees).
pub fn tls_handshake(client: &TlsPaths, server: &TlsPaths) -> Result<(String, String), String> {
    use crate::tunnel::tls;
    let ccfg = tls::rustls_client(client, tls::ALPN).map_err(|e| e.to_string())?;
    let scfg = tls::rustls_server(server).map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(CONNECTOR).map_err(|e| e.to_string())?;
    let mut c = rustls::ClientConnection::new(ccfg, name).map_err(|e| e.to_string())?;
    let mut s = rustls::ServerConnection::new(scfg).map_err(|e| e.to_string())?;
    for _ in 0..16 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets().map_err(|e| e.to_string())?;
        if !c.is_handshaking() && !s.is_handshaking() {
            let seen_by_server = s
                .peer_certificates()
                .and_then(tls::identity_of_chain)
                .ok_or("client certificate carries no name")?;
            let seen_by_client = c
                .peer_certificates()
                .and_then(tls::identity_of_chain)
                .ok_or("server certificate carries no name")?;
            return Ok((seen_by_server, seen_by_client));
        }
    }
    Err("handshake did not finish".into())
}
