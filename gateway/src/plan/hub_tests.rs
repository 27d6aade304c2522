//! `firewall plan` for the hub's roles: a connector behind a hub opens nothing inbound, only
//! its outbound link (and the replies); a hub opens its one port.

use std::path::Path;

use super::*;

const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

fn config(text: &str) -> Config {
    crate::config::parse(Path::new("/t.toml"), text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_connector_behind_a_hub_needs_no_inbound_rule_at_all() {
    let c = config(&format!(
        "[node]\nname = \"gw\"\n[tunnel]\nrole = \"connector\"\nconnect = [\"198.18.0.10:7844\"]\n\
         source_port = 7844\ngroup = \"vpc\"\n{TLS}\
         [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n\
         [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\"]\n"
    ));
    let rules = plan(&c).expect("plan");
    let opened: Vec<&FwRule> = rules
        .iter()
        .filter(|r| r.direction == Direction::Inbound && !r.reply)
        .collect();
    assert!(opened.is_empty(), "inbound rules: {opened:?}");
    for proto in ["udp", "tcp"] {
        assert!(
            rules.iter().any(|r| r.direction == Direction::Outbound
                && !r.reply
                && r.proto == proto
                && r.local_ports == Some((7844, 7844))
                && r.peer == "198.18.0.10"
                && r.peer_ports == Some((7844, 7844))),
            "{proto} to the hub: {rules:?}"
        );
        assert!(
            rules.iter().any(|r| r.direction == Direction::Inbound
                && r.reply
                && r.proto == proto
                && r.peer == "198.18.0.10"),
            "{proto} replies from the hub: {rules:?}"
        );
    }
    // Its traffic into the VPC still leaves from the pinned range.
    assert!(rules.iter().any(|r| r.direction == Direction::Outbound
        && r.proto == "tcp"
        && r.local_ports == Some((40000, 40999))
        && r.peer_ports == Some((22, 22))));
}

#[test]
fn a_hub_opens_its_listen_port_for_quic_and_tcp_only() {
    let c = config(&format!(
        "[node]\nname = \"hub\"\n[tunnel]\nrole = \"hub\"\nlisten = \"0.0.0.0:7844\"\n{TLS}"
    ));
    let rules = plan(&c).expect("plan");
    let opened: Vec<(&str, Option<(u16, u16)>)> = rules
        .iter()
        .filter(|r| r.direction == Direction::Inbound && !r.reply)
        .map(|r| (r.proto, r.local_ports))
        .collect();
    assert_eq!(
        opened,
        [("tcp", Some((7844, 7844))), ("udp", Some((7844, 7844)))]
    );
    assert!(
        rules
            .iter()
            .all(|r| r.direction == Direction::Inbound || r.reply),
        "a hub opens nothing outbound: {rules:?}"
    );
}

#[test]
fn a_connector_behind_a_hub_must_pin_its_source_port() {
    let c = config(&format!(
        "[node]\nname = \"gw\"\n[tunnel]\nrole = \"connector\"\nconnect = [\"hub:7844\"]\n{TLS}\
         [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n"
    ));
    let e = plan(&c).expect_err("unpinned");
    assert!(e.contains("tunnel.source_port"), "{e}");
}
