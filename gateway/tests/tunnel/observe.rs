//! What an operator reads: metrics that agree with status, and status on a live tunnel.

use super::*;

/// Every counter the metrics endpoint shows agrees with `status --json`: read metrics, status,
/// metrics again, and the status value lies between the two reads (and traffic made it move).
pub(crate) fn assert_metrics_match(
    lab: &Lab,
    host: Host,
    socket: &std::path::Path,
    pairs: &dyn Fn(&gateway::api::Status) -> Vec<(String, u64)>,
) {
    let ns = lab.ns(host);
    let before = http_get_in_ns(&ns, "127.0.0.1:9469", "/metrics");
    let status = status_json(lab, host, socket);
    let after = http_get_in_ns(&ns, "127.0.0.1:9469", "/metrics");
    let expected = pairs(&status);
    assert!(!expected.is_empty());
    for (series, value) in expected {
        let lo = metric(&before, &series).unwrap_or_else(|| panic!("{series} missing:\n{before}"));
        let hi = metric(&after, &series).unwrap_or_else(|| panic!("{series} missing:\n{after}"));
        assert!(
            lo <= value as f64 && value as f64 <= hi,
            "{host:?} {series}: metrics {lo}..{hi}, status {value}"
        );
        assert!(value > 0, "{host:?} {series} never moved");
    }
}

#[test]
fn the_metrics_endpoint_serves_the_counters_status_shows() {
    let t = start_with(true);
    let lab = &t.lab;
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .expect("ping from the office");
    let db = format!("db.{}", zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &db]).trim(), zone::DB_PRIVATE);

    let peer_series = |s: &gateway::api::Status| -> Vec<(String, u64)> {
        let t = s.tunnel.as_ref().expect("tunnel");
        t.peers
            .iter()
            .flat_map(|p| {
                let l = format!(
                    "{{identity=\"{}\",transport=\"{}\"}}",
                    p.identity, p.transport
                );
                [
                    (format!("gateway_peer_tx_packets_total{l}"), p.tx_packets),
                    (format!("gateway_peer_rx_packets_total{l}"), p.rx_packets),
                    (format!("gateway_peer_tx_bytes_total{l}"), p.tx_bytes),
                    (format!("gateway_peer_rx_bytes_total{l}"), p.rx_bytes),
                ]
            })
            .collect()
    };
    // The client: its classifier's per-route counters (the office's traffic) and the peer.
    assert_metrics_match(lab, Host::Operator, &t.client_socket, &|s| {
        let mut v: Vec<(String, u64)> = s
            .routes
            .iter()
            .filter(|r| r.cidr == addr::VPC_CIDR)
            .map(|r| {
                (
                    format!(
                        "gateway_route_packets_total{{route=\"{}\",cidr=\"{}\"}}",
                        r.name, r.cidr
                    ),
                    r.packets,
                )
            })
            .collect();
        v.extend(peer_series(s));
        v
    });
    // The connector: its peer and the private zone's DNS counters.
    assert_metrics_match(lab, Host::VpcGateway, &t.connector_socket, &|s| {
        let mut v = peer_series(s);
        for z in &s.tunnel.as_ref().expect("tunnel").zones {
            v.push((
                format!("gateway_dns_queries_total{{zone=\"{}\"}}", z.domain),
                z.queries,
            ));
            v.push((
                format!("gateway_dns_answers_total{{zone=\"{}\"}}", z.domain),
                z.answers,
            ));
        }
        v
    });
}

/// Whitespace-separated cells of the first line of `text` that starts with `first`.
pub(crate) fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{text}"))
        .split_whitespace()
        .collect()
}

#[test]
fn status_on_a_live_tunnel_shows_the_peer_its_transport_and_counters_that_move() {
    let t = start_with(true);
    let lab = &t.lab;
    let sock = t.client_socket.to_str().expect("utf-8");
    let human = || {
        let out = gatewayctl(lab, Host::Operator, &["status", "--socket", sock]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let before = human();
    assert!(
        !before.contains('\u{1b}'),
        "colour in piped output:\n{before}"
    );
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "5", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .expect("ping");
    let after = human();
    // The peer row: identity, version (three words), remote, transport, then the counters.
    let peer = row(&after, "lab-gw");
    let version = format!("{} (protocol", env!("CARGO_PKG_VERSION"));
    assert_eq!(peer[1..3].join(" "), version, "{after}");
    assert_eq!(peer[4], format!("{}:7844", addr::GW_WAN), "{after}");
    assert_eq!(peer[5], "quic", "{after}");
    let tx = |text: &str| -> u64 {
        let r = row(text, "lab-gw");
        // TX PKTS/BYTES is the third cell from the end (TX, RX, POLICY DROPS).
        r[r.len() - 3]
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("TX cell in {r:?}"))
    };
    assert!(
        tx(&after) >= tx(&before) + 5,
        "before:\n{before}\nafter:\n{after}"
    );
    // The office's pings went through the classifier's route for the VPC.
    let route = |text: &str| -> u64 {
        row(text, addr::VPC_CIDR)[2]
            .parse()
            .unwrap_or_else(|_| panic!("{text}"))
    };
    assert!(route(&after) >= route(&before) + 5, "{after}");
    assert!(after.contains("tunnel: client on optun"), "{after}");
    assert!(
        after
            .lines()
            .next()
            .is_some_and(|l| l.contains("on node ops-alice, client")),
        "{after}"
    );

    // --json on both ends, with peers, zones, routes and programs, fits the documented schema.
    let client = status_validated(lab, Host::Operator, &t.client_socket);
    assert_eq!(client["tunnel"]["peers"][0]["transport"], "quic");
    let connector = status_validated(lab, Host::VpcGateway, &t.connector_socket);
    assert_eq!(connector["tunnel"]["zones"][0]["domain"], zone::DOMAIN);
    // Each end shows the release and protocol the other said (version skew is visible).
    let said = format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        gateway::core::control::PROTOCOL_VERSION
    );
    assert_eq!(client["tunnel"]["peers"][0]["version"], said.as_str());
    assert_eq!(connector["tunnel"]["peers"][0]["version"], said.as_str());

    // --watch redraws until interrupted; piped, snapshots are separated by a line.
    let mut watch = spawn_watch(lab, Host::Operator, sock, "watch.log");
    std::thread::sleep(Duration::from_millis(1500));
    watch.terminate().expect("SIGTERM");
    let _ = watch.wait_timeout(Duration::from_secs(5));
    let log = watch.log();
    assert!(
        log.matches("\n--- ").count() + usize::from(log.starts_with("--- ")) >= 3,
        "{log}"
    );
    assert!(log.matches("TRANSPORT").count() >= 3, "{log}");
}
