//! The .deb in a real Debian root: apt installs it (resolving `Depends`), the installed
//! binaries run, check-config accepts the shipped examples, `systemd-analyze verify` accepts
//! the installed units, the maintainer scripts ask systemd for a daemon-reload and never for a
//! start, and `dpkg --purge` leaves the root as it was but for the system user.
//!
//! The root is made once with debootstrap and cached under target/deb (the only step that
//! downloads, from Debian's mirror, like the packages the .deb depends on). Each run mounts an
//! overlay over it in a mount and network namespace of its own, so the cache stays clean, the
//! mounts vanish with the process, and nothing the check runs can reach any network.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{output, run, step};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// systemd for systemd-sysusers and systemd-analyze, as on a Debian 12 instance.
const INCLUDE: &str = "systemd";

/// The cached root and what made it; a different recipe makes it again.
fn cache(root: &Path) -> (PathBuf, PathBuf, String) {
    let dir = root.join(format!("target/deb/{SUITE}-root"));
    let stamp = root.join(format!("target/deb/{SUITE}-root.ok"));
    let recipe = format!("debootstrap --variant=minbase --include={INCLUDE} {SUITE} {MIRROR}");
    (dir, stamp, recipe)
}

fn ensure_root(root: &Path) -> anyhow::Result<PathBuf> {
    let (dir, stamp, recipe) = cache(root);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == recipe) {
        return Ok(dir);
    }
    step(&format!("deb check: a {SUITE} root, once (debootstrap)"));
    let _ = std::fs::remove_file(&stamp);
    let _ = std::fs::remove_dir_all(&dir);
    run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&dir)
            .arg(MIRROR),
        "debootstrap (cargo xtask setup installs it)",
    )?;
    std::fs::write(&stamp, &recipe)?;
    Ok(dir)
}

/// Puts the packages `deb` depends on into the cached root's apt archive, so the install
/// itself needs no network. Downloads only what is missing: nothing, once done.
fn prefetch_depends(cached: &Path, deb: &Path) -> anyhow::Result<()> {
    step("deb check: the packages it depends on, in the cached root");
    let inside = cached.join("tmp/gateway.deb");
    std::fs::copy(deb, &inside).context("copying the .deb into the cached root")?;
    let _ = std::fs::copy("/etc/resolv.conf", cached.join("etc/resolv.conf"));
    let mut cmd = chroot(cached);
    cmd.args([
        "apt-get",
        "install",
        "-q",
        "-y",
        "--download-only",
        "/tmp/gateway.deb",
    ]);
    let result = run(&mut cmd, "apt-get install --download-only");
    let _ = std::fs::remove_file(&inside);
    if result.is_err() {
        // Lists may be missing or stale (a new dependency): fetch them, then try again.
        run(
            chroot(cached).args(["apt-get", "update", "-q"]),
            "apt-get update",
        )?;
        std::fs::copy(deb, &inside)?;
        let again = run(
            chroot(cached).args([
                "apt-get",
                "install",
                "-q",
                "-y",
                "--download-only",
                "/tmp/gateway.deb",
            ]),
            "apt-get install --download-only",
        );
        let _ = std::fs::remove_file(&inside);
        again?;
    }
    Ok(())
}

fn chroot(dir: &Path) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(dir)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LANG", "C");
    cmd
}

/// The steps inside the namespace; each writes what the checks below read into $OUT.
const SCRIPT: &str = r#"
set -eu
M=$WORK/merged
mkdir -p "$WORK/upper" "$WORK/work" "$M" "$OUT"
mount -t overlay overlay -o "lowerdir=$CACHE,upperdir=$WORK/upper,workdir=$WORK/work" "$M"
mount -t proc proc "$M/proc"
mount -t devpts -o newinstance devpts "$M/dev/pts"
# The interface the examples name, in this namespace only (it vanishes with it).
ip link add ens5 type veth peer name ens5p
# As if systemd ran: the maintainer scripts may call systemctl, which records what it is asked
# (in place of the real one, since apt gives dpkg a PATH of its own).
mkdir -p "$M/run/systemd/system"
printf '#!/bin/sh\necho "$*" >> /tmp/systemctl.log\n' > "$M/usr/bin/systemctl"
: > "$M/tmp/systemctl.log"
inside() { chroot "$M" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive LANG=C "$@"; }
# Every path with its type, but for what apt, dpkg and logs keep and this check's own files.
snapshot() {
    (cd "$M" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./run -o -path ./var/lib/dpkg \
        -o -path ./var/lib/apt -o -path ./var/cache -o -path ./var/log -o -path ./etc/ld.so.cache \) -prune -o -printf '%p %y\n' | LC_ALL=C sort) > "$1"
}
accounts() { for f in passwd group shadow gshadow; do cat "$M/etc/$f"; done | LC_ALL=C sort > "$1"; }
snapshot "$OUT/before.txt"
accounts "$OUT/accounts-before.txt"
cp "$DEB" "$M/tmp/gateway.deb"
# Offline: this namespace has no network, so any dependency not in the cache fails the install.
echo "== apt-get install ./gateway.deb"
inside apt-get install -q -y /tmp/gateway.deb
echo "== the installed binaries"
inside gatewayctl --version > "$OUT/gatewayctl-version.txt"
inside gatewayd --version > "$OUT/gatewayd-version.txt"
echo "== check-config on the shipped examples"
inside gatewayctl pki init --dir /etc/gateway/pki
inside gatewayctl pki issue vpc-gw-1 --dir /etc/gateway/pki --profile connector
inside gatewayctl pki issue ops-alice --dir /etc/gateway/pki
for example in gateway connector client; do
    inside gatewayctl check-config "/usr/share/gateway/examples/$example.toml"
done
echo "== systemd-analyze verify"
inside systemd-analyze verify --man=no gatewayd.service gatewayd@vpc2.service 2> "$OUT/verify.txt"
inside getent passwd gateway > "$OUT/user.txt"
inside stat -c '%a %U:%G' /etc/gateway > "$OUT/etc-gateway.txt"
cp "$M/tmp/systemctl.log" "$OUT/systemctl-install.log"
# The operator's files, which a purge rightly keeps.
rm -r "$M/etc/gateway/pki"
echo "== dpkg --purge gateway"
inside dpkg --purge gateway
inside apt-get autoremove -q -y --purge
cp "$M/tmp/systemctl.log" "$OUT/systemctl-all.log"
snapshot "$OUT/after.txt"
accounts "$OUT/accounts-after.txt"
"#;

/// Installs, uses and purges `deb` in a copy-on-write Debian root; fails naming what differed.
pub fn check(root: &Path, deb: &Path) -> anyhow::Result<()> {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb)).context("dpkg-deb -c")?;
    for wanted in [
        "./usr/bin/gatewayd",
        "./usr/bin/gatewayctl",
        "./usr/lib/systemd/system/gatewayd.service",
        "./usr/lib/systemd/system/gatewayd@.service",
        "./usr/lib/sysusers.d/gateway.conf",
        "./usr/share/polkit-1/rules.d/50-gatewayd-resolved.rules",
        "./usr/share/gateway/examples/connector.toml",
        "./usr/share/bash-completion/completions/gatewayctl",
        "./usr/share/zsh/vendor-completions/_gatewayctl",
        "./usr/share/fish/vendor_completions.d/gatewayctl.fish",
        "./usr/share/man/man1/gatewayctl.1.gz",
        "./usr/share/man/man1/gatewayctl-status.1.gz",
        "./usr/share/man/man8/gatewayd.8.gz",
    ] {
        if !listing.lines().any(|l| l.ends_with(wanted)) {
            bail!("dpkg -c does not list {wanted}:\n{listing}");
        }
    }
    let cached = ensure_root(root)?;
    prefetch_depends(&cached, deb)?;

    step("deb check: install, use, purge (offline, in namespaces of its own)");
    let work = root.join("target/deb/check");
    let _ = std::fs::remove_dir_all(&work);
    let out = work.join("out");
    let deb = std::path::absolute(deb)?;
    std::fs::create_dir_all(&work)?;
    let script = work.join("check.sh");
    std::fs::write(&script, SCRIPT)?;
    run(
        Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", "sh"])
            .arg(&script)
            .env("CACHE", &cached)
            .env("WORK", &work)
            .env("OUT", &out)
            .env("DEB", &deb),
        "the .deb in a Debian root",
    )?;
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).with_context(|| format!("reading {name}"))
    };

    let version = env!("CARGO_PKG_VERSION");
    for bin in ["gatewayctl", "gatewayd"] {
        let said = read(&format!("{bin}-version.txt"))?;
        if said.trim() != format!("{bin} {version}") {
            bail!("{bin} --version said {said:?}");
        }
    }
    let verify = read("verify.txt")?;
    if !verify.trim().is_empty() {
        bail!("systemd-analyze verify in the root:\n{verify}");
    }
    let user = read("user.txt")?;
    if !user.trim().ends_with(":/nonexistent:/usr/sbin/nologin") {
        bail!("the system user gateway is {user:?}");
    }
    if read("etc-gateway.txt")?.trim() != "750 root:gateway" {
        bail!("/etc/gateway is {}", read("etc-gateway.txt")?);
    }
    let install = read("systemctl-install.log")?;
    if !install.lines().any(|l| l == "daemon-reload") {
        bail!("postinst did not run systemctl daemon-reload: {install:?}");
    }
    let all = read("systemctl-all.log")?;
    for line in all.lines() {
        let verb = line.split_whitespace().next().unwrap_or_default();
        if !["daemon-reload", "stop"].contains(&verb) {
            bail!(
                "a maintainer script ran `systemctl {line}`: only daemon-reload and stop are theirs"
            );
        }
    }

    let before = read("before.txt")?;
    let after = read("after.txt")?;
    if before != after {
        let b: BTreeSet<&str> = before.lines().collect();
        let a: BTreeSet<&str> = after.lines().collect();
        bail!(
            "dpkg --purge left the root changed: added {:?}, removed {:?}",
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        );
    }
    let accounts_before: BTreeSet<String> = read("accounts-before.txt")?
        .lines()
        .map(String::from)
        .collect();
    let added: Vec<String> = read("accounts-after.txt")?
        .lines()
        .filter(|l| !accounts_before.contains(*l))
        .map(String::from)
        .collect();
    if added.len() < 2 || !added.iter().all(|l| l.starts_with("gateway:")) {
        bail!("accounts changed beyond the system user gateway: {added:?}");
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("    installed, ran, verified and purged; left only the system user gateway (policy)");
    Ok(())
}
