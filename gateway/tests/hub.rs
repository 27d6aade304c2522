//! A connector with no public address: connectors dial out to a hub, clients reach the VPC
//! through it, end to end encrypted (issue 13). Every test runs in the hub lab
//! (`gateway_lab::hub`), where both VPC gateways drop every inbound connection attempt.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::time::Duration;

use common::*;
use gateway_lab::hub::addr as hub_addr;
use gateway_lab::{Host, Lab, addr, zone};
use setup::*;

/// ssh, ping (v4 and v6), dig through the host's normal resolver, and iperf3 both ways.
fn reaches_the_vpc(lab: &Lab, host: Host) {
    let argv = lab.ssh_argv(addr::VPC_HOST, "echo tunnelled-$((6*7))");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = lab
        .run_ok(host, &argv)
        .unwrap_or_else(|e| panic!("ssh from {host:?}: {e:#}"));
    assert_eq!(out.trim(), "tunnelled-42");
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(host, &["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
            .unwrap_or_else(|e| panic!("ping {target} from {host:?}: {e:#}"));
    }
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(host, &["dig", "+short", "+time=3", "+tries=2", &db])
        .expect("dig");
    assert_eq!(out.trim(), zone::DB_PRIVATE, "dig from {host:?}");
    for reverse in [false, true] {
        let mut argv = vec!["iperf3", "-c", addr::VPC_HOST, "-t", "1"];
        if reverse {
            argv.push("-R");
        }
        iperf(lab, host, &argv);
    }
}

/// iperf3 to the VPC host; again (bounded) while the server is still busy with the last run.
fn iperf(lab: &Lab, host: Host, argv: &[&str]) {
    for _ in 0..10 {
        match lab.run_ok(host, argv) {
            Ok(_) => return,
            Err(e) if format!("{e:#}").contains("server is busy") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("{argv:?} from {host:?}: {e:#}"),
        }
    }
    panic!("{argv:?} from {host:?}: the iperf3 server stayed busy");
}

/// Nothing reaches a connector directly: a TCP connect to its tunnel port and SSH port from
/// the operator host both fail, and its filter counted what it dropped.
fn connector_takes_no_inbound(lab: &Lab) {
    for port in [7844u16, 22] {
        let to = format!("{}:{port}", addr::GW_WAN).parse().expect("addr");
        let r = crate::pair::tcp_connect(lab, Host::Operator, None, to, Duration::from_secs(1));
        assert!(r.is_err(), "a connection to {to} got through: {r:?}");
    }
    assert!(lab.inbound_dropped(Host::VpcGateway).expect("counters") > 0);
}

#[test]
fn ssh_ping_dig_and_iperf_through_the_hub_over_quic_with_no_inbound_to_the_connector() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    let status = h.start_client("");
    let t = status.tunnel.expect("tunnel");
    assert_eq!(
        t.peers[0].identity, GW_A,
        "the peer is the connector, not the hub"
    );
    assert_eq!(t.peers[0].transport, "quic");
    assert_eq!(
        t.via_hub.as_deref(),
        Some(&*format!("{}:{}", hub_addr::HUB, hub_addr::PORT))
    );
    reaches_the_vpc(&h.lab, Host::Operator);
    reaches_the_vpc(&h.lab, Host::Office);
    connector_takes_no_inbound(&h.lab);

    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    assert_eq!(hub.role, "hub");
    let relay = hub.hub.expect("hub tables");
    assert_eq!(relay.connectors.len(), 1, "{relay:?}");
    assert_eq!(relay.connectors[0].identity, GW_A);
    assert_eq!(relay.connectors[0].group, GROUP);
    assert_eq!(relay.connectors[0].transport, "quic");
    assert_eq!(relay.clients.len(), 1, "{relay:?}");
    assert_eq!(relay.clients[0].identity, CLIENT);
    assert_eq!(relay.clients[0].connector, GW_A);
    assert!(relay.clients[0].bytes_relayed > 100_000, "{relay:?}");
    let on_connector = status_json(&h.lab, Host::VpcGateway, &h.connectors[0].2)
        .tunnel
        .expect("tunnel");
    assert_eq!(on_connector.peers.len(), 1, "{on_connector:?}");
    assert_eq!(on_connector.peers[0].identity, CLIENT);
}

#[test]
fn with_udp_blocked_everything_goes_over_tcp_through_the_hub() {
    let mut h = start_hub();
    // The underlay drops all UDP it forwards: both outer links must take TLS over TCP.
    let rules = h.lab.dir().join("block-udp.nft");
    std::fs::write(
        &rules,
        "table inet block_udp {\n  chain forward {\n    type filter hook forward priority 0; \
         policy accept;\n    meta l4proto udp counter drop\n  }\n}\n",
    )
    .expect("rules");
    h.lab
        .run_ok(
            Host::Underlay,
            &["nft", "-f", rules.to_str().expect("utf-8")],
        )
        .expect("block udp");
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_client("");
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    let relay = hub.hub.expect("hub tables");
    assert_eq!(relay.connectors[0].transport, "tcp", "{relay:?}");
    assert_eq!(relay.clients[0].transport, "tcp", "{relay:?}");
    reaches_the_vpc(&h.lab, Host::Operator);
    reaches_the_vpc(&h.lab, Host::Office);
    connector_takes_no_inbound(&h.lab);
}
