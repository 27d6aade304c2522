//! What a certificate name may be: one lowercase DNS name. Identities become DNS SANs, file
//! names and what `[[policy]] identity` globs match, so anything a resolver, a file system or a
//! case-sensitive glob could read two ways is refused with the reason.

use super::PkiError;

/// Longest identity: X.509 bounds a common name to 64 characters.
const MAX_NAME: usize = 64;

/// An identity: one lowercase DNS name, at most 64 characters.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let problem = if name.len() > MAX_NAME {
        Some(format!(
            "{} characters; an identity has at most {MAX_NAME} (the certificate's common name)",
            name.len()
        ))
    } else {
        dns_name_problem(name)
    };
    match problem {
        None => Ok(()),
        Some(reason) => Err(PkiError::Name {
            name: name.to_string(),
            reason,
        }),
    }
}

/// A `--dns` name: a lowercase DNS name (no wildcards), at most 253 characters.
pub fn check_dns_name(name: &str) -> Result<(), PkiError> {
    match dns_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(PkiError::Name {
            name: name.to_string(),
            reason,
        }),
    }
}

fn dns_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty".into());
    }
    if name.len() > 253 {
        return Some(format!(
            "{} characters; a DNS name has at most 253",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(char::is_ascii_uppercase) {
        return Some(format!(
            "contains uppercase {c:?}: DNS ignores case but [[policy]] identities do not; \
             write it in lowercase"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')))
    {
        return Some(format!(
            "contains {c:?}; use lowercase letters, digits, '-' and '.'"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') {
        return Some("starts or ends with '.'".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("has an empty label (\"..\")".into());
        }
        if label.len() > 63 {
            return Some(format!(
                "label {label:?} has {} characters; a DNS label has at most 63",
                label.len()
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Some("ends in an all-digit label, which reads as an address; use --ip".into());
    }
    None
}
