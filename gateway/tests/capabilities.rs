//! The daemon works with exactly the capabilities the systemd unit grants, and without one of
//! them it refuses to start, naming it, with nothing attached.

mod common;

use std::time::Duration;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

/// `CapabilityBoundingSet=` of the shipped unit, as a `setpriv --bounding-set` argument.
fn unit_bounding_set() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/gatewayd.service"
    ))
    .expect("read unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

fn setpriv_argv<'a>(caps: &'a str, config: &'a str) -> Vec<&'a str> {
    vec![
        "setpriv",
        "--bounding-set",
        caps,
        "--inh-caps=-all",
        GATEWAYD,
        "--config",
        config,
    ]
}

#[test]
fn runs_with_exactly_the_units_capabilities() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let caps = unit_bounding_set();
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let config = write_config(
        &lab,
        "op",
        &["lan0"],
        "[[route]]\ncidr = \"10.128.0.0/16\"\n",
    );
    let config_s = config.to_str().expect("utf-8");
    let socket = socket_path(&lab, "op");
    let argv = setpriv_argv(&bounding, config_s);
    let mut daemon = start_daemon_argv(&lab, Host::Operator, &argv, &socket, "gatewayd.log");
    let status = status_json(&lab, Host::Operator, &socket);
    assert!(
        status.interfaces[0].classifier_attached,
        "{:?}",
        status.interfaces
    );
    daemon.terminate().expect("SIGTERM");
    assert!(
        daemon
            .wait_timeout(Duration::from_secs(10))
            .expect("exit")
            .success()
    );

    // Drop each capability every config needs, in turn: the daemon names it and attaches
    // nothing. (CAP_NET_BIND_SERVICE is only for ports below 1024.)
    let required: Vec<String> = gateway::sys::REQUIRED_CAPABILITIES
        .iter()
        .map(|(name, _)| name.trim_start_matches("CAP_").to_lowercase())
        .collect();
    for dropped in &required {
        let fewer = format!(
            "-all,{}",
            caps.iter()
                .filter(|c| *c != dropped)
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = lab
            .run(Host::Operator, &setpriv_argv(&fewer, config_s))
            .expect("run");
        let err = stderr_of(&out);
        assert!(!out.status.success(), "started without {dropped}");
        assert!(
            err.contains(&format!("CAP_{}", dropped.to_uppercase())),
            "without {dropped}: {err}"
        );
        assert_eq!(classifier_count(&lab.ns(Host::Operator), "lan0"), 0);
        assert!(!socket.exists());
    }
}
