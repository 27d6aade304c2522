//! systemd-resolved for the lab, never installed: the package's maintainer scripts would take
//! over the host's /etc/resolv.conf. Setup downloads the package of the installed systemd's
//! version (the binary links systemd's private shared library, so the versions must match) and
//! extracts it under `target/lab/systemd-resolved/VERSION/`, where `gateway/tests/resolved.rs`
//! runs it inside the test's own namespaces, on a private D-Bus.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::{output, run, step};

/// The daemon inside an extracted package.
pub const BINARY: &str = "lib/systemd/systemd-resolved";

/// Where the package of systemd `version` is extracted.
pub fn dir(root: &Path, version: &str) -> PathBuf {
    root.join("target/lab/systemd-resolved").join(version)
}

pub fn fetch(root: &Path) -> anyhow::Result<()> {
    step("setup: systemd-resolved for the lab (downloaded and extracted, not installed)");
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "systemd"]))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .context("systemd is not installed (dpkg-query -W systemd)")?;
    let dir = dir(root, &version);
    if dir.join(BINARY).is_file() {
        println!("    {}", dir.display());
        return Ok(());
    }
    let download = root.join("target/lab/download");
    if download.exists() {
        std::fs::remove_dir_all(&download)
            .with_context(|| format!("emptying {}", download.display()))?;
    }
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    let get = |download: &Path| {
        run(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg(format!("systemd-resolved={version}"))
                .current_dir(download),
            "apt-get download systemd-resolved",
        )
    };
    if get(&download).is_err() {
        // The package lists may predate this systemd (a security update, say).
        run(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        get(&download)?;
    }
    let debs: Vec<PathBuf> = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    let [deb] = debs.as_slice() else {
        bail!(
            "expected one systemd-resolved package in {}, found {}",
            download.display(),
            debs.len()
        );
    };
    let partial = dir.with_file_name(format!("{version}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)?;
    run(
        Command::new("dpkg").arg("-x").arg(deb).arg(&partial),
        "dpkg -x systemd-resolved",
    )?;
    if !partial.join(BINARY).is_file() {
        bail!("{} holds no {BINARY}", deb.display());
    }
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("moving the extracted package to {}", dir.display()))?;
    std::fs::remove_dir_all(&download)?;
    println!("    {}", dir.display());
    Ok(())
}
