//! Revocation: `pki revoke` keeps one CRL per CA directory (`DIR/crl.pem`), signed by the CA,
//! which both ends of the tunnel load from `[tls] crl` and apply on SIGHUP.
//!
//! A CRL is the whole list every time: a revocation reads the current one (checking that the CA
//! signed it), adds the new serials, and writes the next one with a higher number. Revoking a
//! name revokes every certificate the directory holds for it, renewed ones in `old/` included,
//! so a renewal cannot leave a usable older certificate behind.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams};
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;

use super::{Ca, CertInfo, PkiError, node_paths, old_dir};

/// The CRL's `nextUpdate`. Verifiers here do not enforce it (a CRL that ages must not lock a
/// fleet out); it is set far ahead so other tools reading the file do not reject it either.
const VALID_DAYS: i64 = 3650;

/// Where a CA directory keeps its CRL.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("crl.pem")
}

/// Why a certificate was revoked (RFC 5280 reason codes that apply to a leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reason {
    Unspecified,
    /// Its private key was, or may have been, stolen.
    KeyCompromise,
    /// The holder no longer belongs to the organisation.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// The node or person no longer needs access.
    CessationOfOperation,
    /// Access withdrawn.
    PrivilegeWithdrawn,
}

impl Reason {
    const ALL: [Reason; 6] = [
        Reason::Unspecified,
        Reason::KeyCompromise,
        Reason::AffiliationChanged,
        Reason::Superseded,
        Reason::CessationOfOperation,
        Reason::PrivilegeWithdrawn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "key-compromise",
            Reason::AffiliationChanged => "affiliation-changed",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessation-of-operation",
            Reason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    fn rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        }
    }

    fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.rcgen() as u8 == code)
    }
}

/// One revoked serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serial: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub at: i64,
    pub reason: Option<Reason>,
}

/// A CRL that was checked to come from the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    pub der: Vec<u8>,
    pub number: u64,
    /// Seconds since the Unix epoch.
    pub this_update: i64,
    pub revoked: Vec<Revoked>,
}

impl Crl {
    /// The entry for `serial`, if the CRL lists it.
    pub fn find(&self, serial: &[u8]) -> Option<&Revoked> {
        self.revoked.iter().find(|r| r.serial == serial)
    }

    /// For rustls' verifiers.
    pub fn rustls(&self) -> CertificateRevocationListDer<'static> {
        CertificateRevocationListDer::from(self.der.clone())
    }
}

/// Reads the PEM CRL at `path` and checks that the CA certificate `ca_der` signed it: a CRL
/// from another CA (whose name is the same "gateway CA") would make every handshake fail.
pub fn read(path: &Path, ca_der: &[u8]) -> Result<Crl, PkiError> {
    let parse = |reason: String| PkiError::Parse {
        path: path.to_owned(),
        reason,
    };
    let pem = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let der = CertificateRevocationListDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| parse("no X509 CRL in file".into()))?
        .map_err(|e| parse(e.to_string()))?;
    parse_der(&der, ca_der).map_err(parse)
}

/// A DER CRL, checked against the CA certificate `ca_der`.
pub fn parse_der(der: &[u8], ca_der: &[u8]) -> Result<Crl, String> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| format!("not a CRL: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
    if crl.issuer() != ca.subject() || crl.verify_signature(ca.public_key()).is_err() {
        return Err("not signed by this CA (made by `pki revoke` in another directory?)".into());
    }
    let number = match crl.crl_number() {
        Some(n) => {
            let digits = n.to_u64_digits();
            match digits.as_slice() {
                [] => 0,
                [n] => *n,
                _ => return Err("CRL number too large".into()),
            }
        }
        None => 0,
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.raw_serial().to_vec(),
            at: r.revocation_date.timestamp(),
            reason: r.reason_code().and_then(|(_, c)| Reason::from_code(c.0)),
        })
        .collect();
    Ok(Crl {
        der: der.to_vec(),
        number,
        this_update: crl.last_update().timestamp(),
        revoked,
    })
}

/// Signs a CRL listing `revoked` and writes it over `DIR/crl.pem` (a new file renamed into
/// place, so a reader never sees half of one).
pub(crate) fn write(
    dir: &Path,
    ca: &Ca,
    revoked: &[Revoked],
    number: u64,
    now: time::OffsetDateTime,
) -> Result<PathBuf, PkiError> {
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(VALID_DAYS),
        crl_number: rcgen::SerialNumber::from(number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(r.at).unwrap_or(now),
                reason_code: r.reason.map(Reason::rcgen),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params.signed_by(ca.issuer())?.pem()?;
    let target = path(dir);
    let tmp = dir.join(".crl.pem.new");
    let io = |source| PkiError::Io {
        path: tmp.clone(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &target).map_err(|source| PkiError::Io {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

/// Signs `DIR/crl.pem` again with what it lists, under the next number: creates an empty one
/// for a CA made before `pki init` wrote it. Returns the file, its entries and its number.
pub fn refresh(dir: &Path, now: time::OffsetDateTime) -> Result<(PathBuf, usize, u64), PkiError> {
    let ca = Ca::load(dir)?;
    let crl_path = path(dir);
    let revoked = match crl_path.exists() {
        true => read(&crl_path, &ca.der)?,
        false => Crl {
            der: Vec::new(),
            number: 0,
            this_update: 0,
            revoked: Vec::new(),
        },
    };
    let number = revoked.number.saturating_add(1);
    let target = write(dir, &ca, &revoked.revoked, number, now)?;
    Ok((target, revoked.revoked.len(), number))
}

/// What `revoke` did.
#[derive(Debug)]
pub struct Revocation {
    pub crl: PathBuf,
    /// Certificates of the name this revocation added to the CRL.
    pub added: Vec<CertInfo>,
    /// Certificates of the name the CRL already listed.
    pub already: Vec<CertInfo>,
    /// Entries in the CRL now, and its number.
    pub total: usize,
    pub number: u64,
}

/// Revokes every certificate `dir` holds for `name` (`NAME.pem` and renewed ones in `old/`),
/// or only the one whose serial is `serial` (hexadecimal, as `pki list` shows it), keeping
/// everything the CRL listed before.
pub fn revoke(
    dir: &Path,
    name: &str,
    serial: Option<&str>,
    reason: Option<Reason>,
    now: time::OffsetDateTime,
) -> Result<Revocation, PkiError> {
    super::check_name(name)?;
    let ca = Ca::load(dir)?;
    let mut certs = certificates_of(dir, name, &ca)?;
    if certs.is_empty() {
        return Err(PkiError::Invalid(format!(
            "no certificate for {name:?} in {} (looked at {name}.pem and old/{name}.*.pem)",
            dir.display()
        )));
    }
    if let Some(serial) = serial {
        let wanted = serial.trim().to_ascii_lowercase().replace(':', "");
        let listed: Vec<String> = certs.iter().map(CertInfo::serial_hex).collect();
        certs.retain(|c| c.serial_hex() == wanted);
        if certs.is_empty() {
            return Err(PkiError::Invalid(format!(
                "{name:?} has no certificate with serial {serial} in {} (it has {})",
                dir.display(),
                listed.join(", ")
            )));
        }
    }
    let crl_path = path(dir);
    let current = match crl_path.exists() {
        true => Some(read(&crl_path, &ca.der)?),
        false => None,
    };
    let mut revoked = current
        .as_ref()
        .map(|c| c.revoked.clone())
        .unwrap_or_default();
    let (mut added, mut already) = (Vec::new(), Vec::new());
    for c in certs {
        if revoked.iter().any(|r| r.serial == c.serial) {
            already.push(c);
        } else {
            revoked.push(Revoked {
                serial: c.serial.clone(),
                at: now.unix_timestamp(),
                reason,
            });
            added.push(c);
        }
    }
    let number = current.as_ref().map_or(0, |c| c.number);
    let number = if added.is_empty() {
        number
    } else {
        let next = number.saturating_add(1);
        write(dir, &ca, &revoked, next, now)?;
        next
    };
    Ok(Revocation {
        crl: crl_path,
        added,
        already,
        total: revoked.len(),
        number,
    })
}

/// `NAME.pem` and `old/NAME.SERIAL.pem` that name `name` and were signed by `ca`.
fn certificates_of(dir: &Path, name: &str, ca: &Ca) -> Result<Vec<CertInfo>, PkiError> {
    let mut files = vec![node_paths(dir, name).0];
    let prefix = format!("{name}.");
    if let Ok(entries) = fs::read_dir(old_dir(dir)) {
        let mut old: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.strip_prefix(&prefix))
                    .and_then(|f| f.strip_suffix(".pem"))
                    .is_some_and(|serial| serial.chars().all(|c| c.is_ascii_hexdigit()))
            })
            .collect();
        old.sort();
        files.extend(old);
    }
    let mut out = Vec::new();
    for f in files.into_iter().filter(|f| f.exists()) {
        let der = super::read_der(&f)?;
        let info = CertInfo::from_der(&der).map_err(|reason| PkiError::Parse {
            path: f.clone(),
            reason,
        })?;
        if info.identity == name && ca.signed(&der) {
            out.push(info);
        }
    }
    Ok(out)
}
