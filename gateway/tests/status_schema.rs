//! `gatewayctl status --json` from a live daemon is what docs/status.schema.json documents:
//! with counters that moved, and after a reload adds the optional `last_reload`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, LabOptions, addr};

const ROUTES: &str = "
[[route]]
cidr = \"10.128.0.0/16\"
name = \"vpc\"

[[route]]
cidr = \"fd00:128::/64\"
name = \"vpc-v6\"
";

#[test]
fn live_status_json_fits_the_documented_schema_as_counters_move_and_after_a_reload() {
    let lab = gateway_lab::Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let config = write_config(&lab, "op", &["lan0"], ROUTES);
    let socket = socket_path(&lab, "op");
    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd.log");

    let fresh = status_validated(&lab, Host::Operator, &socket);
    assert_eq!(fresh["schema"], gateway::api::STATUS_SCHEMA);
    assert_eq!(fresh["routes"][0]["packets"], 0, "{fresh:#}");

    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(
            Host::Office,
            &[
                "ping", "-q", "-n", "-c", "3", "-i", "0.2", "-W", "2", target,
            ],
        )
        .unwrap_or_else(|e| panic!("ping {target}: {e:#}"));
    }
    let moved = status_validated(&lab, Host::Operator, &socket);
    // 56-byte pings: 84-byte IPv4 and 104-byte IPv6 packets, counted at lan0's ingress.
    assert_eq!(moved["routes"][0]["packets"], 3, "{moved:#}");
    assert_eq!(moved["routes"][0]["bytes"], 3 * 84, "{moved:#}");
    assert_eq!(moved["routes"][1]["packets"], 3, "{moved:#}");
    assert_eq!(moved["routes"][1]["bytes"], 3 * 104, "{moved:#}");
    assert_eq!(moved["interfaces"][0]["classifier_attached"], true);
    assert!(
        moved["icmp"].is_object(),
        "the daemon reports ping_group_range"
    );
    assert!(
        moved.get("tunnel").is_none(),
        "a classifier-only node has no tunnel"
    );

    // A reload (a third route) fills in `last_reload`, which must fit the schema too.
    let more = format!("{ROUTES}\n[[route]]\ncidr = \"10.129.0.0/16\"\nname = \"more\"\n");
    write_config(&lab, "op", &["lan0"], &more);
    daemon.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reloaded = loop {
        let v = status_validated(&lab, Host::Operator, &socket);
        if v.get("last_reload").is_some() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no reload within 10 s; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(reloaded["last_reload"]["ok"], true, "{reloaded:#}");
    assert_eq!(reloaded["routes"][2]["name"], "more", "{reloaded:#}");
    assert_eq!(
        reloaded["routes"][0]["packets"], 3,
        "a reload keeps counters"
    );

    stop_cleanly(&mut daemon);
}
