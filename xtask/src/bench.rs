//! `cargo xtask bench`: build in release, install the peer tunnels the bench compares against
//! (quincy, boringtun) with `cargo install` when they are missing, then run `lab bench`.
//!
//! A peer that cannot be installed is reported and left out; the bench still runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use gateway_lab::bench::{PEER_CRATES, PeerCrate};

use super::{build_ebpf, output, run, setup, step};

/// Debian packages only the bench needs: openssl makes the peers' keys and fingerprints.
const BENCH_PACKAGES: &[&str] = &["openssl"];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// One repetition, 2 s per test: to try the bench out, not for figures. Writes
    /// target/bench-quick.md instead of docs/bench.md.
    #[arg(long)]
    quick: bool,
    /// Another build's gatewayd and gatewayctl, measured in the same run as the "baseline"
    /// columns (old and new binaries compared in one run).
    #[arg(long, value_name = "DIR")]
    baseline_bin_dir: Option<PathBuf>,
    /// Repetitions (default 3, or 1 with --quick); figures are their medians.
    #[arg(long)]
    reps: Option<usize>,
    /// Only these columns, comma-separated: direct, gateway, gateway-tcp, baseline,
    /// baseline-tcp, quincy, boringtun.
    #[arg(long, value_name = "IDS")]
    only: Option<String>,
    /// Where the report goes (default docs/bench.md, or target/bench-quick.md with --quick).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Do not install missing peers: their columns are skipped with the reason.
    #[arg(long)]
    no_install: bool,
}

pub fn bench(root: &Path, args: BenchArgs) -> anyhow::Result<()> {
    setup()?;
    bench_packages();
    build_ebpf(root)?;
    step("build (release)");
    run(
        Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "--workspace",
            "--bins",
        ]),
        "cargo build --release",
    )?;
    let cargo_root = cargo_home();
    if args.no_install {
        step("bench: peers (not installing)");
    } else {
        install_peers(root, &cargo_root);
    }
    step("lab bench");
    let bin = root.join("target/release");
    let out = args.out.unwrap_or_else(|| {
        if args.quick {
            root.join("target/bench-quick.md")
        } else {
            root.join("docs/bench.md")
        }
    });
    let mut cmd = Command::new(bin.join("lab"));
    cmd.current_dir(root)
        .arg("bench")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--peer-bin-dir")
        .arg(cargo_root.join("bin"))
        .arg("--out")
        .arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(dir) = &args.baseline_bin_dir {
        cmd.arg("--baseline-bin-dir").arg(dir);
    }
    if let Some(n) = args.reps {
        cmd.arg("--reps").arg(n.to_string());
    }
    if let Some(only) = &args.only {
        cmd.arg("--only").arg(only);
    }
    run(&mut cmd, "lab bench")
}

/// Installs what is missing of BENCH_PACKAGES; a failure only costs the peers that need it.
fn bench_packages() {
    step("bench: Debian packages");
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("    all {} present", BENCH_PACKAGES.len());
        return;
    }
    let r = run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    );
    if let Err(e) = r {
        println!("    {e:#}; the peer tunnels will be skipped");
    }
}

/// Where `cargo install` puts binaries by default: `$CARGO_HOME`, else `~/.cargo`.
fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Installs each peer crate at its pinned version unless `cargo install --list` shows it
/// already, building in target/peers (kept, so a reinstall is quick). Failures are printed,
/// never fatal: `lab bench` skips a peer whose programs are missing.
fn install_peers(root: &Path, cargo_root: &Path) {
    step("bench: peer tunnels (cargo install, run as external programs only)");
    let list = output(
        Command::new("cargo")
            .args(["install", "--list", "--root"])
            .arg(cargo_root),
    )
    .unwrap_or_default();
    let have = installed(&list);
    for p in PEER_CRATES {
        if is_installed(p, &have, &cargo_root.join("bin")) {
            println!("    {} {} present", p.krate, p.version);
            continue;
        }
        let r = run(
            Command::new("cargo")
                .args(["install", "--locked", "--root"])
                .arg(cargo_root)
                .arg("--target-dir")
                .arg(root.join("target/peers"))
                .arg(format!("{}@{}", p.krate, p.version)),
            &format!("cargo install {}", p.krate),
        )
        .with_context(|| format!("{} is skipped", p.krate));
        if let Err(e) = r {
            println!("    {e:#}");
        }
    }
}

fn is_installed(p: &PeerCrate, have: &[(String, String)], bin: &Path) -> bool {
    have.iter().any(|(k, v)| k == p.krate && v == p.version)
        && p.bins.iter().all(|b| bin.join(b).exists())
}

/// `(crate, version)` from `cargo install --list`: lines `name v1.2.3:` (a path or git
/// source may follow the version in parentheses), each followed by indented binary names.
fn installed(list: &str) -> Vec<(String, String)> {
    list.lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| {
            let mut words = l.trim_end_matches(':').split_whitespace();
            let name = words.next()?;
            let version = words.next()?.trim_end_matches(':').strip_prefix('v')?;
            Some((name.to_string(), version.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_crates_and_versions_from_cargo_install_list() {
        let list = "bpf-linker v0.13.0:\n    bpf-linker\nquincy-client v3.1.1:\n    quincy-client\n\
                    local v0.1.0 (/src/local):\n    local\n";
        assert_eq!(
            installed(list),
            [
                ("bpf-linker".to_string(), "0.13.0".to_string()),
                ("quincy-client".to_string(), "3.1.1".to_string()),
                ("local".to_string(), "0.1.0".to_string()),
            ]
        );
    }

    #[test]
    fn a_peer_counts_as_installed_only_at_its_version_with_its_binaries() {
        let dir = std::env::temp_dir().join(format!("gw-bench-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = PeerCrate {
            krate: "quincy-client",
            version: "3.1.1",
            bins: &["quincy-client"],
        };
        let have = vec![("quincy-client".to_string(), "3.1.1".to_string())];
        assert!(!is_installed(&p, &have, &dir), "binary missing");
        std::fs::write(dir.join("quincy-client"), "").expect("write");
        assert!(is_installed(&p, &have, &dir));
        let old = vec![("quincy-client".to_string(), "3.0.0".to_string())];
        assert!(!is_installed(&p, &old, &dir), "wrong version");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
