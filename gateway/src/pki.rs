//! A small private CA for the tunnel's mutual TLS: `gatewayctl pki init` and `pki issue`.
//!
//! A node's identity is the name in its certificate (CN and DNS SAN are both set to it), which
//! is what `[[policy]] identity` matches and what a client checks the connector against. Keys
//! are written 0600 and never overwritten: re-issuing is an explicit act (delete, then issue).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} already exists; refusing to overwrite a key or certificate")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cert(#[from] rcgen::Error),
    #[error("invalid name {0:?}: use 1-64 letters, digits, '-', '_' and '.'")]
    Name(String),
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// Paths of a CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Paths of `name`'s certificate and key in `dir`.
pub fn node_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Creates `dir/ca.pem` and `dir/ca.key`.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert_path, key_path) = ca_paths(dir);
    refuse_existing(&[&cert_path, &key_path])?;
    create_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "gateway CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Issues `dir/NAME.pem` and `dir/NAME.key`, signed by the CA in `dir`, usable as both TLS
/// server and client certificate.
pub fn issue(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    check_name(name)?;
    let (ca_cert_path, ca_key_path) = ca_paths(dir);
    let (cert_path, key_path) = node_paths(dir, name);
    refuse_existing(&[&cert_path, &key_path])?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| PkiError::Parse {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key).map_err(|e| PkiError::Parse {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The identity a certificate carries: its subject CN.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Names become DNS SANs and file names: keep them to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_string()))
    }
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates the file with its final mode from the start, so a key is never briefly readable.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gw-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn der_of(pem_path: &Path) -> Vec<u8> {
        let text = fs::read_to_string(pem_path).expect("read pem");
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    }

    /// Tiny standard base64 decoder, so the test does not trust the code under test to parse.
    fn base64_decode(s: &str) -> Vec<u8> {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = alphabet.iter().position(|a| *a == c).expect("base64") as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn issues_certificates_whose_identity_is_the_name_and_keys_are_private() {
        let dir = tempdir("issue");
        init(&dir).expect("init");
        let (cert, key) = issue(&dir, "ops-alice").expect("issue");
        assert_eq!(identity_of(&der_of(&cert)).as_deref(), Some("ops-alice"));
        assert_eq!(
            identity_of(&der_of(&dir.join("ca.pem"))).as_deref(),
            Some("gateway CA")
        );
        for k in [key, dir.join("ca.key")] {
            let mode = fs::metadata(&k).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", k.display());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn never_overwrites_and_rejects_bad_names() {
        let dir = tempdir("overwrite");
        init(&dir).expect("init");
        assert!(matches!(init(&dir), Err(PkiError::Exists(_))));
        issue(&dir, "gw-1").expect("issue");
        assert!(matches!(issue(&dir, "gw-1"), Err(PkiError::Exists(_))));
        for bad in ["", "../x", "a b", "-x", "x/y"] {
            assert!(
                matches!(issue(&dir, bad), Err(PkiError::Name(_))),
                "{bad:?}"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn issue_without_a_ca_names_the_missing_file() {
        let dir = tempdir("noca");
        fs::create_dir_all(&dir).expect("mkdir");
        let err = issue(&dir, "x").expect_err("no CA").to_string();
        assert!(err.contains("ca.key"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_is_no_identity() {
        assert_eq!(identity_of(b"not a certificate"), None);
        assert_eq!(identity_of(&[]), None);
    }
}
