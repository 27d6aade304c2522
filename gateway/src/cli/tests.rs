//! The status as an operator reads it, checked against expected text: every section, colour
//! only where asked, and whatever a peer sent escaped.

use super::*;
use crate::api::{AttachKind, InterfaceStatus, ProgramInfo, RouteStatus, STATUS_SCHEMA};
use std::collections::BTreeMap;

#[test]
fn tunnel_section_lists_peers_refusals_and_drops() {
    let t = crate::api::TunnelStatus {
        role: "connector".into(),
        tun: "gwtun".into(),
        mtu: 1434,
        state: "listening on 0.0.0.0:7844".into(),
        peers: vec![crate::api::PeerStatus {
            identity: "ops-alice".into(),
            version: "0.2.0 (protocol 1)".into(),
            remote: "198.51.100.10:7844".into(),
            transport: "tcp".into(),
            transport_reason: "no QUIC handshake in 1.5 s".into(),
            address_v4: "100.64.0.2".into(),
            address_v6: "fd00:64::2".into(),
            advertised: vec!["192.0.2.0/24".into(), "2001:db8:2::/64".into()],
            rtt_ms: 0.25,
            connected_since: 100,
            connection_id: 1,
            max_datagram: 1434,
            tx_packets: 10,
            tx_bytes: 1000,
            rx_packets: 12,
            rx_bytes: 1200,
            policy_drops: 1,
            ping_ms: Some(0.2),
        }],
        refusals: vec![crate::api::Refusal {
            identity: Some("dev-bob".into()),
            remote: "198.51.100.10:40000".into(),
            reason: "no [[policy]] entry matches identity \"dev-bob\"".into(),
            at: 150,
        }],
        drops: BTreeMap::from([("policy".into(), 1)]),
        egress_ports: None,
        firewall: None,
        access_streams_active: 1,
        access_streams_total: 3,
        limits: BTreeMap::from([("dns_rate".into(), 12), ("frame_too_long".into(), 1)]),
        handshake_failures: BTreeMap::from([("tls_failed".into(), 2)]),
        forward_filter: None,
        hub: None,
        via_hub: None,
        resolved: None,
        zones: vec![crate::api::ZoneStatus {
            domain: "hoge-vpc.com".into(),
            queries: 7,
            answers: 7,
            failovers: 2,
            servfails: 0,
            resolvers: vec![
                crate::api::ResolverStatus {
                    address: "10.128.0.61".into(),
                    up: false,
                    latency_ms: Some(0.3),
                    ping_ms: Some(0.1),
                },
                crate::api::ResolverStatus {
                    address: "10.128.0.130".into(),
                    up: true,
                    latency_ms: Some(0.25),
                    ping_ms: None,
                },
            ],
        }],
    };
    let mut out = String::new();
    render_tunnel(&mut out, &t, 165);
    let expected = "
tunnel: connector on gwtun (mtu 1434), listening on 0.0.0.0:7844
PEER       VERSION             REMOTE              TRANSPORT                        ADDRESS        RTT    PING  CONNECTED  TX PKTS/BYTES  RX PKTS/BYTES  POLICY DROPS
ops-alice  0.2.0 (protocol 1)  198.51.100.10:7844  tcp: no QUIC handshake in 1.5 s  100.64.0.2  0.2 ms  0.2 ms      1m 5s        10/1000        12/1200             1
routed to ops-alice: 192.0.2.0/24, 2001:db8:2::/64
refused: dev-bob from 198.51.100.10:40000: no [[policy]] entry matches identity \"dev-bob\"
failed handshakes: tls_failed 2
limits hit: dns_rate 12, frame_too_long 1
access streams: 1 open, 3 since start
tunnel drops: policy 1
dns zone hoge-vpc.com: 7 queries, 7 answers, 2 failovers, 0 servfail; 10.128.0.61 DOWN (ping 0.1 ms), 10.128.0.130 up 0.2 ms
";
    assert_eq!(out, expected);
}

#[test]
fn text_from_peers_cannot_add_lines_or_escape_sequences() {
    let hostile = "x\nrefused: ops-alice from 1.2.3.4: forged\x1b[2J\u{202e}";
    let peer = crate::api::PeerStatus {
        identity: "ops-\x1b]0;owned\x07".into(),
        version: "9.9\x1b[2J (protocol 1)".into(),
        remote: "198.51.100.10:7844".into(),
        transport: "tcp".into(),
        transport_reason: hostile.into(),
        address_v4: "100.64.0.2".into(),
        address_v6: "fd00:64::2".into(),
        advertised: vec![],
        rtt_ms: 0.0,
        connected_since: 0,
        connection_id: 1,
        max_datagram: 0,
        tx_packets: 0,
        tx_bytes: 0,
        rx_packets: 0,
        rx_bytes: 0,
        policy_drops: 0,
        ping_ms: None,
    };
    let t = crate::api::TunnelStatus {
        role: "connector".into(),
        tun: "gwtun".into(),
        mtu: 0,
        state: hostile.into(),
        peers: vec![peer],
        refusals: vec![crate::api::Refusal {
            identity: None,
            remote: "198.51.100.10:1".into(),
            reason: hostile.into(),
            at: 0,
        }],
        drops: BTreeMap::new(),
        zones: vec![],
        egress_ports: None,
        firewall: None,
        access_streams_active: 0,
        access_streams_total: 0,
        limits: BTreeMap::new(),
        handshake_failures: BTreeMap::new(),
        forward_filter: None,
        hub: None,
        via_hub: None,
        resolved: None,
    };
    let mut out = String::new();
    render_tunnel(&mut out, &t, 0);
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reach the terminal: {out:?}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("refused:")).count(),
        1,
        "{out}"
    );
    assert!(out.contains("\\u{1b}[2J"), "{out}");
}

#[test]
fn colour_marks_problems_and_keeps_the_plain_text() {
    let plain = "INTERFACE  CLASSIFIER\nlan0       attached\neth1       NOT ATTACHED\n\
                 firewall: nftables table inet gw MISSING (removed by someone else?)\n";
    let coloured = colourize(plain);
    assert_ne!(coloured, plain);
    assert!(
        coloured.contains("\u{1b}[1m\u{1b}[31mNOT ATTACHED\u{1b}[0m"),
        "{coloured:?}"
    );
    assert!(
        coloured.contains("\u{1b}[1m\u{1b}[31mMISSING\u{1b}[0m"),
        "a missing table is red: {coloured:?}"
    );
    assert!(
        coloured.contains("\u{1b}[32m attached\u{1b}[0m"),
        "{coloured:?}"
    );
    let mut stripped = Vec::new();
    {
        let mut w = anstream::StripStream::new(&mut stripped);
        std::io::Write::write_all(&mut w, coloured.as_bytes()).expect("write");
    }
    assert_eq!(
        String::from_utf8_lossy(&stripped),
        plain,
        "piped output is the plain text"
    );
}

#[test]
fn icmp_line_names_the_range_and_the_fix() {
    let mut s = crate::api::tests::sample_status();
    s.icmp = Some(crate::api::IcmpStatus {
        ping_group_range: "1\t0".into(),
        gid: 0,
        managed: false,
        probes_possible: false,
        fix: Some("sysctl -w net.ipv4.ping_group_range=\"0 0\"".into()),
    });
    let text = render_status(&s);
    assert!(
        text.ends_with(
            "\nicmp: ping_group_range \"1 0\" (gid 0), echo probes IMPOSSIBLE\n  \
             fix: sysctl -w net.ipv4.ping_group_range=\"0 0\"\n"
        ),
        "{text}"
    );
    let coloured = colourize(&text);
    assert!(
        coloured.starts_with("gatewayd 0.1.0 on node lab-op, classifier only (pid 42), up 1h"),
        "uptime is not a health word: {coloured:?}"
    );
    assert!(coloured.contains("\u{1b}[31mIMPOSSIBLE"), "{coloured:?}");
}

#[test]
fn certificate_line_warns_near_expiry_and_names_the_crl() {
    let mut s = crate::api::tests::sample_status();
    let mut tls = crate::api::tests::full_status().tls.expect("tls");
    s.tls = Some(tls.clone());
    let text = render_status(&s);
    assert!(
        text.contains(
            "\ncertificate: vpc-gw-1 (connector), serial 4f1c, EXPIRES in 9 days \
             (2023-11-24): renew it (gatewayctl pki renew vpc-gw-1)\n\
             crl: /etc/gateway/pki/crl.pem, 2 revoked (number 3, issued 2023-11-03)\n"
        ),
        "{text}"
    );
    assert!(colourize(&text).contains("\u{1b}[33mEXPIRES"), "yellow");
    tls.warning = None;
    tls.expires_in_days = 300;
    tls.crl = None;
    s.tls = Some(tls.clone());
    let text = render_status(&s);
    assert!(
        text.contains(
            "\ncertificate: vpc-gw-1 (connector), serial 4f1c, valid until 2023-11-24, \
             300 days left\n\n"
        ),
        "{text}"
    );
    tls.expires_in_days = -1;
    s.tls = Some(tls.clone());
    assert!(render_status(&s).contains("EXPIRED on 2023-11-24"));
    tls.warning = Some("REVOKED by the CRL in force: peers refuse it".into());
    s.tls = Some(tls);
    let text = render_status(&s);
    assert!(
        text.contains("serial 4f1c, REVOKED by the CRL in force: peers refuse it; issue"),
        "{text}"
    );
    assert!(colourize(&text).contains("\u{1b}[31mREVOKED"), "red");
}

#[test]
fn durations_read_like_a_person_says_them() {
    assert_eq!(human_duration(0), "0s");
    assert_eq!(human_duration(65), "1m 5s");
    assert_eq!(human_duration(3725), "1h 2m 5s");
    assert_eq!(human_duration(90_061), "1d 1h 1m");
}

#[test]
fn status_renders_as_aligned_tables() {
    let s = Status {
        schema: STATUS_SCHEMA,
        version: "0.1.0".into(),
        node: "lab-op".into(),
        pid: 42,
        config: "/etc/gateway/gateway.toml".into(),
        started_at: 0,
        uptime_secs: 65,
        interfaces: vec![
            InterfaceStatus {
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
            },
            InterfaceStatus {
                name: "eth1".into(),
                classifier_attached: false,
                programs: vec![],
                attach: Some(AttachKind::Tcx),
                error: None,
            },
            InterfaceStatus {
                name: "eth2".into(),
                classifier_attached: true,
                programs: vec![
                    ProgramInfo {
                        id: 9,
                        name: "other".into(),
                        ours: false,
                        mode: Some(AttachKind::Tcx),
                    },
                    ProgramInfo {
                        id: 17,
                        name: "gw_classify".into(),
                        ours: true,
                        mode: Some(AttachKind::Tc),
                    },
                ],
                attach: Some(AttachKind::Tc),
                error: None,
            },
        ],
        routes: vec![
            RouteStatus {
                id: 0,
                name: "10.128.0.0/16".into(),
                cidr: "10.128.0.0/16".into(),
                packets: 5,
                bytes: 420,
            },
            RouteStatus {
                id: 1,
                name: "vpc-v6".into(),
                cidr: "fd00:128::/64".into(),
                packets: 12,
                bytes: 1248,
            },
        ],
        classifier: BTreeMap::from([("matched".into(), 17), ("unmatched".into(), 3)]),
        tunnel: None,
        dns_egress: vec![],
        icmp: None,
        tls: None,
        last_reload: Some(crate::api::ReloadStatus {
            at: 5,
            ok: false,
            message: "tunnel.tun changed; that takes a restart".into(),
        }),
    };
    let expected = "\
gatewayd 0.1.0 on node lab-op, classifier only (pid 42), up 1m 5s
config: /etc/gateway/gateway.toml
last reload: 1m 0s ago, REFUSED (running the previous config): tunnel.tun changed; that takes a restart

INTERFACE  CLASSIFIER                INGRESS PROGRAMS
lan0       attached via tcx          gw_classify (id 17) via tcx
eth1       NOT ATTACHED (tcx)        -
eth2       attached via tc (clsact)  other (id 9, not ours) via tcx, gw_classify (id 17) via tc (clsact)

ROUTE          CIDR           PACKETS  BYTES
10.128.0.0/16  10.128.0.0/16        5    420
vpc-v6         fd00:128::/64       12   1248

classifier packets: matched 17, unmatched 3
";
    assert_eq!(render_status(&s), expected);
}

#[test]
fn a_client_says_what_systemd_resolved_sends_where_or_why_not() {
    let line = |r: crate::api::ResolvedStatus| {
        let mut out = String::new();
        super::tunnel::render_resolved(&mut out, &r);
        out
    };
    let on = crate::api::ResolvedStatus {
        on: true,
        reason: "client.dns = \"resolved\"".into(),
        stub: Some("127.0.0.1:40053".into()),
        domains: vec!["hoge-vpc.com".into(), "corp.example".into()],
        skipped: vec![],
        error: None,
    };
    assert_eq!(
        line(on.clone()),
        "systemd-resolved: ~hoge-vpc.com ~corp.example to 127.0.0.1:40053 (client.dns = \"resolved\")\n"
    );
    let failed = crate::api::ResolvedStatus {
        domains: vec![],
        skipped: vec!["x\u{1b}y: not a host name".into()],
        error: Some("systemd-resolved is not running".into()),
        ..on.clone()
    };
    assert_eq!(
        line(failed),
        "systemd-resolved: NOT SET: systemd-resolved is not running (stub 127.0.0.1:40053; \
         client.dns = \"resolved\")\nsystemd-resolved: zones not set: x\\u{1b}y: not a host name\n"
    );
    let off = crate::api::ResolvedStatus {
        on: false,
        reason: "client.dns = \"none\"".into(),
        stub: None,
        domains: vec![],
        skipped: vec![],
        error: None,
    };
    assert_eq!(
        line(off),
        "systemd-resolved: not used (client.dns = \"none\")\n"
    );
}
