//! `pki list`: every certificate a CA directory holds, with profile, names, serial, expiry and
//! revocation, and a warning for each one that expires soon. Rendering takes `now`, so the
//! expiry logic is tested without waiting for a certificate to age.

use std::fmt::Write;
use std::fs;
use std::path::{Path, PathBuf};

use super::crl::{self, Crl, Revoked};
use super::{CertInfo, PkiError, ca_paths, date, old_dir, signed_by};

/// Certificates expiring within this many days are warned about (`pki list`, status).
pub const WARN_DAYS: i64 = 30;

/// How far a certificate is from its `notAfter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Valid {
        days: i64,
    },
    /// Within [`WARN_DAYS`].
    Soon {
        days: i64,
    },
    Expired {
        days_ago: i64,
    },
}

/// Whole days left (rounded down), or whole days since it expired.
pub fn expiry(not_after: i64, now: i64) -> Expiry {
    if now > not_after {
        Expiry::Expired {
            days_ago: (now - not_after) / 86_400,
        }
    } else {
        let days = (not_after - now) / 86_400;
        if days < WARN_DAYS {
            Expiry::Soon { days }
        } else {
            Expiry::Valid { days }
        }
    }
}

/// The warning for a certificate, if it needs one: `expires in 12 days (2027-01-05)`.
pub fn expiry_warning(not_after: i64, now: i64) -> Option<String> {
    match expiry(not_after, now) {
        Expiry::Valid { .. } => None,
        Expiry::Soon { days } => Some(format!(
            "expires in {days} day{} ({})",
            if days == 1 { "" } else { "s" },
            date(not_after)
        )),
        Expiry::Expired { days_ago } => Some(format!(
            "EXPIRED on {} ({days_ago} day{} ago)",
            date(not_after),
            if days_ago == 1 { "" } else { "s" }
        )),
    }
}

/// One certificate file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub file: PathBuf,
    pub info: CertInfo,
    /// Replaced by `renew` (in `old/`).
    pub old: bool,
    /// Its CRL entry, when revoked.
    pub revoked: Option<Revoked>,
}

/// What a CA directory holds.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub dir: PathBuf,
    pub ca: CertInfo,
    pub crl: Option<Crl>,
    pub entries: Vec<Entry>,
    /// Files that look like certificates but do not parse or are not from this CA.
    pub problems: Vec<String>,
}

/// Reads `dir`: the CA, its CRL, `*.pem` and `old/*.pem`.
pub fn inventory(dir: &Path) -> Result<Inventory, PkiError> {
    let (ca_path, _) = ca_paths(dir);
    let ca_der = super::read_der(&ca_path)?;
    let ca = CertInfo::from_der(&ca_der).map_err(|reason| PkiError::Parse {
        path: ca_path.clone(),
        reason,
    })?;
    let crl_path = crl::path(dir);
    let crl = match crl_path.exists() {
        true => Some(crl::read(&crl_path, &ca_der)?),
        false => None,
    };
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (folder, old) in [(dir.to_path_buf(), false), (old_dir(dir), true)] {
        let Ok(listing) = fs::read_dir(&folder) else {
            continue;
        };
        let mut files: Vec<PathBuf> = listing
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .filter(|p| *p != ca_path && *p != crl_path)
            .collect();
        files.sort();
        for file in files {
            let der = match super::read_der(&file) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            match CertInfo::from_der(&der) {
                Ok(info) if signed_by(&der, &ca_der) => entries.push(Entry {
                    revoked: crl.as_ref().and_then(|c| c.find(&info.serial)).cloned(),
                    file,
                    info,
                    old,
                }),
                Ok(_) => problems.push(format!("{}: not issued by this CA", file.display())),
                Err(e) => problems.push(format!("{}: {e}", file.display())),
            }
        }
    }
    Ok(Inventory {
        dir: dir.to_path_buf(),
        ca,
        crl,
        entries,
        problems,
    })
}

fn state(e: &Entry, now: i64) -> String {
    if let Some(r) = &e.revoked {
        return match r.reason {
            Some(reason) => format!("REVOKED {} ({})", date(r.at), reason.name()),
            None => format!("REVOKED {}", date(r.at)),
        };
    }
    let superseded = if e.old { ", superseded" } else { "" };
    match expiry(e.info.not_after, now) {
        Expiry::Valid { days } => format!("valid, {days} days left{superseded}"),
        Expiry::Soon { days } => format!("EXPIRES in {days} days{superseded}"),
        Expiry::Expired { days_ago } => format!("EXPIRED {days_ago} days ago"),
    }
}

/// The table, the CRL line, then one warning per current certificate (and the CA) that
/// expires within [`WARN_DAYS`].
pub fn render(inv: &Inventory, now: i64) -> String {
    let mut out = String::new();
    let mut rows = vec![[
        "NAME".to_string(),
        "PROFILE".into(),
        "NAMES (SAN)".into(),
        "SERIAL".into(),
        "NOT AFTER".into(),
        "STATE".into(),
    ]];
    rows.push([
        format!("{} (CA)", inv.ca.identity),
        "ca".into(),
        "-".into(),
        inv.ca.serial_hex(),
        date(inv.ca.not_after),
        state(
            &Entry {
                file: PathBuf::new(),
                info: inv.ca.clone(),
                old: false,
                revoked: None,
            },
            now,
        ),
    ]);
    for e in &inv.entries {
        rows.push([
            if e.old {
                format!("{} (old)", e.info.identity)
            } else {
                e.info.identity.clone()
            },
            e.info.profile_name(),
            e.info.sans(),
            e.info.serial_hex(),
            date(e.info.not_after),
            state(e, now),
        ]);
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{c:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    match &inv.crl {
        Some(c) => {
            let _ = writeln!(
                out,
                "\ncrl.pem: {} revoked, number {}, issued {}",
                c.revoked.len(),
                c.number,
                date(c.this_update)
            );
        }
        None => out.push_str("\ncrl.pem: none (pki revoke writes it)\n"),
    }
    let mut warnings = Vec::new();
    if let Some(w) = expiry_warning(inv.ca.not_after, now) {
        warnings.push(format!(
            "warning: the CA {w}: every certificate it issued stops working with it"
        ));
    }
    for e in inv.entries.iter().filter(|e| !e.old && e.revoked.is_none()) {
        if let Some(w) = expiry_warning(e.info.not_after, now) {
            warnings.push(format!(
                "warning: {} {w}: gatewayctl pki renew {} --dir {}",
                e.info.identity,
                e.info.identity,
                inv.dir.display()
            ));
        }
    }
    for p in &inv.problems {
        warnings.push(format!("warning: {p}"));
    }
    if !warnings.is_empty() {
        out.push('\n');
        for w in warnings {
            out.push_str(&w);
            out.push('\n');
        }
    }
    out
}
