//! `cargo xtask install`: the files of an installation from source, under a prefix and an
//! optional staging root; the .deb (deb.rs) takes the units from here too.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The systemd units: the daemon, and the template for several on one host.
pub(crate) const UNITS: [&str; 2] = ["gatewayd.service", "gatewayd@.service"];

/// A unit from systemd/ with its paths pointing where this installation puts the binaries
/// and the documentation.
pub(crate) fn unit_for(root: &Path, name: &str, bin: &Path, doc: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(root.join("systemd").join(name))
        .with_context(|| format!("reading systemd/{name}"))?
        .replace("/usr/local/bin/", &format!("{}/", bin.display()))
        .replace(
            "/usr/local/share/doc/gateway/",
            &format!("{}/", doc.display()),
        ))
}

/// Copies the files of an installation under `dest` (`/` for a real one) and returns their
/// paths. Never overwrites /etc/gateway/gateway.toml: examples go beside it.
pub(crate) fn install(
    root: &Path,
    bin_dir: &Path,
    prefix: &Path,
    dest: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let under = |p: &Path| dest.join(p.strip_prefix("/").unwrap_or(p));
    let mut installed = Vec::new();
    let mut put =
        |from: Option<&Path>, text: Option<String>, to: PathBuf, mode: u32| -> anyhow::Result<()> {
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            match (from, text) {
                (_, Some(t)) => std::fs::write(&to, t),
                (Some(f), None) => std::fs::copy(f, &to).map(|_| ()),
                (None, None) => Ok(()),
            }
            .with_context(|| format!("writing {}", to.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
            installed.push(to);
            Ok(())
        };
    let bin = prefix.join("bin");
    for b in ["gatewayd", "gatewayctl"] {
        let from = bin_dir.join(b);
        if !from.exists() {
            bail!(
                "{} is missing: build it first (or leave out --bin-dir)",
                from.display()
            );
        }
        put(Some(&from), None, under(&bin.join(b)), 0o755)?;
    }
    for name in UNITS {
        let unit = unit_for(root, name, &bin, &prefix.join("share/doc/gateway"))?;
        put(
            None,
            Some(unit),
            under(&Path::new("/etc/systemd/system").join(name)),
            0o644,
        )?;
    }
    put(
        Some(&root.join("systemd/gateway.sysusers.conf")),
        None,
        under(Path::new("/usr/lib/sysusers.d/gateway.conf")),
        0o644,
    )?;
    put(
        Some(&root.join("systemd/gatewayd-resolved.rules")),
        None,
        under(&Path::new("/").join(crate::deb::POLKIT_RULE)),
        0o644,
    )?;
    for example in ["connector.toml", "client.toml", "gateway.toml"] {
        put(
            Some(&root.join("gateway/examples").join(example)),
            None,
            under(&Path::new("/etc/gateway/examples").join(example)),
            0o644,
        )?;
    }
    put(
        Some(&root.join("README.md")),
        None,
        under(&prefix.join("share/doc/gateway/README.md")),
        0o644,
    )?;
    put(
        Some(&root.join("docs/status.schema.json")),
        None,
        under(&prefix.join("share/doc/gateway/status.schema.json")),
        0o644,
    )?;
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace_root;

    #[test]
    fn install_stages_binaries_unit_sysusers_and_examples_under_dest_dir() {
        let tmp = std::env::temp_dir().join(format!("gw-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let bins = tmp.join("bins");
        std::fs::create_dir_all(&bins).expect("mkdir");
        for b in ["gatewayd", "gatewayctl"] {
            std::fs::write(bins.join(b), format!("#!/bin/sh\necho {b}\n")).expect("write");
        }
        let dest = tmp.join("root");
        let files =
            install(&workspace_root(), &bins, Path::new("/opt/gw"), &dest).expect("install");
        for f in [
            "opt/gw/bin/gatewayd",
            "opt/gw/bin/gatewayctl",
            "etc/systemd/system/gatewayd.service",
            "etc/systemd/system/gatewayd@.service",
            "usr/lib/sysusers.d/gateway.conf",
            "usr/share/polkit-1/rules.d/50-gatewayd-resolved.rules",
            "etc/gateway/examples/connector.toml",
            "etc/gateway/examples/client.toml",
            "etc/gateway/examples/gateway.toml",
            "opt/gw/share/doc/gateway/README.md",
            "opt/gw/share/doc/gateway/status.schema.json",
        ] {
            assert!(
                files.contains(&dest.join(f)),
                "{f} not installed: {files:?}"
            );
            assert!(dest.join(f).exists(), "{f}");
        }
        assert!(
            !dest.join("etc/gateway/gateway.toml").exists(),
            "the live config is the operator's"
        );
        let unit = std::fs::read_to_string(dest.join("etc/systemd/system/gatewayd.service"))
            .expect("unit");
        assert!(
            unit.contains("ExecStart=/opt/gw/bin/gatewayd --config /etc/gateway/gateway.toml"),
            "{unit}"
        );
        assert!(!unit.contains("/usr/local"), "{unit}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dest.join("opt/gw/bin/gatewayd"))
                .expect("stat")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o755);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
