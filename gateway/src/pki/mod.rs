//! A small private CA for the tunnel's mutual TLS: `gatewayctl pki init`, `issue`, `renew`,
//! `revoke` and `list`.
//!
//! A node's identity is the name in its certificate (CN, and the first DNS SAN), which is what
//! `[[policy]] identity` matches. Certificates carry a profile — which side of a TLS handshake
//! they may take — so a stolen client key cannot pose as a connector. Keys are written 0600
//! and never overwritten: `renew` moves the old pair into `DIR/old/` first, and revocation is a
//! CRL signed by the CA (`crl`), which is what verifiers consult.

pub mod cli;
pub mod crl;
pub mod list;
mod names;

pub use names::{check_dns_name, check_name};

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Default leaf lifetime: what browsers accept for public certificates, so a stolen key and a
/// forgotten node both age out within about a year.
pub const DEFAULT_DAYS: u32 = 397;
/// Longest leaf lifetime `--days` accepts (the CA itself lasts ten years).
pub const MAX_DAYS: u32 = 3650;
const CA_DAYS: i64 = 3650;

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
    /// A name that is not a lowercase DNS name, with what is wrong with it.
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A request that cannot be carried out as given (lifetime, missing certificate, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Which side of a TLS handshake a certificate may take (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Operator workstations and site gateways: TLS client only (ClientAuth).
    Client,
    /// Connectors: accept clients (ServerAuth), and may dial out to a hub (ClientAuth).
    Connector,
    /// A hub: accepts clients and connectors only (ServerAuth).
    Hub,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Client => "client",
            Profile::Connector => "connector",
            Profile::Hub => "hub",
        }
    }

    fn purposes(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Profile::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Profile::Connector => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Profile::Hub => vec![ExtendedKeyUsagePurpose::ServerAuth],
        }
    }

    /// The profile whose usages a certificate carries, if one does.
    pub fn of(info: &CertInfo) -> Option<Profile> {
        match info.usage {
            Usage::Limited {
                server: false,
                client: true,
            } => Some(Profile::Client),
            Usage::Limited {
                server: true,
                client: true,
            } => Some(Profile::Connector),
            Usage::Limited {
                server: true,
                client: false,
            } => Some(Profile::Hub),
            _ => None,
        }
    }
}

/// What a certificate's extended key usage allows in TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// No extended key usage extension (or anyExtendedKeyUsage): verifiers accept it either way.
    Any,
    Limited {
        server: bool,
        client: bool,
    },
}

impl Usage {
    pub fn allows_server(self) -> bool {
        matches!(self, Usage::Any | Usage::Limited { server: true, .. })
    }

    pub fn allows_client(self) -> bool {
        matches!(self, Usage::Any | Usage::Limited { client: true, .. })
    }
}

/// What `pki list`, `renew`, `revoke` and status need to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject CN: the identity.
    pub identity: String,
    /// The serial as encoded (DER integer content), as CRLs list it.
    pub serial: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub usage: Usage,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("not X.509: {e}"))?;
        let identity = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let usage = match cert.extended_key_usage() {
            Ok(Some(e)) if !e.value.any => Usage::Limited {
                server: e.value.server_auth,
                client: e.value.client_auth,
            },
            Ok(_) => Usage::Any,
            Err(e) => return Err(format!("extended key usage: {e}")),
        };
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            identity,
            serial: cert.raw_serial().to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            usage,
            dns,
            ips,
            is_ca: cert.is_ca(),
        })
    }

    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    /// `client`, `connector`, `hub`, or the usages when they match no profile.
    pub fn profile_name(&self) -> String {
        match (Profile::of(self), self.usage) {
            (Some(p), _) => p.name().to_string(),
            (None, Usage::Any) => "any (no EKU)".into(),
            (None, Usage::Limited { .. }) => "none (no TLS use)".into(),
        }
    }

    /// Subject alternative names, DNS then IP, comma-separated.
    pub fn sans(&self) -> String {
        let mut all: Vec<String> = self.dns.clone();
        all.extend(self.ips.iter().map(IpAddr::to_string));
        all.join(",")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn date(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        Err(_) => format!("@{unix}"),
    }
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

/// Where `renew` keeps replaced pairs: `DIR/old/NAME.SERIAL.pem` and `.key`.
pub fn old_dir(dir: &Path) -> PathBuf {
    dir.join("old")
}

/// Creates `dir/ca.pem`, `dir/ca.key` and an empty `dir/crl.pem`, so configs can name the CRL
/// from the start.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert_path, key_path) = ca_paths(dir);
    let crl_path = crl::path(dir);
    refuse_existing(&[&cert_path, &key_path, &crl_path])?;
    create_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "gateway CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    let ca = Ca::load(dir)?;
    crl::write(dir, &ca, &[], 1, now)?;
    Ok((cert_path, key_path))
}

/// What `issue` and `renew` put into a certificate besides the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    pub profile: Profile,
    pub days: u32,
    /// Extra DNS names (the identity itself is always the first DNS SAN).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            profile: Profile::Client,
            days: DEFAULT_DAYS,
            dns: Vec::new(),
            ips: Vec::new(),
        }
    }
}

/// A certificate and key just written.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub info: CertInfo,
}

/// Issues `dir/NAME.pem` and `dir/NAME.key`, signed by the CA in `dir`.
pub fn issue(dir: &Path, name: &str, opts: &IssueOptions) -> Result<Issued, PkiError> {
    check_name(name)?;
    let (cert_path, key_path) = node_paths(dir, name);
    refuse_existing(&[&cert_path, &key_path])?;
    let ca = Ca::load(dir)?;
    let (cert_pem, key_pem) = ca.sign(name, opts, time::OffsetDateTime::now_utc())?;
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok(Issued {
        info: read_cert(&cert_path)?,
        cert: cert_path,
        key: key_path,
    })
}

/// A renewal: the new pair, and where the old one went.
#[derive(Debug)]
pub struct Renewed {
    pub issued: Issued,
    pub old_cert: PathBuf,
    pub old_key: Option<PathBuf>,
    /// The replaced certificate's serial (hexadecimal), to revoke it alone.
    pub old_serial: String,
}

/// Issues a new key and certificate for `name` with the same profile and alternative names
/// (unless `profile` says otherwise), after moving the current pair to `DIR/old/`.
pub fn renew(
    dir: &Path,
    name: &str,
    profile: Option<Profile>,
    days: u32,
) -> Result<Renewed, PkiError> {
    check_name(name)?;
    let (cert_path, key_path) = node_paths(dir, name);
    if !cert_path.exists() {
        return Err(PkiError::Invalid(format!(
            "{} does not exist: nothing to renew (pki issue makes a first one)",
            cert_path.display()
        )));
    }
    let old = read_cert(&cert_path)?;
    if old.identity != name {
        return Err(PkiError::Parse {
            path: cert_path,
            reason: format!("names {:?}, not {name:?}", old.identity),
        });
    }
    let profile = match profile.or_else(|| Profile::of(&old)) {
        Some(p) => p,
        None => {
            return Err(PkiError::Invalid(format!(
                "{}: its key usage ({}) matches no profile; say which with --profile",
                cert_path.display(),
                old.profile_name()
            )));
        }
    };
    let opts = IssueOptions {
        profile,
        days,
        dns: old.dns.iter().filter(|d| *d != name).cloned().collect(),
        ips: old.ips.clone(),
    };
    let ca = Ca::load(dir)?;
    let (cert_pem, key_pem) = ca.sign(name, &opts, time::OffsetDateTime::now_utc())?;
    let old_dir = old_dir(dir);
    create_dir(&old_dir)?;
    let stem = format!("{name}.{}", old.serial_hex());
    let old_cert = old_dir.join(format!("{stem}.pem"));
    let old_key = old_dir.join(format!("{stem}.key"));
    refuse_existing(&[&old_cert, &old_key])?;
    rename(&cert_path, &old_cert)?;
    let old_key = match key_path.exists() {
        true => {
            if let Err(e) = rename(&key_path, &old_key) {
                let _ = fs::rename(&old_cert, &cert_path);
                return Err(e);
            }
            Some(old_key)
        }
        false => None,
    };
    let written = write_file(&key_path, key_pem.as_bytes(), 0o600)
        .and_then(|()| write_file(&cert_path, cert_pem.as_bytes(), 0o644));
    if let Err(e) = written {
        // Put the old pair back: a failed renewal leaves the node as it was.
        let _ = fs::remove_file(&key_path);
        let _ = fs::remove_file(&cert_path);
        let _ = fs::rename(&old_cert, &cert_path);
        if let Some(k) = &old_key {
            let _ = fs::rename(k, &key_path);
        }
        return Err(e);
    }
    Ok(Renewed {
        issued: Issued {
            info: read_cert(&cert_path)?,
            cert: cert_path,
            key: key_path,
        },
        old_cert,
        old_key,
        old_serial: old.serial_hex(),
    })
}

/// The CA of a directory: its certificate and an issuer holding its key.
pub(crate) struct Ca {
    pub(crate) der: Vec<u8>,
    pub(crate) info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn load(dir: &Path) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = ca_paths(dir);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| PkiError::Parse {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let der = read_der(&cert_path)?;
        let info = CertInfo::from_der(&der).map_err(|reason| PkiError::Parse {
            path: cert_path.clone(),
            reason,
        })?;
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(der.clone()), key).map_err(|e| {
                PkiError::Parse {
                    path: cert_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Ca { der, info, issuer })
    }

    /// A new key and a certificate for it, as PEM (certificate, key).
    fn sign(
        &self,
        name: &str,
        opts: &IssueOptions,
        now: time::OffsetDateTime,
    ) -> Result<(String, String), PkiError> {
        if !(1..=MAX_DAYS).contains(&opts.days) {
            return Err(PkiError::Invalid(format!(
                "--days {} is outside 1-{MAX_DAYS}",
                opts.days
            )));
        }
        let mut sans = vec![SanType::DnsName(name.try_into()?)];
        let mut seen = vec![name.to_string()];
        for d in &opts.dns {
            check_dns_name(d)?;
            if !seen.contains(d) {
                seen.push(d.clone());
                sans.push(SanType::DnsName(d.as_str().try_into()?));
            }
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &opts.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
                sans.push(SanType::IpAddress(*ip));
            }
        }
        let not_after = now + time::Duration::days(i64::from(opts.days));
        if not_after.unix_timestamp() > self.info.not_after {
            let left = (self.info.not_after - now.unix_timestamp()) / 86_400;
            return Err(PkiError::Invalid(format!(
                "the CA expires on {}; a certificate cannot outlive it: use --days {} or fewer",
                date(self.info.not_after),
                left.max(0)
            )));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.extended_key_usages = opts.profile.purposes();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.not_before = now - time::Duration::hours(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Whether `der` was signed by this CA.
    pub(crate) fn signed(&self, der: &[u8]) -> bool {
        signed_by(der, &self.der)
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// Whether the certificate `der` carries a valid signature by the CA certificate `ca_der`.
pub(crate) fn signed_by(der: &[u8], ca_der: &[u8]) -> bool {
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_der) else {
        return false;
    };
    x509_parser::parse_x509_certificate(der)
        .is_ok_and(|(_, c)| c.verify_signature(Some(ca.public_key())).is_ok())
}

/// 16 random bytes, positive and without a leading zero, so the encoding is exactly these.
fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] = (b[0] & 0x7f) | 0x10;
    SerialNumber::from_slice(&b)
}

/// The identity a certificate carries: its subject CN.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The first certificate of a PEM file, parsed.
pub fn read_cert(path: &Path) -> Result<CertInfo, PkiError> {
    CertInfo::from_der(&read_der(path)?).map_err(|reason| PkiError::Parse {
        path: path.to_owned(),
        reason,
    })
}

/// The DER of the first certificate in a PEM file.
pub fn read_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    let pem = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| "no certificate in file".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map(|c| c.to_vec())
        .map_err(|reason| PkiError::Parse {
            path: path.to_owned(),
            reason,
        })
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

fn rename(from: &Path, to: &Path) -> Result<(), PkiError> {
    fs::rename(from, to).map_err(|source| PkiError::Io {
        path: from.to_owned(),
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
mod tests;
