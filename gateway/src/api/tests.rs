//! The status type against its documented JSON schema and through a round trip, and the
//! sample status the renderer tests share.

use super::*;

pub(crate) fn sample_status() -> Status {
    Status {
        schema: STATUS_SCHEMA,
        version: "0.1.0".into(),
        node: "lab-op".into(),
        pid: 42,
        config: "/etc/gateway/gateway.toml".into(),
        started_at: 1_700_000_000,
        uptime_secs: 3725,
        interfaces: vec![InterfaceStatus {
            name: "lan0".into(),
            classifier_attached: true,
            programs: vec![ProgramInfo {
                id: 17,
                name: "gw_classify".into(),
                ours: true,
                mode: Some(AttachKind::Tcx),
            }],
            attach: Some(AttachKind::Tcx),
            error: None,
        }],
        routes: vec![RouteStatus {
            id: 0,
            name: "vpc".into(),
            cidr: "10.128.0.0/16".into(),
            packets: 5,
            bytes: 420,
        }],
        classifier: BTreeMap::from([("matched".into(), 5), ("unmatched".into(), 2)]),
        tunnel: None,
        dns_egress: vec![],
        icmp: None,
        tls: None,
        last_reload: None,
    }
}

/// A connector's status with every optional part present: one peer, one zone with a
/// resolver, refusals with and without an identity, a reload, ICMP with its fix.
pub(crate) fn full_status() -> Status {
    let mut s = sample_status();
    s.interfaces.push(InterfaceStatus {
        name: "gone0".into(),
        classifier_attached: false,
        programs: vec![],
        attach: Some(AttachKind::Tcx),
        error: Some("no such interface".into()),
    });
    s.dns_egress = vec![InterfaceStatus {
        name: "wan0".into(),
        classifier_attached: true,
        programs: vec![
            ProgramInfo {
                id: 3,
                name: "other".into(),
                ours: false,
                mode: Some(AttachKind::Tcx),
            },
            ProgramInfo {
                id: 18,
                name: "gw_dns_egress".into(),
                ours: true,
                mode: Some(AttachKind::Tc),
            },
        ],
        attach: Some(AttachKind::Tc),
        error: None,
    }];
    s.tunnel = Some(TunnelStatus {
        role: "connector".into(),
        tun: "gwtun".into(),
        mtu: 1434,
        state: "listening on 0.0.0.0:7844".into(),
        peers: vec![PeerStatus {
            identity: "ops-alice".into(),
            version: "0.2.0 (protocol 1)".into(),
            remote: "198.51.100.10:7844".into(),
            transport: "tcp".into(),
            transport_reason: "no QUIC handshake in 1.5 s".into(),
            address_v4: "100.64.0.2".into(),
            address_v6: "fd00:64::2".into(),
            advertised: vec!["192.0.2.0/24".into()],
            rtt_ms: 2.5,
            connected_since: 1_700_000_100,
            connection_id: 9,
            max_datagram: 1360,
            tx_packets: 10,
            tx_bytes: 1000,
            rx_packets: 12,
            rx_bytes: 1200,
            policy_drops: 3,
            ping_ms: Some(0.4),
        }],
        refusals: vec![
            Refusal {
                identity: Some("dev-bob".into()),
                remote: "198.51.100.10:40000".into(),
                reason: "no [[policy]] entry matches identity \"dev-bob\"".into(),
                at: 1_700_000_200,
            },
            Refusal {
                identity: None,
                remote: "198.51.100.10:1".into(),
                reason: "TLS handshake failed".into(),
                at: 1_700_000_300,
            },
        ],
        drops: BTreeMap::from([("policy".into(), 3), ("no_peer".into(), 0)]),
        zones: vec![ZoneStatus {
            domain: "hoge-vpc.com".into(),
            queries: 7,
            answers: 6,
            failovers: 1,
            servfails: 1,
            resolvers: vec![
                ResolverStatus {
                    address: "10.128.0.61".into(),
                    up: false,
                    latency_ms: None,
                    ping_ms: None,
                },
                ResolverStatus {
                    address: "10.128.0.130".into(),
                    up: true,
                    latency_ms: Some(0.3),
                    ping_ms: Some(0.1),
                },
            ],
        }],
        egress_ports: Some("40000-40999 (NAT and DNS; reserved)".into()),
        firewall: Some("nftables table inet gw present: udp/7844".into()),
        access_streams_active: 1,
        access_streams_total: 2,
        limits: BTreeMap::from([("dns_rate".into(), 5)]),
        handshake_failures: BTreeMap::from([("timed_out".into(), 2)]),
        // A hub's tables and a client's hub: not one node's, but every property serialised.
        hub: Some(HubStatus {
            connectors: vec![HubConnectorStatus {
                identity: "gw-a".into(),
                group: "vpc".into(),
                routes: vec!["10.128.0.0/16".into()],
                remote: "203.0.113.10:7844".into(),
                transport: "quic".into(),
                since: 1_700_000_000,
                sessions: 1,
                relayed: true,
            }],
            clients: vec![HubClientStatus {
                identity: "ops-alice".into(),
                connector: "gw-a".into(),
                remote: "198.51.100.10:7844".into(),
                transport: "tcp".into(),
                since: 1_700_000_100,
                bytes_relayed: 4096,
                relayed: false,
            }],
        }),
        via_hub: Some("198.18.0.10:7844".into()),
        forward_filter: Some(ForwardFilterStatus {
            table: "gw".into(),
            drops: BTreeMap::from([("into_vpc".into(), 4), ("other".into(), 0)]),
            inbound_accepted: 1,
        }),
        resolved: Some(ResolvedStatus {
            on: true,
            reason: "systemd-resolved is on the system bus".into(),
            stub: Some("127.0.0.1:40053".into()),
            domains: vec!["hoge-vpc.com".into()],
            skipped: vec!["bad\\x1b: not a host name".into()],
            error: Some("SetLinkDomains: no answer within 3s".into()),
        }),
    });
    s.last_reload = Some(ReloadStatus {
        at: 1_700_000_400,
        ok: false,
        message: "tunnel.tun changed; that takes a restart".into(),
    });
    s.icmp = Some(IcmpStatus {
        ping_group_range: "1\t0".into(),
        gid: 0,
        managed: false,
        probes_possible: false,
        fix: Some("sysctl -w net.ipv4.ping_group_range=\"0 0\"".into()),
    });
    s.tls = Some(TlsStatus {
        identity: "vpc-gw-1".into(),
        profile: "connector".into(),
        serial: "4f1c".into(),
        not_after: 1_700_864_000,
        expires_in_days: 9,
        warning: Some("expires in 9 days (2023-11-24)".into()),
        crl: Some(CrlStatus {
            path: "/etc/gateway/pki/crl.pem".into(),
            revoked: 2,
            number: 3,
            issued_at: 1_699_000_000,
        }),
    });
    s
}

fn schema() -> serde_json::Value {
    serde_json::from_str(include_str!("../../../docs/status.schema.json")).expect("schema")
}

fn validation_errors(value: &serde_json::Value) -> Vec<String> {
    let schema = schema();
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

#[test]
fn a_status_with_every_part_fits_the_documented_schema() {
    let value = serde_json::to_value(full_status()).expect("serialise");
    let errors = validation_errors(&value);
    assert!(errors.is_empty(), "{errors:#?}\n{value:#}");
    // And so does the smallest one: a classifier-only node without the optional parts.
    let value = serde_json::to_value(sample_status()).expect("serialise");
    let errors = validation_errors(&value);
    assert!(errors.is_empty(), "{errors:#?}\n{value:#}");
}

#[test]
fn the_schema_rejects_what_it_does_not_document() {
    let value = serde_json::to_value(full_status()).expect("serialise");
    for (pointer, bad) in [
        (
            "/tunnel/peers/0/transport",
            serde_json::json!("carrier-pigeon"),
        ),
        ("/routes/0/packets", serde_json::json!(-1)),
        ("/schema", serde_json::json!(STATUS_SCHEMA + 1)),
        ("/tunnel/zones/0/resolvers/0/up", serde_json::json!("yes")),
    ] {
        let mut broken = value.clone();
        *broken.pointer_mut(pointer).expect(pointer) = bad;
        assert!(
            !validation_errors(&broken).is_empty(),
            "{pointer} accepted a wrong value"
        );
    }
    let mut extra = value.clone();
    extra["tunnel"]["peers"][0]["colour"] = "blue".into();
    assert!(
        !validation_errors(&extra).is_empty(),
        "an undocumented field passed"
    );
}

/// The other direction: every property the schema documents is one [`Status`] really
/// serialises, so the document cannot describe fields that do not exist (or no longer do).
#[test]
fn every_documented_property_is_serialised() {
    use std::collections::BTreeSet;
    type Seen = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>;
    /// Records, per schema object (named by its `$ref`, else its path), the properties it
    /// documents and those some serialised value had.
    fn walk(
        root: &serde_json::Value,
        node: &serde_json::Value,
        name: String,
        value: &serde_json::Value,
        seen: &mut Seen,
    ) {
        let (node, name) = match node.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => (
                root.pointer(r.trim_start_matches('#'))
                    .unwrap_or_else(|| panic!("dangling {r}")),
                r.to_string(),
            ),
            None => (node, name),
        };
        match value {
            serde_json::Value::Object(map) => {
                // A map by name (classifier, drops) has no properties: its keys are data.
                let Some(props) = node.get("properties").and_then(|p| p.as_object()) else {
                    return;
                };
                let entry = seen.entry(name.clone()).or_default();
                entry.0.extend(props.keys().cloned());
                entry.1.extend(map.keys().cloned());
                for (k, v) in map {
                    if let Some(p) = props.get(k) {
                        walk(root, p, format!("{name}/{k}"), v, seen);
                    }
                }
            }
            serde_json::Value::Array(items) => {
                if let Some(item) = node.get("items") {
                    for v in items {
                        walk(root, item, format!("{name}[]"), v, seen);
                    }
                }
            }
            _ => {}
        }
    }
    let schema = schema();
    let value = serde_json::to_value(full_status()).expect("serialise");
    let mut seen = Seen::new();
    walk(&schema, &schema, "#".into(), &value, &mut seen);
    for (name, (documented, serialised)) in &seen {
        assert_eq!(documented, serialised, "properties of {name}");
    }
    // Every object the schema defines was reached, so none was left unchecked.
    let defs = schema["$defs"].as_object().expect("$defs");
    for (def, body) in defs {
        if body.get("properties").is_some() {
            assert!(
                seen.contains_key(&format!("#/$defs/{def}")),
                "$defs/{def} never checked"
            );
        }
    }
}

#[test]
fn status_round_trips_through_json() {
    let s = Response::Status(Box::new(sample_status()));
    let text = serde_json::to_string(&s).expect("serialize");
    let back: Response = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, s);
}

#[test]
fn request_wire_form_is_stable() {
    assert_eq!(
        serde_json::to_string(&Request::Status).expect("serialize"),
        r#"{"request":"status"}"#
    );
}
