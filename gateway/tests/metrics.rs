//! The metrics endpoint of a live daemon shows the counters `gatewayctl status --json` shows:
//! once traffic has stopped, the two agree exactly. Prometheus text 0.0.4 by default,
//! OpenMetrics when the scraper asks for it.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use gateway_lab::{Host, LabOptions, addr};

const LISTEN: &str = "127.0.0.1:9469";

/// Sends `request` as is to the endpoint from inside namespace `ns` and returns the response's
/// head and body.
fn exchange(ns: &str, request: &str) -> (String, String) {
    let ns_path = format!("/var/run/netns/{ns}");
    let request = request.to_string();
    std::thread::spawn(move || {
        let f = File::open(&ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s =
            std::net::TcpStream::connect(LISTEN).unwrap_or_else(|e| panic!("{LISTEN}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("request");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end: {response}"));
        (head.to_string(), body.to_string())
    })
    .join()
    .expect("namespace thread")
}

#[test]
fn metrics_agree_with_status_json_once_traffic_stops() {
    let lab = gateway_lab::Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let extra = format!(
        "[metrics]\nlisten = \"{LISTEN}\"\n\n\
         [[route]]\ncidr = \"10.128.0.0/16\"\nname = \"vpc\"\n\n\
         [[route]]\ncidr = \"fd00:128::/64\"\nname = \"vpc-v6\"\n\n\
         [[route]]\ncidr = \"10.200.0.0/16\"\nname = \"idle\"\n"
    );
    let config = write_config(&lab, "op", &["lan0"], &extra);
    let socket = socket_path(&lab, "op");
    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd.log");
    let ns = lab.ns(Host::Operator);

    for (target, count) in [(addr::VPC_HOST, "4"), (addr::VPC_HOST_V6, "2")] {
        lab.run_ok(
            Host::Office,
            &[
                "ping", "-q", "-n", "-c", count, "-i", "0.2", "-W", "2", target,
            ],
        )
        .unwrap_or_else(|e| panic!("ping {target}: {e:#}"));
    }
    // The pings have ended: nothing more enters lan0 for these routes, so the two reads see
    // the same maps.
    let text = http_get_in_ns(&ns, LISTEN, "/metrics");
    let status = status_json(&lab, Host::Operator, &socket);

    for r in &status.routes {
        let labels = format!("{{route=\"{}\",cidr=\"{}\"}}", r.name, r.cidr);
        for (series, value) in [
            (format!("gateway_route_packets_total{labels}"), r.packets),
            (format!("gateway_route_bytes_total{labels}"), r.bytes),
        ] {
            assert_eq!(
                metric(&text, &series),
                Some(value as f64),
                "{series} vs status {r:?}:\n{text}"
            );
        }
    }
    let packets = |name: &str| {
        status
            .routes
            .iter()
            .find(|r| r.name == name)
            .map(|r| (r.packets, r.bytes))
    };
    assert_eq!(packets("vpc"), Some((4, 4 * 84)), "{status:?}");
    assert_eq!(packets("vpc-v6"), Some((2, 2 * 104)), "{status:?}");
    assert_eq!(packets("idle"), Some((0, 0)), "{status:?}");
    let matched = status.classifier.get("matched").copied().unwrap_or(0);
    assert_eq!(
        metric(
            &text,
            "gateway_classifier_packets_total{outcome=\"matched\"}"
        ),
        Some(matched as f64),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "gateway_program_attached{interface=\"lan0\",hook=\"tcx_ingress\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let build = format!(
        "gateway_build_info{{version=\"{}\",node=\"op\"}}",
        status.version
    );
    assert_eq!(metric(&text, &build), Some(1.0), "{text}");
    assert!(metric(&text, "gateway_uptime_seconds").is_some(), "{text}");
    assert!(
        !text.contains("gateway_peers"),
        "no tunnel, no peer series:\n{text}"
    );

    // Content negotiation: the classic format unless OpenMetrics is asked for.
    let (head, body) = exchange(&ns, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        body.contains("# TYPE gateway_route_packets_total counter") && !body.contains("# EOF"),
        "{body}"
    );
    let (head, body) = exchange(
        &ns,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    );
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE gateway_route_packets counter") && body.ends_with("# EOF\n"),
        "{body}"
    );
    let (head, _) = exchange(&ns, "GET /status HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = exchange(&ns, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");

    stop_cleanly(&mut daemon);
}
