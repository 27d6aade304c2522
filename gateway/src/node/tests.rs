//! The tunnel's behaviour, shown in-process: a client node and a connector node on a simulated
//! network with a moving clock (see `pair`). Each test names the behaviour it shows.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::drops::Drop;
use super::pair::{self, FromTunOutcome, Pair, VPC};
use super::{ClientEvent, ConnectorEvent, LinkKind};
use crate::config::Transport;
use crate::core::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

fn ops_policy() -> pair::PolicySpec {
    pair::policy(&[
        (
            "ops-*",
            &[
                "10.128.0.0/16 tcp/22",
                "10.128.0.0/16 icmp",
                "10.128.0.0/16 udp/53",
            ],
            &[],
        ),
        ("site-*", &["10.128.0.0/16"], &["192.0.2.0/24"]),
    ])
}

fn v4(proto: u8, src: IpAddr, dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let IpAddr::V4(src) = src else {
        panic!("v4 source expected")
    };
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn tcp_syn(port: u16, mss: u16) -> Vec<u8> {
    let mut t = vec![0u8; 24];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&port.to_be_bytes());
    t[12] = 6 << 4;
    t[13] = 0x02;
    t[20..24].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
    t
}

fn up(p: &mut Pair) {
    p.run_for(Duration::from_secs(3));
    assert!(p.client_is_up(), "{}", p.client.status_line());
}

#[test]
fn handshake_leases_an_address_and_installs_the_offered_routes() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    let early = v4(
        PROTO_ICMP,
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
        [10, 128, 0, 10],
        &[8, 0, 0, 0],
    );
    assert_eq!(
        p.client_sends(early),
        Some(FromTunOutcome::Dropped(Drop::TunnelDown))
    );
    assert_eq!(p.client_drops.get(Drop::TunnelDown), 1);
    up(&mut p);
    let peer = p.client_peer().expect("peer");
    assert_eq!(peer.address_v4, "100.64.0.2");
    assert_eq!(peer.address_v6, "fd00:64::2");
    assert_eq!(peer.transport, "quic");
    assert!(p.client_routes.contains(&VPC.parse().expect("net")));
    let on_connector = p.connector_peers();
    assert_eq!(on_connector.len(), 1);
    assert_eq!(on_connector[0].identity, "ops-alice");
    assert_eq!(p.tun_mtu, 1400, "the TUN follows the peer's path");
    assert!(matches!(
        p.client_events.iter().find(|e| matches!(e, ClientEvent::TunnelUp { .. })),
        Some(ClientEvent::TunnelUp { zones, .. }) if zones == &["hoge-vpc.com".to_string()]
    ));
    // A minute on: keepalives keep it up, nothing is refused.
    p.run_for(Duration::from_secs(60));
    assert!(p.client_is_up());
    assert_eq!(p.connector.refusals().count(), 0);
}

#[test]
fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let mut p = Pair::with(
        "ops-alice",
        true,
        Transport::Quic,
        pair::connector_config(ops_policy()),
        vec![],
    );
    p.run_for(Duration::from_secs(5));
    assert!(!p.client_is_up());
    assert!(p.connector_peers().is_empty());
    let r = p.connector.refusals().next().expect("refusal");
    assert!(r.reason.contains("TLS handshake failed"), "{}", r.reason);
    assert!(p.client.status_line().starts_with("reconnecting:"));
}

#[test]
fn an_identity_no_policy_names_is_refused_with_the_reason() {
    let mut p = Pair::new("mallory", Transport::Auto, ops_policy());
    p.run_for(Duration::from_secs(3));
    assert!(!p.client_is_up());
    let r = p.connector.refusals().next().expect("refusal");
    assert_eq!(r.identity.as_deref(), Some("mallory"));
    assert!(r.reason.contains("no [[policy]] entry"), "{}", r.reason);
    assert!(
        p.client
            .status_line()
            .contains("refused by the connector: no [[policy]] entry"),
        "{}",
        p.client.status_line()
    );
    assert!(p.connector_peers().is_empty());
}

#[test]
fn a_spoofed_inner_source_is_dropped_and_counted() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let spoofed = v4(
        PROTO_ICMP,
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9)),
        [10, 128, 0, 10],
        &[8, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(p.client_sends(spoofed), Some(FromTunOutcome::Sent));
    let own = p.overlay_v4().expect("address");
    let echo = v4(PROTO_ICMP, own, [10, 128, 0, 10], &[8, 0, 0, 0, 0, 0, 0, 0]);
    p.client_sends(echo);
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.connector_drops.get(Drop::SpoofedSource), 1);
    assert_eq!(
        p.delivered_vpc.len(),
        1,
        "only the honest echo gets through"
    );
}

#[test]
fn packets_policy_does_not_allow_are_dropped_and_counted_per_peer() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let own = p.overlay_v4().expect("address");
    p.client_sends(v4(PROTO_TCP, own, [10, 128, 0, 10], &tcp_syn(22, 1460)));
    p.client_sends(v4(PROTO_TCP, own, [10, 128, 0, 10], &tcp_syn(5432, 1460)));
    p.client_sends(v4(
        PROTO_UDP,
        own,
        [10, 128, 0, 61],
        &[0, 9, 0, 53, 0, 8, 0, 0],
    ));
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.delivered_vpc.len(), 2, "ssh and DNS pass");
    assert_eq!(p.connector_drops.get(Drop::Policy), 1);
    assert_eq!(p.connector_peers()[0].policy_drops, 1);
}

#[test]
fn a_syn_is_clamped_to_the_peers_path() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let own = p.overlay_v4().expect("address");
    p.client_sends(v4(PROTO_TCP, own, [10, 128, 0, 10], &tcp_syn(22, 1460)));
    p.run_for(Duration::from_millis(100));
    let syn = p.delivered_vpc.first().expect("delivered");
    let mss = u16::from_be_bytes([syn[20 + 22], syn[20 + 23]]);
    assert_eq!(mss, 1400 - 40);
}

#[test]
fn a_packet_too_big_for_the_peers_path_is_answered_not_lost() {
    let mut p = Pair::new("ops-alice", Transport::Tcp, ops_policy());
    up(&mut p);
    let own = p.overlay_v4().expect("address");
    // From the VPC towards the client on TCP (1360): a 1400-byte packet with DF set.
    let mut big = v4(
        PROTO_UDP,
        IpAddr::V4(Ipv4Addr::new(10, 128, 0, 10)),
        [0; 4],
        &[0u8; 1380],
    );
    if let IpAddr::V4(a) = own {
        big[16..20].copy_from_slice(&a.octets());
    }
    assert_eq!(p.vpc_sends(big), FromTunOutcome::Answered);
    let icmp = p.answered.first().expect("answer");
    assert_eq!((icmp[20], icmp[21]), (3, 4), "fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1360);
    assert_eq!(p.connector_drops.get(Drop::TooBigAnswered), 1);
    // Without DF nobody asked for path MTU discovery: dropped and counted.
    let mut no_df = v4(
        PROTO_UDP,
        IpAddr::V4(Ipv4Addr::new(10, 128, 0, 10)),
        [0; 4],
        &[0u8; 1380],
    );
    no_df[6] = 0;
    no_df[16..20].copy_from_slice(&[100, 64, 0, 2]);
    assert_eq!(
        p.vpc_sends(no_df),
        FromTunOutcome::Dropped(Drop::TooBigNoDf)
    );
}

#[test]
fn a_reload_adds_and_removes_routes_and_zones_on_the_same_link() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let link = p.client_peer().expect("peer").connection_id;
    let mut cfg = pair::connector_config(ops_policy());
    cfg.routes = vec!["10.129.0.0/16".parse().expect("net")];
    cfg.zones = vec!["other-vpc.com".into()];
    let now = p.now;
    p.connector.reload(now, cfg);
    p.run_for(Duration::from_millis(200));
    assert!(
        p.client_routes
            .contains(&"10.129.0.0/16".parse().expect("net"))
    );
    assert!(!p.client_routes.contains(&VPC.parse().expect("net")));
    assert_eq!(p.client.zones(), ["other-vpc.com".to_string()]);
    assert_eq!(
        p.client_peer().expect("peer").connection_id,
        link,
        "same link"
    );
}

#[test]
fn a_reload_that_withdraws_an_identity_closes_its_session_with_why() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let now = p.now;
    p.connector.reload(
        now,
        pair::connector_config(pair::policy(&[("auditor", &["10.128.0.61/32"], &[])])),
    );
    p.run_for(Duration::from_millis(300));
    assert!(!p.client_is_up());
    assert!(p.connector_peers().is_empty());
    let r = p.connector.refusals().last().expect("refusal");
    assert!(r.reason.contains("any more"), "{}", r.reason);
}

#[test]
fn lost_keepalives_reconnect_with_backoff_and_jitter() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    up(&mut p);
    let first = p.client_peer().expect("peer").connection_id;
    p.cut = true;
    p.run_for(Duration::from_secs(9));
    assert!(
        p.client
            .status_line()
            .contains("answered no control keepalive"),
        "{}",
        p.client.status_line()
    );
    // Attempts keep coming while cut, spaced by a growing backoff that tops out at 4 s + jitter.
    let dials_before = count_dials(&p);
    p.run_for(Duration::from_secs(30));
    let dials = count_dials(&p) - dials_before;
    assert!((4..=30).contains(&dials), "{dials} dials in 30 s");
    // The connector noticed the silence too.
    assert!(p.connector_peers().is_empty());
    p.cut = false;
    p.run_for(Duration::from_secs(10));
    assert!(p.client_is_up(), "{}", p.client.status_line());
    let peer = p.client_peer().expect("peer");
    assert_ne!(peer.connection_id, first);
    assert_eq!(peer.address_v4, "100.64.0.2", "the lease is kept");
}

fn count_dials(p: &Pair) -> usize {
    p.client_events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Dial { .. }))
        .count()
}

#[test]
fn without_udp_the_client_uses_tcp_and_moves_back_to_quic_keeping_its_address() {
    let mut p = Pair::new("ops-alice", Transport::Auto, ops_policy());
    p.udp_blocked = true;
    p.run_for(Duration::from_secs(3));
    let peer = p.client_peer().expect("up on TCP");
    assert_eq!(peer.transport, "tcp");
    assert_eq!(peer.transport_reason, "no QUIC handshake in 1.5 s");
    assert_eq!(p.tun_mtu, 1360);
    p.run_for(Duration::from_secs(7));
    let peer = p.client_peer().expect("still up");
    assert!(
        peer.transport_reason.contains("QUIC retried every 5 s"),
        "{}",
        peer.transport_reason
    );
    let on_tcp = peer.connection_id;
    p.udp_blocked = false;
    p.run_for(Duration::from_secs(8));
    let peer = p.client_peer().expect("up");
    assert_eq!(peer.transport, "quic");
    assert_ne!(peer.connection_id, on_tcp);
    assert_eq!(peer.address_v4, "100.64.0.2");
    assert!(p.client_events.iter().any(|e| matches!(
        e,
        ClientEvent::CloseLink { link, .. } if link.0 == on_tcp
    )));
    let on_connector = p.connector_peers();
    assert_eq!(on_connector.len(), 1, "the TCP session was replaced");
    assert_eq!(on_connector[0].transport, "quic");
    assert_eq!(p.tun_mtu, 1400);
}

#[test]
fn a_client_may_advertise_only_what_its_policy_grants() {
    for (advertise, refused_because) in [
        ("192.0.2.0/24", None),
        ("192.0.2.128/25", None),
        (
            "198.18.0.0/24",
            Some("not in any [[policy]] advertise list"),
        ),
        ("10.128.0.0/16", Some("overlaps the connector's route")),
        ("0.0.0.0/0", Some("default route")),
    ] {
        let net: IpNet = advertise.parse().expect("net");
        let mut p = Pair::with(
            "site-tokyo",
            false,
            Transport::Auto,
            pair::connector_config(ops_policy()),
            vec![net],
        );
        p.run_for(Duration::from_secs(3));
        assert!(p.vpc_route_is_the_kernels(), "{advertise}");
        match refused_because {
            None => {
                assert!(p.client_is_up(), "{advertise}: {}", p.client.status_line());
                assert_eq!(
                    p.kernel_routes.get(&net).map(String::as_str),
                    Some("gatewayd")
                );
            }
            Some(why) => {
                let r = p.connector.refusals().next().expect("refused");
                assert!(r.reason.contains(why), "{advertise}: {}", r.reason);
                assert!(!p.kernel_routes.contains_key(&net) || net.to_string() == VPC);
            }
        }
    }
}

#[test]
fn advertised_routes_leave_with_the_session_and_the_overlay_or_vpc_cannot_be_claimed() {
    // Granted more than it should be: the connector's own checks still hold.
    let policy = pair::policy(&[("site-*", &["10.128.0.0/16"], &["0.0.0.0/1", "128.0.0.0/1"])]);
    for (net, why) in [
        ("10.128.0.0/16", "overlaps the connector's route"),
        ("100.64.0.3/32", "overlaps the overlay"),
        ("203.0.113.0/25", "which the connector routes itself"),
    ] {
        let mut p = Pair::with(
            "site-tokyo",
            false,
            Transport::Auto,
            pair::connector_config(policy.clone()),
            vec![net.parse().expect("net")],
        );
        p.run_for(Duration::from_secs(3));
        let r = p.connector.refusals().next().expect("refused");
        assert!(r.reason.contains(why), "{net}: {}", r.reason);
        assert!(p.vpc_route_is_the_kernels());
    }
    let mut p = Pair::with(
        "site-tokyo",
        false,
        Transport::Auto,
        pair::connector_config(policy),
        vec!["192.0.2.0/24".parse().expect("net")],
    );
    up(&mut p);
    assert!(
        p.kernel_routes
            .contains_key(&"192.0.2.0/24".parse().expect("net"))
    );
    // From the VPC to the LAN goes to that client.
    let reply = v4(
        PROTO_ICMP,
        IpAddr::V4(Ipv4Addr::new(10, 128, 0, 10)),
        [192, 0, 2, 10],
        &[0; 8],
    );
    assert_eq!(p.vpc_sends(reply), FromTunOutcome::Sent);
    p.cut = true;
    p.run_for(Duration::from_secs(12));
    assert!(p.connector_peers().is_empty());
    assert!(
        !p.kernel_routes
            .contains_key(&"192.0.2.0/24".parse().expect("net")),
        "removed with the session"
    );
    assert!(
        p.connector_events
            .iter()
            .any(|e| matches!(e, ConnectorEvent::RemoveRoutes { .. }))
    );
}

#[test]
fn a_prefix_another_client_holds_cannot_be_advertised() {
    use super::{LinkId, LinkInfo};
    let policy = pair::policy(&[(
        "site-*",
        &["10.128.0.0/16"],
        &["192.0.2.0/24", "100.64.0.0/10"],
    )]);
    let drops = std::sync::Arc::new(super::drops::Drops::default());
    let mut c = super::Connector::new(pair::connector_config(policy), drops, Default::default());
    let now = std::time::Instant::now();
    let info = |id: &str| LinkInfo {
        kind: LinkKind::Quic,
        remote: "198.51.100.10:7844".parse().expect("addr"),
        identity: id.into(),
        max_packet: Some(1400),
        sink: super::datapath::Sink::none(),
    };
    let hello = |nets: &[&str]| crate::core::control::Control::Hello {
        version: crate::core::control::PROTOCOL_VERSION,
        node: String::new(),
        software: None,
        advertise: nets.iter().map(|n| n.parse().expect("net")).collect(),
        transport_reason: None,
    };
    c.handle_link_up(now, LinkId(1), info("site-tokyo"));
    c.handle_control(now, LinkId(1), hello(&["192.0.2.0/24"]));
    while let Some(e) = c.poll_event() {
        if let ConnectorEvent::AddRoutes { link, prefixes } = e {
            c.handle_routes_added(now, link, &prefixes, Ok(()));
        }
    }
    assert_eq!(c.peers(now, 0).len(), 1);
    // Another site claims the same LAN, then the first site's overlay address.
    for (i, claim, why) in [
        (2, "192.0.2.128/25", "held by site-tokyo"),
        (3, "100.64.0.2/32", "overlaps the overlay"),
    ] {
        c.handle_link_up(now, LinkId(i), info("site-osaka"));
        c.handle_control(now, LinkId(i), hello(&[claim]));
        let r = c.refusals().last().expect("refused");
        assert!(r.reason.contains(why), "{claim}: {}", r.reason);
    }
    assert_eq!(c.peers(now, 0).len(), 1);
    let dp = c.datapath();
    let to_lan = dp
        .peer_for("192.0.2.200".parse().expect("ip"))
        .expect("owner");
    assert_eq!(
        &*to_lan.identity, "site-tokyo",
        "the victim keeps its traffic"
    );
}

#[test]
fn a_silent_peer_is_closed_and_a_hello_that_never_comes_times_out() {
    use super::{LinkId, LinkInfo};
    let drops = std::sync::Arc::new(super::drops::Drops::default());
    let mut c = super::Connector::new(
        pair::connector_config(ops_policy()),
        drops,
        Default::default(),
    );
    let now = std::time::Instant::now();
    c.handle_link_up(
        now,
        LinkId(1),
        LinkInfo {
            kind: LinkKind::Tcp,
            remote: "198.51.100.10:7844".parse().expect("addr"),
            identity: "ops-alice".into(),
            max_packet: Some(1360),
            sink: super::datapath::Sink::none(),
        },
    );
    assert_eq!(c.poll_timeout(), Some(now + super::HANDSHAKE_TIMEOUT));
    c.handle_timeout(now + super::HANDSHAKE_TIMEOUT);
    assert!(matches!(
        c.poll_event(),
        Some(ConnectorEvent::CloseLink {
            link: LinkId(1),
            ..
        })
    ));
    assert_eq!(c.poll_timeout(), None);
}

/// A hello exactly as gateway 0.1.0 sent it (its control encoding, recorded).
const HELLO_0_1_0: &str = r#"{"type":"hello","version":1,"node":"lab-gw","advertise":[],"transport_reason":"no QUIC handshake in 1.5 s"}"#;

#[test]
fn a_hello_from_a_release_one_version_apart_is_welcomed_and_its_version_shown() {
    use super::{LinkId, LinkInfo};
    use crate::core::control::{Control, decode};
    let drops = std::sync::Arc::new(super::drops::Drops::default());
    let mut c = super::Connector::new(
        pair::connector_config(ops_policy()),
        drops,
        Default::default(),
    );
    let now = std::time::Instant::now();
    let info = || LinkInfo {
        kind: LinkKind::Tcp,
        remote: "198.51.100.10:7844".parse().expect("addr"),
        identity: "ops-alice".into(),
        max_packet: Some(1360),
        sink: super::datapath::Sink::none(),
    };
    let newer = r#"{"type":"hello","version":2,"node":"lab-gw","software":"0.3.0","advertise":[],"a_field_from_the_future":[1,2]}"#;
    let too_new = r#"{"type":"hello","version":3,"node":"lab-gw","advertise":[]}"#;
    for (i, (hello, welcomed, shown)) in [
        (HELLO_0_1_0, true, "protocol 1"),
        (newer, true, "0.3.0 (protocol 2)"),
        (too_new, false, ""),
    ]
    .into_iter()
    .enumerate()
    {
        let link = LinkId(i as u64 + 1);
        c.handle_link_up(now, link, info());
        c.handle_control(now, link, decode(hello.as_bytes()).expect("a hello"));
        let answer = c.poll_transmit().expect("an answer");
        assert_eq!(
            matches!(answer.msg, Control::Welcome { .. }),
            welcomed,
            "{hello}: {answer:?}"
        );
        if welcomed {
            let peers = c.peers(now, 0);
            let p = peers.iter().find(|p| p.link == link).expect("the peer");
            assert_eq!(p.version, shown);
        } else {
            let r = c.refusals().last().expect("refused");
            assert!(r.reason.contains("protocol version 3"), "{}", r.reason);
        }
        while c.poll_event().is_some() {}
    }
}

#[test]
fn a_client_refuses_a_connector_two_versions_apart_and_says_why() {
    use super::{LinkId, LinkInfo};
    use crate::core::control::{Control, decode};
    let mut p = Pair::new("ops-alice", Transport::Quic, ops_policy());
    p.run_for(Duration::from_millis(1));
    let attempt = p
        .client_events
        .iter()
        .find_map(|e| match e {
            ClientEvent::Dial { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .expect("a dial");
    // Answer the dial by hand, with a welcome from protocol 3.
    let now = p.now;
    p.client.handle_link_up(
        now,
        attempt,
        LinkId(99),
        LinkInfo {
            kind: LinkKind::Quic,
            remote: "203.0.113.10:7844".parse().expect("addr"),
            identity: pair::CONNECTOR.into(),
            max_packet: Some(1400),
            sink: super::datapath::Sink::none(),
        },
    );
    let welcome = r#"{"type":"welcome","version":3,"node":"ops-alice","address_v4":"100.64.0.2","address_v6":"fd00:64::2","prefix_v4":24,"prefix_v6":64,"routes":[],"keepalive_secs":1}"#;
    let msg: Control = decode(welcome.as_bytes()).expect("a welcome");
    p.client.handle_control(now, LinkId(99), msg);
    assert!(
        p.client.status_line().contains("speaks protocol 3"),
        "{}",
        p.client.status_line()
    );
}
