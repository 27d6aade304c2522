//! Unit tests of the trust: real rustls handshakes in memory between the configs the tunnel
//! builds, with certificates from `pki`.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;

use super::*;
use crate::pki::crl::{self, Reason};
use crate::pki::{self, IssueOptions, Profile};

struct Pki(PathBuf);

impl Pki {
    fn new(tag: &str) -> Pki {
        let d = std::env::temp_dir().join(format!("gw-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        pki::init(&d).expect("init");
        Pki(d)
    }

    fn issue(&self, name: &str, profile: Profile, dns: &[&str], ips: &[&str]) {
        let o = IssueOptions {
            profile,
            dns: dns.iter().map(|d| d.to_string()).collect(),
            ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            ..IssueOptions::default()
        };
        pki::issue(&self.0, name, &o).expect("issue");
    }

    fn paths(&self, name: &str, crl: bool) -> TlsPaths {
        TlsPaths {
            ca: self.0.join("ca.pem"),
            cert: self.0.join(format!("{name}.pem")),
            key: self.0.join(format!("{name}.key")),
            crl: crl.then(|| crl::path(&self.0)),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which side refused, and why.
#[derive(Debug)]
enum Refused {
    ByClient(rustls::Error),
    ByServer(rustls::Error),
}

/// A full TLS 1.3 handshake in memory; the chain the server saw, or who refused and why.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    server_name: &str,
) -> Result<Vec<CertificateDer<'static>>, Refused> {
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let mut c = ClientConnection::new(client, name).expect("client");
    let mut s = ServerConnection::new(server).expect("server");
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client writes");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server reads");
        }
        s.process_new_packets().map_err(Refused::ByServer)?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server writes");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client reads");
        }
        c.process_new_packets().map_err(Refused::ByClient)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            return Ok(s.peer_certificates().unwrap_or_default().to_vec());
        }
    }
    panic!("handshake did not finish in 10 rounds");
}

fn invalid_purpose(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    )
}

#[test]
fn a_client_certificate_cannot_pose_as_the_connector() {
    let p = Pki::new("rogue");
    p.issue("vpc-gw-1", Profile::Connector, &[], &[]);
    p.issue("ops-alice", Profile::Client, &[], &[]);
    // A stolen client certificate whose name is the one clients expect of their connector.
    p.issue("gw", Profile::Client, &[], &[]);
    let alice = rustls_client(&p.paths("ops-alice", true), ALPN).expect("client");
    let real = rustls_server(&p.paths("vpc-gw-1", true)).expect("server");
    handshake(alice.clone(), real, "vpc-gw-1").expect("the real connector is accepted");
    let rogue = rustls_server(&p.paths("gw", true)).expect("server");
    match handshake(alice, rogue, "gw") {
        Err(Refused::ByClient(e)) if invalid_purpose(&e) => {}
        other => panic!("a ClientAuth-only certificate served a client: {other:?}"),
    }
}

#[test]
fn a_hub_certificate_cannot_be_used_to_connect_as_a_client() {
    let p = Pki::new("hub");
    p.issue("vpc-gw-1", Profile::Connector, &[], &[]);
    p.issue("hub-1", Profile::Hub, &[], &[]);
    let server = rustls_server(&p.paths("vpc-gw-1", false)).expect("server");
    let hub = rustls_client(&p.paths("hub-1", false), ALPN).expect("client");
    match handshake(hub, server.clone(), "vpc-gw-1") {
        Err(Refused::ByServer(e)) if invalid_purpose(&e) => {}
        other => panic!("a ServerAuth-only certificate connected as a client: {other:?}"),
    }
    // A connector's certificate may dial out (to a hub, later).
    let connector = rustls_client(&p.paths("vpc-gw-1", false), ALPN).expect("client");
    handshake(connector, server, "vpc-gw-1").expect("connector profile as a client");
}

#[test]
fn the_connector_is_checked_by_the_dns_name_or_address_the_client_dials() {
    let p = Pki::new("names");
    p.issue(
        "vpc-gw-1",
        Profile::Connector,
        &["gw.example.net"],
        &["203.0.113.10", "2001:db8:113::10"],
    );
    p.issue("ops-alice", Profile::Client, &[], &[]);
    let alice = rustls_client(&p.paths("ops-alice", false), ALPN).expect("client");
    let server = rustls_server(&p.paths("vpc-gw-1", false)).expect("server");
    for name in [
        "vpc-gw-1",
        "gw.example.net",
        "203.0.113.10",
        "2001:db8:113::10",
    ] {
        handshake(alice.clone(), server.clone(), name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    for name in ["other.example.net", "203.0.113.11"] {
        match handshake(alice.clone(), server.clone(), name) {
            Err(Refused::ByClient(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ))) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn a_revocation_applies_to_the_next_handshake_and_to_a_live_session_check() {
    let p = Pki::new("revoke");
    p.issue("vpc-gw-1", Profile::Connector, &[], &[]);
    p.issue("ops-alice", Profile::Client, &[], &[]);
    p.issue("ops-bob", Profile::Client, &[], &[]);
    let gw = p.paths("vpc-gw-1", true);
    let trust = Trust::load(&gw).expect("trust");
    let server = trust.server_config(&gw).expect("server");
    let alice = rustls_client(&p.paths("ops-alice", true), ALPN).expect("alice");
    let bob = rustls_client(&p.paths("ops-bob", true), ALPN).expect("bob");
    let bob_chain = handshake(bob.clone(), server.clone(), "vpc-gw-1").expect("bob before");
    let alice_chain = handshake(alice.clone(), server.clone(), "vpc-gw-1").expect("alice");
    assert_eq!(trust.check_client(&bob_chain), Ok(()));

    let now = time::OffsetDateTime::now_utc();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let waiting = {
        let trust = trust.clone();
        let chain = bob_chain.clone();
        rt.spawn(async move { trust.client_refused(&chain).await })
    };
    rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(20)).await });
    assert!(!waiting.is_finished(), "bob is not refused yet");
    crl::revoke(&p.0, "ops-bob", None, Some(Reason::KeyCompromise), now).expect("revoke");
    // Until the reload installs it, the old CRL is in force.
    assert_eq!(trust.check_client(&bob_chain), Ok(()));
    trust.install(Verifiers::build(&gw).expect("new CRL"));
    assert_eq!(trust.crl().map(|(_, c)| c.revoked.len()), Some(1));
    assert_eq!(
        trust.check_client(&bob_chain),
        Err("certificate revoked (key-compromise)".into())
    );
    assert_eq!(trust.check_client(&alice_chain), Ok(()));
    // What was waiting on a revocation (access streams) wakes up with the reason.
    assert_eq!(
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await
        })
        .expect("woken by the install")
        .expect("task"),
        "certificate revoked (key-compromise)"
    );
    let alice_waits = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_millis(50),
            trust.client_refused(&alice_chain),
        )
        .await
    });
    assert!(
        alice_waits.is_err(),
        "alice is not refused: {alice_waits:?}"
    );
    // The same server config, built before the revocation, refuses bob now: no resumption.
    match handshake(bob, server.clone(), "vpc-gw-1") {
        Err(Refused::ByServer(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
        other => panic!("a revoked client got in: {other:?}"),
    }
    handshake(alice, server, "vpc-gw-1").expect("alice after");
}

#[test]
fn a_client_refuses_a_revoked_connector() {
    let p = Pki::new("revoked-gw");
    p.issue("vpc-gw-1", Profile::Connector, &[], &[]);
    p.issue("ops-alice", Profile::Client, &[], &[]);
    let server = rustls_server(&p.paths("vpc-gw-1", true)).expect("server");
    let alice_paths = p.paths("ops-alice", true);
    let trust = Trust::load(&alice_paths).expect("trust");
    let alice = trust.client_config(&alice_paths, ALPN).expect("client");
    handshake(alice.clone(), server.clone(), "vpc-gw-1").expect("before");
    let gw_chain = vec![CertificateDer::from(
        pki::read_der(&p.0.join("vpc-gw-1.pem")).expect("der"),
    )];
    assert_eq!(trust.check_server(&gw_chain, "vpc-gw-1"), Ok(()));
    crl::revoke(
        &p.0,
        "vpc-gw-1",
        None,
        None,
        time::OffsetDateTime::now_utc(),
    )
    .expect("revoke");
    trust.install(Verifiers::build(&alice_paths).expect("new CRL"));
    assert_eq!(
        trust.check_server(&gw_chain, "vpc-gw-1"),
        Err("certificate revoked".into())
    );
    match handshake(alice, server, "vpc-gw-1") {
        Err(Refused::ByClient(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
        other => panic!("a revoked connector was accepted: {other:?}"),
    }
}

#[test]
fn config_checks_name_the_key_for_a_wrong_profile_or_a_foreign_crl() {
    let p = Pki::new("check");
    let other = Pki::new("check-other");
    p.issue("vpc-gw-1", Profile::Connector, &[], &[]);
    p.issue("ops-alice", Profile::Client, &[], &[]);
    p.issue("hub-1", Profile::Hub, &[], &[]);
    assert!(check_files(&p.paths("vpc-gw-1", true), true).is_empty());
    assert!(check_files(&p.paths("ops-alice", true), false).is_empty());
    let keys = |v: Vec<(&'static str, String)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(check_files(&p.paths("ops-alice", false), true)),
        ["tls.cert"]
    );
    assert_eq!(
        keys(check_files(&p.paths("hub-1", false), false)),
        ["tls.cert"]
    );
    let mut foreign = p.paths("vpc-gw-1", false);
    foreign.crl = Some(crl::path(&other.0));
    let problems = check_files(&foreign, true);
    assert_eq!(keys(problems.clone()), ["tls.crl"]);
    assert!(
        problems[0].1.contains("not signed by this CA"),
        "{problems:?}"
    );
    assert!(Trust::load(&foreign).is_err(), "the daemon refuses it too");
}
