//! `cargo xtask deb`: a Debian package, so an instance needs no Rust toolchain — build it once
//! on a build host, copy it, `apt install ./gateway_*.deb`. Built with dpkg-deb from a control
//! file written here; `Depends` comes from dpkg-shlibdeps, from what the binaries really link.
//!
//! [`check`] is what `cargo xtask test` runs on it: installed with apt into a Debian root
//! (debootstrap, made once and cached under target/deb, every later run offline in a network
//! namespace of its own), used, purged, and compared with the root before.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{output, run, step};

mod check;
pub use check::check;

/// Where each generated asset goes in the package: (directory the binary writes, file name
/// pattern's directory in the package).
/// Where polkit reads rules shipped by packages.
pub const POLKIT_RULE: &str = "usr/share/polkit-1/rules.d/50-gatewayd-resolved.rules";
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions"),
    ("zsh", "usr/share/zsh/vendor-completions"),
    ("fish", "usr/share/fish/vendor_completions.d"),
];

/// The package's maintainer scripts: the system user and /etc/gateway on configure, systemd
/// told about the units when it runs — never a start or an enable, which are the operator's,
/// once the config is in place.
const POSTINST: &str = r#"#!/bin/sh
# gateway postinst: the system user gatewayd runs as, /etc/gateway, systemd told of the units.
# It never enables or starts gatewayd: the operator does, once the config is in place.
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers gateway.conf
    elif ! getent passwd gateway >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin gateway
    fi
    if [ ! -d /etc/gateway ]; then
        install -d -m 0750 -o root -g gateway /etc/gateway
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# gateway prerm: on removal, running gateways stop before their binaries go (and undo what they
# set up). An upgrade leaves them running the old binary until the operator restarts them.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop gatewayd.service 'gatewayd@*.service' >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# gateway postrm: systemd forgets the units; a purge removes what postinst and the daemons made
# (/etc/gateway if the operator left nothing in it, the state directories). The system user
# stays, as Debian policy asks: files may still be owned by it.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
    rmdir /etc/gateway 2>/dev/null || true
    rm -rf /var/lib/gateway /var/lib/gateway-*
fi
exit 0
"#;

/// Builds `out_dir/gateway_VERSION_ARCH.deb` from `gatewayd` and `gatewayctl` in `bin_dir`
/// (stripped into the package); `compression` is dpkg-deb's `-Z`.
pub fn build(
    root: &Path,
    bin_dir: &Path,
    out_dir: &Path,
    compression: &str,
) -> anyhow::Result<PathBuf> {
    step("deb: stage");
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture")?
        .trim()
        .to_string();
    let build = out_dir.join("build");
    let _ = std::fs::remove_dir_all(&build);
    // dpkg-shlibdeps wants the package's files under debian/PACKAGE.
    let stage = build.join("debian/gateway");
    let put = |to: &str, text: &[u8], mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join(to);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));

    for b in ["gatewayd", "gatewayctl"] {
        let from = bin_dir.join(b);
        put(&format!("usr/bin/{b}"), &read(&from)?, 0o755)?;
        run(
            Command::new("strip")
                .arg("--strip-unneeded")
                .arg(stage.join("usr/bin").join(b)),
            "strip",
        )?;
    }
    for name in crate::UNITS {
        let unit = crate::unit_for(
            root,
            name,
            Path::new("/usr/bin"),
            Path::new("/usr/share/doc/gateway"),
        )?;
        put(
            &format!("usr/lib/systemd/system/{name}"),
            unit.as_bytes(),
            0o644,
        )?;
    }
    put(
        "usr/lib/sysusers.d/gateway.conf",
        &read(&root.join("systemd/gateway.sysusers.conf"))?,
        0o644,
    )?;
    // resolved obeys only root or what polkit allows: the unit's user sets the TUN's DNS.
    put(
        POLKIT_RULE,
        &read(&root.join("systemd/gatewayd-resolved.rules"))?,
        0o644,
    )?;
    for example in ["connector.toml", "client.toml", "gateway.toml"] {
        put(
            &format!("usr/share/gateway/examples/{example}"),
            &read(&root.join("gateway/examples").join(example))?,
            0o644,
        )?;
    }
    put(
        "usr/share/doc/gateway/README.md",
        &read(&root.join("README.md"))?,
        0o644,
    )?;
    put(
        "usr/share/doc/gateway/status.schema.json",
        &read(&root.join("docs/status.schema.json"))?,
        0o644,
    )?;
    put(
        "usr/share/doc/gateway/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    stage_assets(bin_dir, &build.join("assets"), &stage)?;

    let depends = shlib_depends(&build)?;
    let installed_kib = output(
        Command::new("du")
            .args(["-sk", "--apparent-size"])
            .arg(stage.join("usr")),
    )
    .and_then(|o| o.split_whitespace().next().map(str::to_string))
    .context("du")?;
    let control = format!(
        "Package: gateway\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: gateway developers <gateway@example.invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Recommends: systemd\n\
         Section: net\n\
         Priority: optional\n\
         Description: eBPF-accelerated private network access gateway\n \
         gatewayd gives operators SSH, DNS, other TCP and UDP, and ping access to a VPC's\n \
         private hosts through a QUIC tunnel (TLS over TCP where UDP is blocked), with\n \
         pinned ports for tight cloud firewall rules; gatewayctl operates it. The eBPF\n \
         programs are inside gatewayd. The daemon is not started by the package: put a\n \
         config in /etc/gateway/gateway.toml (examples in /usr/share/gateway/examples),\n \
         then systemctl enable --now gatewayd.\n"
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    let sums = output(
        Command::new("sh")
            .current_dir(&stage)
            .args(["-c", "find usr -type f | sort | xargs md5sum"]),
    )
    .context("md5sums")?;
    put("DEBIAN/md5sums", sums.as_bytes(), 0o644)?;

    step("deb: dpkg-deb --build");
    let deb = out_dir.join(format!("gateway_{version}_{arch}.deb"));
    run(
        Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .arg(format!("-Z{compression}"))
            .arg("--build")
            .arg(&stage)
            .arg(&deb),
        "dpkg-deb --build",
    )?;
    let size = std::fs::metadata(&deb)?.len();
    println!("    {} ({:.1} MB)", deb.display(), size as f64 / 1e6);
    Ok(deb)
}

/// The licence note Debian packages carry.
const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: gateway

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
Comment: gatewayd embeds eBPF programs licensed MIT OR GPL-2.0-only (the kernel allows the
 helpers they use only to GPL-compatible programs), and links the Rust crates listed in
 README.md, under the licences given there.
";

/// Asks each binary for its completions and man pages, and puts them where bash-completion,
/// zsh, fish and man look (pages gzipped, as Debian does).
fn stage_assets(bin_dir: &Path, assets: &Path, stage: &Path) -> anyhow::Result<()> {
    step("deb: completions and man pages from the binaries");
    for (bin, args, section) in [
        ("gatewayd", &["--write-assets"][..], "8"),
        ("gatewayctl", &["write-assets"][..], "1"),
    ] {
        let out = assets.join(bin);
        run(
            Command::new(bin_dir.join(bin)).args(args).arg(&out),
            &format!("{bin}: writing completions and man pages"),
        )?;
        for (shell, to) in COMPLETIONS {
            let dir = out.join("completions").join(shell);
            copy_dir(&dir, &stage.join(to))?;
        }
        let man = stage.join(format!("usr/share/man/man{section}"));
        copy_dir(&out.join("man"), &man)?;
        run(
            Command::new("sh")
                .current_dir(&man)
                .args(["-c", "gzip -9n -- *"]),
            "gzip man pages",
        )?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

/// `Depends` for the shared libraries the staged binaries link, as dpkg-shlibdeps finds them
/// (from the installed packages' shlibs/symbols files), never a hand-kept list.
fn shlib_depends(build: &Path) -> anyhow::Result<String> {
    std::fs::write(
        build.join("debian/control"),
        "Source: gateway\n\nPackage: gateway\nArchitecture: any\n",
    )?;
    let out = output(Command::new("dpkg-shlibdeps").current_dir(build).args([
        "-O",
        "-edebian/gateway/usr/bin/gatewayd",
        "-edebian/gateway/usr/bin/gatewayctl",
    ]))
    .context("dpkg-shlibdeps failed (cargo xtask setup installs dpkg-dev)")?;
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_string();
    if depends.is_empty() {
        bail!("dpkg-shlibdeps found no libraries: the binaries should link at least libc");
    }
    println!("    Depends: {depends}");
    Ok(depends)
}
