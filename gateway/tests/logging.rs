//! gatewayd's log: the level from `[node] log_level`, RUST_LOG above it, one line per event,
//! no colour when stderr is not a terminal; under journald no timestamps and each line with its
//! syslog priority.

mod common;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

/// Runs gatewayd under `env ARGS` until it is ready, stops it, and returns its whole log.
fn run_and_stop(lab: &Lab, env: &[&str], config: &std::path::Path, log: &str) -> String {
    let socket = socket_path(lab, "op");
    let mut argv = vec!["env"];
    argv.extend_from_slice(env);
    argv.extend_from_slice(&[GATEWAYD, "--config", config.to_str().expect("utf-8")]);
    let mut daemon = start_daemon_argv(lab, Host::Operator, &argv, &socket, log);
    status_json(lab, Host::Operator, &socket);
    stop_cleanly(&mut daemon);
    daemon.log()
}

#[test]
fn log_level_comes_from_the_config_and_rust_log_overrides_it() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let config = write_config(&lab, "op", &["lan0"], "");
    let text = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(
        &config,
        text.replacen("[node]\n", "[node]\nlog_level = \"warn\"\n", 1),
    )
    .expect("write config");

    let quiet = run_and_stop(&lab, &["-u", "RUST_LOG"], &config, "warn.log");
    assert!(
        !quiet.contains("INFO") && !quiet.contains("gatewayd ready"),
        "log_level = \"warn\" still logged info:\n{quiet}"
    );

    let loud = run_and_stop(&lab, &["RUST_LOG=info"], &config, "info.log");
    assert!(
        loud.contains("gatewayd ready"),
        "RUST_LOG=info ignored:\n{loud}"
    );
    assert!(!loud.contains('\u{1b}'), "colour in a log file:\n{loud}");
    // One line per event, each starting with its timestamp (not under journald).
    for line in loud.lines() {
        assert!(
            line.starts_with("20"),
            "not an event line: {line:?}\n{loud}"
        );
    }

    let broken = run_and_stop(&lab, &["RUST_LOG=gateway=[[["], &config, "broken.log");
    assert!(
        broken.contains("RUST_LOG") && broken.contains("WARN") && !broken.contains("INFO"),
        "a broken RUST_LOG falls back to log_level, and says so:\n{broken}"
    );

    // JOURNAL_STREAM inherited but stderr is a file (a redirect): plain lines, as before.
    let redirected = run_and_stop(
        &lab,
        &["RUST_LOG=info", "JOURNAL_STREAM=8:1234"],
        &config,
        "redirected.log",
    );
    assert!(
        redirected.lines().all(|l| l.starts_with("20")),
        "{redirected}"
    );

    // Under systemd stderr is the journal stream JOURNAL_STREAM names (device:inode): each line
    // carries its syslog priority for journald to file it under, and no time (journald stamps
    // it). A classifier-only node in a fresh namespace warns that ICMP probes are impossible.
    let socket = socket_path(&lab, "op");
    let exec = format!(
        "export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec {GATEWAYD} --config {}",
        config.display()
    );
    let mut daemon = start_daemon_argv(
        &lab,
        Host::Operator,
        &["env", "RUST_LOG=info", "sh", "-c", &exec],
        &socket,
        "journal.log",
    );
    status_json(&lab, Host::Operator, &socket);
    stop_cleanly(&mut daemon);
    let journal = daemon.log();
    assert!(journal.contains("gatewayd ready"), "{journal}");
    let warning = journal
        .lines()
        .find(|l| l.contains("ICMP echo probes are impossible"))
        .unwrap_or_else(|| panic!("no warning:\n{journal}"));
    assert!(warning.starts_with("<4>"), "not at priority 4: {warning:?}");
    for line in journal.lines() {
        let priority = match line.get(..3) {
            Some("<4>") if line.contains(" WARN ") => "warn",
            Some("<6>") if line.contains(" INFO ") => "info",
            Some("<3>") if line.contains(" ERROR ") => "error",
            _ => panic!("a line without its matching priority: {line:?}\n{journal}"),
        };
        assert!(
            !line[3..].starts_with(|c: char| c.is_ascii_digit()),
            "a timestamp under journald ({priority}): {line:?}"
        );
    }
}
