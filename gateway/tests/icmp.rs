//! ping_group_range: status tells whether the daemon's ICMP echo probes can work and how to
//! fix it; with management on, the daemon widens it and puts the old value back on stop.

mod common;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

fn sysctl(lab: &Lab) -> String {
    lab.run_ok(
        Host::Operator,
        &["sysctl", "-n", "net.ipv4.ping_group_range"],
    )
    .expect("sysctl")
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ")
}

#[test]
fn status_says_when_probes_are_impossible_and_management_widens_then_restores() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    assert_eq!(
        sysctl(&lab),
        "1 0",
        "a new namespace starts with the empty range"
    );

    let off = write_config(
        &lab,
        "off",
        &[],
        "[icmp]\nmanage_ping_group_range = false\n",
    );
    let socket = socket_path(&lab, "off");
    let mut d = start_daemon(&lab, Host::Operator, &off, &socket, "off.log");
    let icmp = status_json(&lab, Host::Operator, &socket)
        .icmp
        .expect("icmp status");
    assert_eq!(
        icmp.ping_group_range.split_whitespace().collect::<Vec<_>>(),
        ["1", "0"]
    );
    assert!(!icmp.probes_possible);
    let fix = icmp.fix.expect("a fix");
    assert!(
        fix.contains("sysctl -w net.ipv4.ping_group_range=\"0 0\""),
        "{fix}"
    );
    let out = gatewayctl(
        &lab,
        Host::Operator,
        &["status", "--socket", socket.to_str().expect("utf-8")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("echo probes IMPOSSIBLE") && text.contains("fix: sysctl -w"),
        "{text}"
    );
    stop_cleanly(&mut d);
    assert_eq!(sysctl(&lab), "1 0", "management off changes nothing");

    let on = write_config(&lab, "on", &[], "[icmp]\nmanage_ping_group_range = true\n");
    let socket = socket_path(&lab, "on");
    let mut d = start_daemon(&lab, Host::Operator, &on, &socket, "on.log");
    let icmp = status_json(&lab, Host::Operator, &socket)
        .icmp
        .expect("icmp status");
    assert!(
        icmp.probes_possible && icmp.managed && icmp.fix.is_none(),
        "{icmp:?}"
    );
    assert_eq!(sysctl(&lab), "0 0", "widened just to the daemon's group");
    stop_cleanly(&mut d);
    assert_eq!(sysctl(&lab), "1 0", "the old value is back after stop");
}
