//! Unit tests of the CA: names, profiles, names in certificates, lifetimes, renewal,
//! revocation and the expiry warnings.

use super::crl::{self, Reason};
use super::list::{self, Expiry};
use super::*;
use std::os::unix::fs::PermissionsExt;

/// A fresh directory per test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("gw-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        TempDir(d)
    }

    fn with_ca(tag: &str) -> TempDir {
        let d = TempDir::new(tag);
        init(&d.0).expect("init");
        d
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn opts(profile: Profile) -> IssueOptions {
    IssueOptions {
        profile,
        ..IssueOptions::default()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[test]
fn issues_certificates_whose_identity_is_the_name_and_keys_are_private() {
    let dir = TempDir::with_ca("issue");
    let i = issue(&dir.0, "ops-alice", &IssueOptions::default()).expect("issue");
    assert_eq!(
        identity_of(&read_der(&i.cert).expect("der")).as_deref(),
        Some("ops-alice")
    );
    assert_eq!(
        identity_of(&read_der(&dir.0.join("ca.pem")).expect("der")).as_deref(),
        Some("gateway CA")
    );
    for k in [i.key, dir.0.join("ca.key")] {
        let mode = fs::metadata(&k).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", k.display());
    }
}

#[test]
fn names_must_be_lowercase_dns_names() {
    for good in [
        "a",
        "gw-1",
        "ops-alice",
        "vpc-gw-1",
        "gw.example.net",
        "a1.b2",
        &"x".repeat(63),
    ] {
        assert!(check_name(good).is_ok(), "{good:?}");
    }
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("a..b", "empty label"),
        (".a", "starts or ends with '.'"),
        ("a.", "starts or ends with '.'"),
        ("-x", "starts or ends with '-'"),
        ("x-", "starts or ends with '-'"),
        ("a.-b.c", "label \"-b\""),
        ("Ops-Alice", "uppercase 'O'"),
        ("a_b", "contains '_'"),
        ("a b", "contains ' '"),
        ("../x", "contains '/'"),
        ("x/y", "contains '/'"),
        ("ops-\u{e9}", "contains '\u{e9}'"),
        ("10.0.0.1", "all-digit label"),
        ("host.123", "all-digit label"),
    ];
    for (bad, why) in cases {
        let err = check_name(bad).expect_err(bad).to_string();
        assert!(err.contains(why), "{bad:?}: {err}");
        assert!(err.starts_with("invalid name"), "{err}");
    }
    let long_label = format!("{}.net", "x".repeat(64));
    assert!(
        check_dns_name(&long_label)
            .expect_err("label")
            .to_string()
            .contains("at most 63")
    );
    let err = check_name(&format!("{}.{}", "a".repeat(40), "b".repeat(40))).expect_err("long");
    assert!(err.to_string().contains("at most 64"), "{err}");
    assert!(check_dns_name(&format!("{}.{}", "a".repeat(40), "b".repeat(40))).is_ok());
}

#[test]
fn never_overwrites_and_refuses_bad_names_before_touching_files() {
    let dir = TempDir::with_ca("overwrite");
    assert!(matches!(init(&dir.0), Err(PkiError::Exists(_))));
    issue(&dir.0, "gw-1", &IssueOptions::default()).expect("issue");
    assert!(matches!(
        issue(&dir.0, "gw-1", &IssueOptions::default()),
        Err(PkiError::Exists(_))
    ));
    for bad in ["", "../x", "a b", "-x", "x/y", "a..b"] {
        assert!(
            matches!(
                issue(&dir.0, bad, &IssueOptions::default()),
                Err(PkiError::Name { .. })
            ),
            "{bad:?}"
        );
    }
    let bad_dns = IssueOptions {
        dns: vec!["gw..example.net".into()],
        ..IssueOptions::default()
    };
    assert!(matches!(
        issue(&dir.0, "gw-2", &bad_dns),
        Err(PkiError::Name { .. })
    ));
    assert!(!dir.0.join("gw-2.pem").exists() && !dir.0.join("gw-2.key").exists());
}

#[test]
fn issue_without_a_ca_names_the_missing_file() {
    let dir = TempDir::new("noca");
    fs::create_dir_all(&dir.0).expect("mkdir");
    let err = issue(&dir.0, "x", &IssueOptions::default())
        .expect_err("no CA")
        .to_string();
    assert!(err.contains("ca.key"), "{err}");
}

#[test]
fn profiles_carry_only_their_key_usages() {
    let dir = TempDir::with_ca("profiles");
    let cases = [
        (Profile::Client, false, true),
        (Profile::Connector, true, true),
        (Profile::Hub, true, false),
    ];
    for (profile, server, client) in cases {
        let name = format!("n-{}", profile.name());
        let info = issue(&dir.0, &name, &opts(profile)).expect("issue").info;
        assert_eq!(info.usage, Usage::Limited { server, client }, "{profile:?}");
        assert_eq!(Profile::of(&info), Some(profile));
        assert_eq!(info.profile_name(), profile.name());
        assert!(!info.is_ca);
    }
    let ca = read_cert(&dir.0.join("ca.pem")).expect("ca");
    assert!(ca.is_ca);
}

#[test]
fn alternative_names_hold_the_identity_then_dns_names_and_addresses() {
    let dir = TempDir::with_ca("sans");
    let o = IssueOptions {
        profile: Profile::Connector,
        days: DEFAULT_DAYS,
        dns: vec![
            "gw.example.net".into(),
            "gw.example.net".into(),
            "vpc-gw-1".into(),
        ],
        ips: vec![
            "203.0.113.10".parse().expect("ip"),
            "2001:db8:113::10".parse().expect("ip"),
        ],
    };
    let info = issue(&dir.0, "vpc-gw-1", &o).expect("issue").info;
    assert_eq!(info.dns, ["vpc-gw-1", "gw.example.net"], "no duplicates");
    assert_eq!(info.ips, o.ips);
    assert_eq!(
        info.sans(),
        "vpc-gw-1,gw.example.net,203.0.113.10,2001:db8:113::10"
    );
}

#[test]
fn leaves_last_397_days_unless_told_and_never_outlive_the_ca() {
    let dir = TempDir::with_ca("days");
    let info = issue(&dir.0, "a", &IssueOptions::default())
        .expect("issue")
        .info;
    let days = (info.not_after - now()) / 86_400;
    assert!((396..=397).contains(&days), "{days}");
    let short = IssueOptions {
        days: 7,
        ..IssueOptions::default()
    };
    let info = issue(&dir.0, "b", &short).expect("issue").info;
    assert!((6..=7).contains(&((info.not_after - now()) / 86_400)));
    for days in [0, MAX_DAYS + 1] {
        let err = issue(
            &dir.0,
            "c",
            &IssueOptions {
                days,
                ..IssueOptions::default()
            },
        )
        .expect_err("out of range")
        .to_string();
        assert!(err.contains("--days"), "{err}");
    }
    let ca = Ca::load(&dir.0).expect("ca");
    let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let max = IssueOptions {
        days: MAX_DAYS,
        ..IssueOptions::default()
    };
    let err = ca
        .sign("c", &max, tomorrow)
        .expect_err("beyond the CA")
        .to_string();
    assert!(err.contains("cannot outlive"), "{err}");
    let suggested: u32 = err
        .split("--days ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no --days N in {err:?}"));
    assert!((3648..=3649).contains(&suggested), "{err}");
    let fits = IssueOptions {
        days: suggested,
        ..IssueOptions::default()
    };
    ca.sign("c", &fits, tomorrow)
        .expect("the suggested lifetime fits");
}

#[test]
fn renew_keeps_profile_and_names_with_a_new_key_and_moves_the_old_pair() {
    let dir = TempDir::with_ca("renew");
    let o = IssueOptions {
        profile: Profile::Connector,
        days: 30,
        dns: vec!["gw.example.net".into()],
        ips: vec!["203.0.113.10".parse().expect("ip")],
    };
    let first = issue(&dir.0, "gw", &o).expect("issue");
    let old_key = fs::read(&first.key).expect("key");
    let r = renew(&dir.0, "gw", None, DEFAULT_DAYS).expect("renew");
    let new = &r.issued.info;
    assert_ne!(new.serial, first.info.serial);
    assert_ne!(fs::read(&r.issued.key).expect("key"), old_key, "a new key");
    assert_eq!(
        (new.usage, &new.dns, &new.ips),
        (first.info.usage, &first.info.dns, &first.info.ips)
    );
    assert!(new.not_after > first.info.not_after);
    let stem = format!("gw.{}", first.info.serial_hex());
    assert_eq!(r.old_cert, dir.0.join("old").join(format!("{stem}.pem")));
    assert_eq!(
        r.old_key.as_deref(),
        Some(dir.0.join("old").join(format!("{stem}.key")).as_path())
    );
    assert_eq!(
        fs::read(r.old_key.as_ref().expect("old key")).expect("old"),
        old_key
    );
    let mode = fs::metadata(r.old_key.as_ref().expect("old key"))
        .expect("old key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let hub = renew(&dir.0, "gw", Some(Profile::Hub), 10).expect("renew as hub");
    assert_eq!(Profile::of(&hub.issued.info), Some(Profile::Hub));
    assert!(renew(&dir.0, "nobody", None, DEFAULT_DAYS).is_err());
}

#[test]
fn revoking_keeps_earlier_revocations_and_covers_renewed_certificates() {
    let dir = TempDir::with_ca("revoke");
    let start = time::OffsetDateTime::now_utc();
    let ca = read_der(&dir.0.join("ca.pem")).expect("ca");
    let empty = crl::read(&crl::path(&dir.0), &ca).expect("init writes an empty CRL");
    assert_eq!((empty.number, empty.revoked.len()), (1, 0));

    let alice = issue(&dir.0, "ops-alice", &IssueOptions::default())
        .expect("issue")
        .info;
    let bob = issue(&dir.0, "ops-bob", &IssueOptions::default())
        .expect("issue")
        .info;
    let bob2 = renew(&dir.0, "ops-bob", None, DEFAULT_DAYS)
        .expect("renew")
        .issued
        .info;
    let r = crl::revoke(
        &dir.0,
        "ops-alice",
        None,
        Some(Reason::KeyCompromise),
        start,
    )
    .expect("revoke");
    assert_eq!((r.added.len(), r.total, r.number), (1, 1, 2));
    let wrong = crl::revoke(&dir.0, "ops-bob", Some("00ff"), None, start).expect_err("serial");
    assert!(wrong.to_string().contains(&bob.serial_hex()), "{wrong}");
    let r = crl::revoke(&dir.0, "ops-bob", Some(&bob.serial_hex()), None, start).expect("old");
    assert_eq!(
        (r.added.len(), r.total, r.number),
        (1, 2, 3),
        "only the renewed-away one"
    );
    let r = crl::revoke(&dir.0, "ops-bob", None, None, start).expect("revoke");
    assert_eq!(
        (r.added.len(), r.already.len(), r.total, r.number),
        (1, 1, 3, 4),
        "the current one; the old one was listed already"
    );
    let again = crl::revoke(&dir.0, "ops-bob", None, None, start).expect("again");
    assert_eq!(
        (again.added.len(), again.already.len(), again.number),
        (0, 2, 4)
    );

    let list = crl::read(&crl::path(&dir.0), &ca).expect("read");
    for c in [&alice, &bob, &bob2] {
        assert!(list.find(&c.serial).is_some(), "{}", c.identity);
    }
    assert_eq!(
        list.find(&alice.serial).and_then(|r| r.reason),
        Some(Reason::KeyCompromise)
    );
    assert!(crl::revoke(&dir.0, "ops-nobody", None, None, start).is_err());

    // Signing it again keeps every entry; a CA without a CRL gets an empty one.
    assert_eq!(
        crl::refresh(&dir.0, start)
            .map(|(_, n, number)| (n, number))
            .ok(),
        Some((3, 5))
    );
    fs::remove_file(crl::path(&dir.0)).expect("rm");
    assert_eq!(
        crl::refresh(&dir.0, start)
            .map(|(_, n, number)| (n, number))
            .ok(),
        Some((0, 1))
    );
}

#[test]
fn a_crl_from_another_ca_is_refused() {
    let a = TempDir::with_ca("crl-a");
    let b = TempDir::with_ca("crl-b");
    let ca_a = read_der(&a.0.join("ca.pem")).expect("ca");
    let err = crl::read(&crl::path(&b.0), &ca_a).expect_err("other CA");
    assert!(err.to_string().contains("not signed by this CA"), "{err}");
    fs::write(a.0.join("junk.pem"), "not pem").expect("write");
    assert!(crl::read(&a.0.join("junk.pem"), &ca_a).is_err());
}

#[test]
fn expiry_is_counted_in_whole_days_and_warned_about_within_30() {
    let day = 86_400;
    let t = 1_800_000_000;
    assert_eq!(list::expiry(t + 31 * day, t), Expiry::Valid { days: 31 });
    assert_eq!(list::expiry(t + 30 * day, t), Expiry::Valid { days: 30 });
    assert_eq!(list::expiry(t + 30 * day - 1, t), Expiry::Soon { days: 29 });
    assert_eq!(list::expiry(t, t), Expiry::Soon { days: 0 });
    assert_eq!(
        list::expiry(t - 2 * day, t),
        Expiry::Expired { days_ago: 2 }
    );
    assert_eq!(list::expiry_warning(t + 40 * day, t), None);
    assert_eq!(
        list::expiry_warning(t + 12 * day, t).as_deref(),
        Some("expires in 12 days (2027-01-27)")
    );
    assert!(
        list::expiry_warning(t - day, t).is_some_and(|w| w.starts_with("EXPIRED on 2027-01-14"))
    );
}

#[test]
fn list_shows_every_certificate_and_warns_only_for_current_ones_near_expiry() {
    let dir = TempDir::with_ca("list");
    let start = time::OffsetDateTime::now_utc();
    let short = IssueOptions {
        days: 20,
        ..IssueOptions::default()
    };
    issue(&dir.0, "ops-alice", &short).expect("issue");
    issue(
        &dir.0,
        "vpc-gw-1",
        &IssueOptions {
            profile: Profile::Connector,
            dns: vec!["gw.example.net".into()],
            ..IssueOptions::default()
        },
    )
    .expect("issue");
    issue(&dir.0, "ops-bob", &short).expect("issue");
    crl::revoke(
        &dir.0,
        "ops-bob",
        None,
        Some(Reason::CessationOfOperation),
        start,
    )
    .expect("revoke");
    renew(&dir.0, "vpc-gw-1", None, DEFAULT_DAYS).expect("renew");

    let inv = list::inventory(&dir.0).expect("inventory");
    assert_eq!(inv.entries.len(), 4, "{:?}", inv.entries);
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
    let not_after = |name: &str| {
        inv.entries
            .iter()
            .find(|e| e.info.identity == name && !e.old)
            .map(|e| e.info.not_after)
            .expect(name)
    };
    let day = 86_400;
    // A minute past 19 days before alice's certificate ends.
    let text = list::render(&inv, not_after("ops-alice") - 19 * day - 60);
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no line {needle:?} in\n{text}"))
            .to_string()
    };
    assert!(line("ops-alice ").contains("client"), "{text}");
    assert!(line("ops-alice ").contains("EXPIRES in 19 days"), "{text}");
    assert!(
        line("ops-bob ").contains("REVOKED") && line("ops-bob ").contains("cessation-of-operation"),
        "{text}"
    );
    assert!(
        line("vpc-gw-1 ").contains("vpc-gw-1,gw.example.net"),
        "{text}"
    );
    assert!(line("vpc-gw-1 ").contains("connector"), "{text}");
    assert!(line("vpc-gw-1 (old) ").contains("superseded"), "{text}");
    assert!(line("gateway CA (CA) ").contains("valid"), "{text}");
    assert!(text.contains("crl.pem: 1 revoked, number 2"), "{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].starts_with("warning: ops-alice expires in 19 days")
            && warnings[0].contains("gatewayctl pki renew ops-alice --dir"),
        "{text}"
    );

    // A year on, the connector's renewed certificate is within 30 days of its end as well.
    let later = list::render(&inv, not_after("vpc-gw-1") - 26 * day - 60);
    assert!(
        later.contains("warning: vpc-gw-1 expires in 26 days"),
        "{later}"
    );
    assert!(later.contains("warning: ops-alice EXPIRED"), "{later}");
    assert!(
        !later.contains("warning: ops-bob"),
        "revoked: no renewal advice\n{later}"
    );
}
