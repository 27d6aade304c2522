//! Developer tasks. `cargo xtask --help` lists them.
//!
//! Every task that needs tools runs `setup` first, so the README's two commands work on a fresh
//! Debian machine; setup checks before it installs, so it costs a few seconds when nothing is
//! missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod bench;
mod deb;
mod fuzz;
mod install;
mod resolved;

use install::{UNITS, install, unit_for};

#[derive(Parser)]
#[command(about = "gateway developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, the nightly's rust-src, bpf-linker.
    Setup,
    /// Build the eBPF programs into target/bpf/gateway-ebpf.o (gatewayd embeds it).
    BuildEbpf,
    /// The whole suite, what CI runs: setup, build-ebpf, fmt, clippy, tests.
    Test,
    /// Set up, build, and run the lab demo.
    Demo,
    /// Benchmark the tunnel against the direct path and other tunnels (quincy, boringtun) in
    /// the lab: one table of medians and ratios, written to docs/bench.md.
    Bench(bench::BenchArgs),
    /// Print the licences of what the binaries link, as the README's table.
    Licences,
    /// Build target/deb/gateway_VERSION_ARCH.deb: binaries (eBPF object inside gatewayd), units,
    /// sysusers entry, examples, completions, man pages; Depends from dpkg-shlibdeps.
    Deb {
        /// Package gatewayd and gatewayctl from DIR instead of building them (release).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Then install it into a Debian root (debootstrap, cached), use it and purge it, as
        /// `cargo xtask test` does.
        #[arg(long)]
        check: bool,
    },
    /// Run every fuzz target (fuzz/) for a bounded time each, from its seed corpus.
    Fuzz {
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
    },
    /// Build release binaries and install them, the systemd unit, the sysusers entry, example
    /// configs and the README (run as root, then follow the printed next steps).
    Install {
        /// Where the binaries go: PREFIX/bin (the unit's ExecStart follows it).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Stage everything under DIR instead of / (packaging, or a look first).
        #[arg(long)]
        dest_dir: Option<PathBuf>,
        /// Install gatewayd and gatewayctl from DIR instead of building them.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
}

/// Debian packages: LLVM 22 for bpf-linker; the lab's real programs; systemd-analyze;
/// the C libraries the nftables code links; dpkg-shlibdeps, strip and debootstrap for the .deb;
/// tcpdump for the hub test that looks for plaintext on the hub's wire.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libclang-22-dev",
    "openssh-server",
    "openssh-client",
    "dnsutils",
    "unbound",
    "iperf3",
    "iputils-ping",
    "nftables",
    "iproute2",
    "procps",
    "systemd",
    "libnftnl-dev",
    "libmnl-dev",
    "pkg-config",
    "dnsperf",
    "dpkg-dev",
    "binutils",
    "debootstrap",
    "tcpdump",
    // A private bus for the lab's systemd-resolved (which setup extracts, never installs).
    "dbus-daemon",
    // The lab's resolved asks polkit about callers that are not root (the unit's user).
    "polkitd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Args::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Test => test(&root),
        Task::Demo => demo(&root),
        Task::Bench(args) => bench::bench(&root, args),
        Task::Fuzz { seconds } => fuzz::fuzz(&root, seconds),
        Task::Licences => {
            print!("{}", licence_table(&root)?);
            Ok(())
        }
        Task::Deb { bin_dir, check } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => build_release(&root)?,
            };
            let deb = deb::build(&root, &bin_dir, &root.join("target/deb"), "xz")?;
            if check {
                deb::check(&root, &deb)?;
            }
            Ok(())
        }
        Task::Install {
            prefix,
            dest_dir,
            bin_dir,
        } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => build_release(&root)?,
            };
            let dest = dest_dir.unwrap_or_else(|| PathBuf::from("/"));
            let installed = install(&root, &bin_dir, &prefix, &dest)?;
            for p in &installed {
                println!("installed {}", p.display());
            }
            println!(
                "\nnext: systemd-sysusers; chown -R gateway:gateway /etc/gateway/pki; \
                 cp /etc/gateway/examples/connector.toml (or client.toml) /etc/gateway/gateway.toml \
                 and edit it; gatewayctl check-config /etc/gateway/gateway.toml; \
                 systemctl daemon-reload && systemctl enable --now gatewayd"
            );
            Ok(())
        }
    }
}

/// Setup, the eBPF object, then gatewayd and gatewayctl in release; returns their directory.
fn build_release(root: &Path) -> anyhow::Result<PathBuf> {
    setup()?;
    build_ebpf(root)?;
    step("build (release)");
    run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--release", "-p", "gateway"]),
        "cargo build --release -p gateway",
    )?;
    Ok(root.join("target/release"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(name: &str) {
    println!("==> {name}");
}

/// Runs a command, failing with the step's name and the command line if it fails.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    println!("    $ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot run {}", show(cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status}): {}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    step("setup: Debian packages");
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("    all {} present", PACKAGES.len());
    } else {
        println!("    missing: {}", missing.join(" "));
        run(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        run(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "-o",
                    "Dpkg::Options::=--force-confold",
                ])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }

    step("setup: nightly toolchain with rust-src");
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "the nightly toolchain is not installed; eBPF programs need it \
         (rustup toolchain install nightly --component rust-src)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    present");
    } else {
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }

    resolved::fetch(&workspace_root())?;

    step("setup: bpf-linker");
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!("    {}", version.trim());
    } else {
        run(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
            "cargo install bpf-linker",
        )?;
    }
    Ok(())
}

fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    step("build-ebpf");
    let dir = root.join("gateway-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        .args(["+nightly", "build", "--release"]);
    // The outer `cargo xtask` runs on stable and exports its choices; the inner build must pick
    // its own toolchain (gateway-ebpf/rust-toolchain.toml) and flags (.cargo/config.toml).
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    run(
        &mut cmd,
        "building gateway-ebpf (run `cargo xtask setup` if tools are missing)",
    )?;
    let built = dir.join("target/bpfel-unknown-none/release/gateway-ebpf");
    let dest_dir = root.join("target/bpf");
    std::fs::create_dir_all(&dest_dir)
        .with_context(|| format!("creating {}", dest_dir.display()))?;
    let dest = dest_dir.join("gateway-ebpf.o");
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    println!("    {}", dest.display());
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    setup()?;
    build_ebpf(root)?;
    step("cargo fmt --check");
    run(
        Command::new("cargo")
            .current_dir(root)
            .args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check (run `cargo fmt --all`)",
    )?;
    step("README licence table matches cargo tree");
    let table = licence_table(root)?;
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    if !readme.contains(&table) {
        bail!(
            "the README's licence table is out of date: replace it with the output of \
             `cargo xtask licences`"
        );
    }
    println!("    up to date");
    step("cargo clippy");
    run(
        Command::new("cargo").current_dir(root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    fuzz::fuzz(root, fuzz::TEST_SECONDS)?;
    step("cargo test");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["test", "--workspace"]);
    let totals = run_tests(&mut cmd)?;
    // One closing line over every suite: cargo's own last line is the last doc-test run's,
    // which says nothing about the rest.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.failed > 0 {
        bail!("{} test(s) failed", totals.failed);
    }
    // The package, from the binaries the tests just used (gzip: quicker than xz, same files).
    step("the .deb in a Debian root");
    let started = std::time::Instant::now();
    let deb = deb::build(
        root,
        &root.join("target/debug"),
        &root.join("target/deb/test"),
        "gzip",
    )?;
    deb::check(root, &deb)?;
    println!("    {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs cargo test, echoing its output, and adds up its `test result:` lines.
fn run_tests(cmd: &mut Command) -> anyhow::Result<Totals> {
    use std::io::BufRead;
    println!("    $ {}", show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => totals.passed += n,
                        "failed" => totals.failed += n,
                        "ignored" => totals.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && totals.failed == 0 {
        bail!("cargo test failed ({status}) before running every test");
    }
    Ok(totals)
}

fn demo(root: &Path) -> anyhow::Result<()> {
    lab_release(root, "demo")
}

/// Builds everything in release and runs `lab <what> --bin-dir target/release`.
fn lab_release(root: &Path, what: &str) -> anyhow::Result<()> {
    setup()?;
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
    step(&format!("lab {what}"));
    let bin = root.join("target/release");
    run(
        Command::new(bin.join("lab"))
            .current_dir(root)
            .arg(what)
            .arg("--bin-dir")
            .arg(&bin),
        &format!("lab {what}"),
    )
}

/// Markdown rows `| licence | crates |` for every crate the `gateway` binaries link, from
/// `cargo tree`, so the README's list cannot drift from the lock file.
fn licence_table(root: &Path) -> anyhow::Result<String> {
    let tree = output(Command::new("cargo").current_dir(root).args([
        "tree", "-p", "gateway", "-e", "normal", "--prefix", "none", "--format", "{p}|{l}",
    ]))
    .context("cargo tree failed")?;
    let mut by_licence: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for line in tree.lines() {
        let Some((package, licence)) = line.split_once('|') else {
            continue;
        };
        let name = package.split_whitespace().next().unwrap_or_default();
        if name.is_empty() || name.starts_with("gateway") {
            continue;
        }
        by_licence
            .entry(normalise_licence(licence))
            .or_default()
            .insert(name.to_string());
    }
    let mut rows: Vec<_> = by_licence.into_iter().collect();
    rows.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let mut out = String::from("| licence | crates |\n|---|---|\n");
    for (licence, crates) in rows {
        let crates: Vec<_> = crates.into_iter().collect();
        out.push_str(&format!("| {licence} | {} |\n", crates.join(", ")));
    }
    Ok(out)
}

/// `MIT/Apache-2.0` and `Apache-2.0 OR MIT` are the same choice; write them one way.
fn normalise_licence(licence: &str) -> String {
    let licence = licence
        .trim()
        .trim_end_matches("(*)")
        .trim()
        .replace('/', " OR ");
    if licence.contains(" AND ") || licence.contains('(') {
        return licence;
    }
    let mut parts: Vec<&str> = licence.split(" OR ").map(str::trim).collect();
    parts.sort_unstable();
    parts.join(" OR ")
}
