//! `cargo xtask fuzz [--seconds N]`: every parser of bytes from outside (`fuzz/fuzz_targets`)
//! run under libFuzzer for a bounded time each, from its committed seed corpus
//! (`fuzz/corpus/TARGET`, small valid inputs built by hand). `cargo xtask test` runs it with
//! [`TEST_SECONDS`] a target.
//!
//! Installs what it needs (cargo-fuzz, a C++ compiler for libFuzzer) and builds on the nightly
//! toolchain the eBPF build already needs. New inputs that reach new code go to
//! `fuzz/target/corpus/TARGET` (kept between runs, never committed); a crash stops the run
//! with its input saved in `fuzz/artifacts/TARGET/`, which then becomes a unit test in the
//! crate with the fix.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use super::{output, run, show, step};

/// Seconds per target for `cargo xtask fuzz` without `--seconds`.
pub const DEFAULT_SECONDS: u64 = 20;
/// Seconds per target in `cargo xtask test`: ten targets add under two minutes of fuzzing to
/// the suite, plus the nightly build of the targets.
pub const TEST_SECONDS: u64 = 10;

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Builds and runs every target for `seconds` each; fails on the first crash.
pub fn fuzz(root: &Path, seconds: u64) -> anyhow::Result<()> {
    setup()?;
    let no_ebpf = root.join("fuzz/target/no-ebpf.o");
    std::fs::create_dir_all(root.join("fuzz/target")).context("creating fuzz/target")?;
    if !no_ebpf.exists() {
        // Written once: a new mtime would make cargo rebuild the gateway crate every run.
        std::fs::write(&no_ebpf, b"").with_context(|| format!("writing {}", no_ebpf.display()))?;
    }
    // The parsers are safe Rust: what fuzzing can find is a panic (bounds, overflow, a failed
    // assertion), which debug assertions turn on. AddressSanitizer would double the build and
    // run time without adding to that, so none is used.
    let fuzz_flags = ["--sanitizer", "none", "--debug-assertions"];
    step("fuzz: build (nightly)");
    run(
        cargo_fuzz(root, &no_ebpf).arg("build").args(fuzz_flags),
        "cargo fuzz build",
    )?;
    let listed =
        output(cargo_fuzz(root, &no_ebpf).arg("list")).context("cargo fuzz list failed")?;
    let targets: Vec<&str> = listed.split_whitespace().collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in fuzz/");
    }
    step(&format!(
        "fuzz: {} targets, {seconds} s each",
        targets.len()
    ));
    let mut rows = Vec::new();
    for target in &targets {
        let corpus = root.join("fuzz/target/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = root.join("fuzz/corpus").join(target);
        let mut cmd = cargo_fuzz(root, &no_ebpf);
        cmd.args(["run"])
            .args(fuzz_flags)
            .arg(target)
            // New inputs go to the first directory; the committed seeds stay as they are.
            .arg(&corpus)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
            ]);
        println!("    $ {}", show(&cmd));
        let started = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("running {}", show(&cmd)))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} failed ({}): its input is in fuzz/artifacts/{target}/; \
                 make it a unit test, fix the crash, and run again",
                out.status
            );
        }
        let runs = executions(&log).unwrap_or(0);
        println!(
            "    {target:<14} {runs:>10} runs in {:.0} s, no crash",
            started.elapsed().as_secs_f64()
        );
        rows.push((target.to_string(), runs));
    }
    let total: u64 = rows.iter().map(|(_, r)| r).sum();
    println!("fuzz: {} targets, {total} executions, no crash", rows.len());
    Ok(())
}

/// `cargo +nightly fuzz` in the workspace root, with what the outer stable cargo exported
/// removed, and the eBPF object replaced by the empty file `no_ebpf`: the targets never load
/// it, so fuzzing needs neither bpf-linker nor a prior `build-ebpf`.
fn cargo_fuzz(root: &Path, no_ebpf: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz"])
        .env("GATEWAY_EBPF_OBJECT", no_ebpf);
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
    cmd
}

/// libFuzzer's closing "Done N runs in S second(s)".
fn executions(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// cargo-fuzz and the C++ compiler libFuzzer is built with; the nightly toolchain is checked
/// by the main setup's message when missing.
fn setup() -> anyhow::Result<()> {
    step("fuzz: setup");
    let has_cxx = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "g++"]))
        .is_some_and(|s| s.contains("install ok installed"));
    if !has_cxx {
        run(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "g++"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install g++",
        )?;
    }
    output(Command::new("rustc").args(["+nightly", "--version"])).context(
        "the nightly toolchain is not installed; fuzzing needs it \
         (rustup toolchain install nightly)",
    )?;
    let version = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        println!("    {}", version.trim());
    } else {
        run(
            Command::new("cargo").args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
            "cargo install cargo-fuzz",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_execution_count_from_libfuzzers_last_line() {
        let log =
            "#2\tINITED cov: 10\n#131072\tpulse  cov: 12\nDone 1843512 runs in 11 second(s)\n";
        assert_eq!(executions(log), Some(1_843_512));
        assert_eq!(executions("==1== ERROR: libFuzzer: deadly signal\n"), None);
    }

    #[test]
    fn every_target_has_a_seed_corpus() {
        let root = super::super::workspace_root();
        let manifest =
            std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
        let targets: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "gateway-fuzz")
            .collect();
        assert!(targets.len() >= 10, "{targets:?}");
        for t in targets {
            let seeds = root.join("fuzz/corpus").join(t);
            let n = std::fs::read_dir(&seeds)
                .unwrap_or_else(|e| panic!("{}: {e}", seeds.display()))
                .count();
            assert!(n > 0, "{t} has no seeds");
        }
    }
}
