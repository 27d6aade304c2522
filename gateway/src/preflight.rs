//! What a config file alone cannot tell, checked on the machine that is about to run it: the
//! TLS files are readable PEM files that fit the node's role, and the interfaces it names exist
//! (and the TUN's name is free) in this network namespace.
//!
//! Apart from `config` because it touches the system (files, certificates, interfaces) and the
//! tunnel's certificate rules, which `config` must not depend on; gatewayd runs it before
//! starting and on every reload, `gatewayctl check-config` runs it too, with the same words.

use crate::config::{Config, ConfigError, ConfigIssue, Role, Tunnel};

/// Every problem the machine shows with `config`; `Ok` when there is none.
pub fn check_system(config: &Config) -> Result<(), ConfigError> {
    let issue = |key: String, reason: String| ConfigIssue {
        file: config.path.clone(),
        key,
        reason,
    };
    let mut named: Vec<(String, &str)> = config
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("dataplane.interfaces[{i}]"), n.as_str()))
        .collect();
    let mut issues = Vec::new();
    if let Some(t) = &config.tunnel {
        named.extend(
            t.lan
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("client.lan[{i}]"), n.as_str())),
        );
        named.extend(
            t.dns_intercept
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("client.dns_intercept[{i}]"), n.as_str())),
        );
        if let Some(e) = &t.egress {
            named.push(("egress.interface".into(), e.interface.as_str()));
        }
        for (key, path) in [
            ("tls.ca", Some(&t.tls.ca)),
            ("tls.cert", Some(&t.tls.cert)),
            ("tls.key", Some(&t.tls.key)),
            ("tls.crl", t.tls.crl.as_ref()),
        ] {
            if let Some(Err(e)) = path.map(std::fs::File::open) {
                issues.push(issue(
                    key.into(),
                    format!(
                        "cannot read {}: {e}",
                        path.map_or(String::new(), |p| p.display().to_string())
                    ),
                ));
            }
        }
        // What the certificates say is worth reading only when every file opens.
        if issues.is_empty() {
            let connector = matches!(t.role, Role::Connector { .. } | Role::Hub { .. });
            for (key, reason) in crate::tunnel::tls::check_files(&t.tls, connector) {
                issues.push(issue(key.into(), reason));
            }
        }
        issues.extend(tunnel_files_and_device(config, t));
    }
    for (key, name) in named {
        if crate::sys::if_index(name).is_none() {
            issues.push(issue(
                key,
                format!("interface {name:?} does not exist in this network namespace"),
            ));
        }
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(issues))
    }
}

/// TLS paths that are directories, and a TUN name taken by an existing interface of another
/// kind in this network namespace.
fn tunnel_files_and_device(c: &Config, t: &Tunnel) -> Vec<ConfigIssue> {
    let issue = |key: &str, reason: String| ConfigIssue {
        file: c.path.clone(),
        key: key.into(),
        reason,
    };
    let mut issues = Vec::new();
    for (key, path) in [
        ("tls.ca", &t.tls.ca),
        ("tls.cert", &t.tls.cert),
        ("tls.key", &t.tls.key),
    ] {
        if path.is_dir() {
            issues.push(issue(
                key,
                format!("{} is a directory; name the PEM file", path.display()),
            ));
        }
    }
    if crate::sys::if_index(&t.tun).is_some() {
        let driver = crate::sys::if_driver(&t.tun);
        if driver.as_deref() != Some("tun") {
            issues.push(issue(
                "tunnel.tun",
                format!(
                    "{:?} already exists here and is not a TUN device ({}); the daemon creates \
                     its own: pick a new name",
                    t.tun,
                    driver.map_or_else(
                        || "no driver reported".to_string(),
                        |d| format!("driver {d}")
                    )
                ),
            ));
        }
    }
    issues
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse_str(text: &str) -> Config {
        crate::config::parse(Path::new("/etc/gateway/test.toml"), text)
            .unwrap_or_else(|e| panic!("a valid file: {e}"))
    }

    /// A connector whose TLS files are under /p (which does not exist), with `ca` replaced.
    fn connector(ca: &str) -> Config {
        parse_str(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16\"]\n"
        ))
    }

    #[test]
    fn missing_interface_is_reported_by_the_system_check() {
        let mut c =
            parse_str("[node]\nname = \"n\"\n[dataplane]\ninterfaces = [\"lo\", \"gwnosuch0\"]\n");
        let err = check_system(&c).expect_err("gwnosuch0 does not exist");
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].key, "dataplane.interfaces[1]");
        assert!(err.0[0].reason.contains("does not exist"));
        c.interfaces.pop();
        assert!(check_system(&c).is_ok(), "lo exists in every namespace");
    }

    #[test]
    fn refuses_a_tun_name_that_exists_here_and_is_not_a_tun_device() {
        let mut c = connector("/p/ca.pem");
        let t = c.tunnel.clone().expect("a tunnel");
        assert_eq!(
            tunnel_files_and_device(&c, &t),
            vec![],
            "gateway0 does not exist here"
        );
        if let Some(t) = c.tunnel.as_mut() {
            t.tun = "lo".into();
        }
        let t = c.tunnel.clone().expect("a tunnel");
        let issues = tunnel_files_and_device(&c, &t);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "tunnel.tun");
        assert!(
            issues[0].reason.contains("is not a TUN device"),
            "{}",
            issues[0]
        );
    }

    #[test]
    fn refuses_tls_paths_that_are_directories() {
        let dir = std::env::temp_dir().join(format!("gw-cfgcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let c = connector(&dir.display().to_string());
        let t = c.tunnel.clone().expect("a tunnel");
        let issues = tunnel_files_and_device(&c, &t);
        let all = check_system(&c).expect_err("refused");
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "tls.ca");
        assert!(issues[0].reason.contains("is a directory"), "{}", issues[0]);
        // The full system check names it too, beside the files that do not exist.
        assert!(
            all.0
                .iter()
                .any(|i| i.key == "tls.ca" && i.reason.contains("is a directory")),
            "{all}"
        );
    }
}
