//! The classifier counts, per route, exactly the packets a user sent to each configured CIDR,
//! IPv4 and IPv6, and nothing that went elsewhere.

mod common;

use common::*;
use gateway::api::AttachKind;
use gateway_lab::{Host, Lab, LabOptions};

fn ping(lab: &Lab, target: &str, count: u32) {
    let count = count.to_string();
    lab.run_ok(
        Host::Office,
        &[
            "ping", "-q", "-n", "-c", &count, "-i", "0.2", "-W", "2", target,
        ],
    )
    .unwrap_or_else(|e| panic!("ping {target}: {e:#}"));
}

#[test]
fn counts_packets_and_bytes_per_route_for_ipv4_and_ipv6() {
    counts_per_route(None, AttachKind::Tcx);
}

/// The same counts from the same program attached the legacy way, as on a kernel before 6.6:
/// a filter on a clsact qdisc, which status names.
#[test]
fn counts_per_route_the_same_when_attached_with_legacy_tc() {
    counts_per_route(Some("tc"), AttachKind::Tc);
}

fn counts_per_route(attach: Option<&str>, expected: AttachKind) {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let routes = r#"
[[route]]
cidr = "10.128.0.0/16"
name = "vpc"

[[route]]
cidr = "10.128.0.10/32"
name = "vpc-host"

[[route]]
cidr = "fd00:128::/64"
name = "vpc-v6"
"#;
    let config = write_config_attach(&lab, "op", &["lan0"], attach, routes);
    let socket = socket_path(&lab, "op");
    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd.log");

    let before = status_json(&lab, Host::Operator, &socket);
    assert!(before.routes.iter().all(|r| r.packets == 0 && r.bytes == 0));
    let iface = &before.interfaces[0];
    assert_eq!(iface.name, "lan0");
    assert!(iface.classifier_attached, "{iface:?}");
    assert_eq!(attached_via(iface), expected);

    // From the office host, through the operator host's lan0: 56-byte pings are 84-byte IPv4
    // and 104-byte IPv6 packets. Only echo requests enter lan0; the replies leave through it.
    ping(&lab, "10.128.0.10", 5); // the /32 is more specific than the /16
    ping(&lab, "10.128.0.61", 3);
    ping(&lab, "fd00:128::10", 4);
    ping(&lab, "203.0.113.10", 6); // no route configured for it

    let after = status_json(&lab, Host::Operator, &socket);
    // A classifier-only node's status fits the documented schema too.
    status_validated(&lab, Host::Operator, &socket);
    let route = |name: &str| {
        after
            .routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("route {name} missing from {after:?}"))
            .clone()
    };
    assert_eq!(
        (route("vpc-host").packets, route("vpc-host").bytes),
        (5, 5 * 84)
    );
    assert_eq!((route("vpc").packets, route("vpc").bytes), (3, 3 * 84));
    assert_eq!(
        (route("vpc-v6").packets, route("vpc-v6").bytes),
        (4, 4 * 104)
    );
    assert_eq!(after.classifier.get("matched"), Some(&12));
    // Neighbour discovery adds a few unmatched packets of its own; the six pings are a floor.
    let unmatched = after.classifier.get("unmatched").copied().unwrap_or(0);
    assert!(unmatched >= 6, "unmatched {unmatched}");
    assert_eq!(after.classifier.get("malformed"), Some(&0));

    // The human table shows the same numbers.
    let out = gatewayctl(
        &lab,
        Host::Operator,
        &["status", "--socket", socket.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["vpc-host", "10.128.0.10/32", "5", "420"]),
        "{text}"
    );
    let attached = format!("attached via {}", expected.label());
    assert!(
        text.lines()
            .any(|l| l.starts_with("lan0") && l.contains(&attached) && l.contains("gw_classify")),
        "{text}"
    );

    daemon.terminate().expect("SIGTERM");
    let status = daemon
        .wait_timeout(std::time::Duration::from_secs(10))
        .expect("gatewayd exits");
    assert!(
        status.success(),
        "gatewayd exit {status}; log:\n{}",
        daemon.log()
    );
}
