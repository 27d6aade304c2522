//! What an operator does with a hub beyond relaying (issue 13): revoking a client or a
//! connector with a CRL reload on the hub, and `gatewayctl access` through it. Each test runs in
//! the hub lab (`gateway_lab::hub`), where both VPC gateways drop every inbound connection
//! attempt.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::time::Duration;

use common::*;
use gateway_lab::hub::addr as hub_addr;
use gateway_lab::{Host, addr};
use setup::*;

#[test]
fn a_crl_reload_on_the_hub_cuts_the_live_links_of_a_revoked_client_and_connector() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_client("");
    let ping = ["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST];
    h.lab
        .run_ok(Host::Operator, &ping)
        .expect("ping through the hub");
    let revoked = |h: &HubLab, name: &str| {
        pki_issue(
            &h.lab,
            &h.pki,
            &["revoke", name, "--reason", "key-compromise"],
        );
        h.hub
            .as_ref()
            .expect("hub")
            .signal(libc::SIGHUP)
            .expect("SIGHUP");
    };
    let listed = |t: &gateway::api::TunnelStatus, name: &str| {
        t.refusals.iter().any(|r| {
            r.identity.as_deref() == Some(name)
                && r.reason == "certificate revoked (key-compromise)"
        })
    };

    // Only the hub reads the new CRL: the connector still admits the client, so what ends its
    // session is the hub closing the live outer link.
    revoked(&h, CLIENT);
    wait_hub(
        &h,
        Duration::from_secs(2),
        "the client's relay closed",
        |t| listed(t, CLIENT) && t.hub.as_ref().is_some_and(|r| r.clients.is_empty()),
    );
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket);
    let reload = hub.last_reload.expect("reload reported");
    assert!(
        reload.ok
            && reload
                .message
                .contains(&format!("closed the session(s) of {CLIENT}")),
        "{reload:?}"
    );
    // It dials again at once and is refused in the handshake; nothing is relayed for it.
    wait_hub(
        &h,
        Duration::from_secs(15),
        "the client's redial refused",
        |t| {
            t.refusals
                .iter()
                .any(|r| r.remote.starts_with(addr::OP_WAN) && r.reason.contains("Revoked"))
        },
    );
    assert!(
        hub_now(&h).hub.is_some_and(|r| r.clients.is_empty()),
        "{}",
        h.logs()
    );
    assert!(
        h.lab.run_ok(Host::Operator, &ping).is_err(),
        "ping after revocation"
    );

    // A revoked connector leaves the hub's table, and its redial is refused too.
    revoked(&h, GW_A);
    wait_hub(
        &h,
        Duration::from_secs(2),
        "the connector's link closed",
        |t| listed(t, GW_A) && t.hub.as_ref().is_some_and(|r| r.connectors.is_empty()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!h.hub_lists(GW_A), "{}", h.logs());
}

#[test]
fn access_reaches_ssh_through_the_hub_with_no_tunnel_on_the_host() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    // No client daemon, no TUN, no route: only `gatewayctl access` and a config whose targets
    // are the hub.
    let config = write_config(
        &h.lab,
        "access",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}\"]\ngroup = \"{GROUP}\"\n\n{}",
            hub_target(),
            tls(&h.pki, CLIENT)
        ),
    );
    let ping = ["ping", "-c", "1", "-W", "1", addr::VPC_HOST];
    assert!(
        h.lab.run_ok(Host::Operator, &ping).is_err(),
        "a path of its own"
    );
    let proxy = format!("ProxyCommand={GATEWAYCTL} access ssh --hostname %h --port %p");
    let env = format!("GATEWAY_CONFIG={}", config.display());
    let argv = gateway_lab::ssh_argv_with(
        h.lab.ssh_key(),
        &["-o", &proxy, "-o", "ConnectTimeout=10"],
        addr::VPC_HOST,
        "echo via-hub-$((6*7))",
    );
    let mut full = vec!["env", env.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = h.lab.run(Host::Operator, &full).expect("ssh");
    assert!(
        out.status.success(),
        "ssh through access and the hub: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-hub-42");
    // The hub relayed it as a session of the user's identity (there is no other path).
    let hub_log = h.hub.as_ref().expect("hub").log();
    assert!(
        hub_log
            .lines()
            .any(|l| l.contains("client relayed") && l.contains(CLIENT)),
        "{hub_log}"
    );
}

/// Relayed packets pass the hub outside any QUIC, so the hub checks each: a flow it never
/// opened, an open flow with a guessed token, and a packet too short to be one go nowhere and
/// are counted by their reason; the session they aimed at carries on.
#[test]
fn forged_relayed_packets_go_nowhere_and_the_session_carries_on() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    let before = h.start_client("");
    let since = before.tunnel.as_ref().map(|t| t.peers[0].connected_since);
    let ping = ["ping", "-c", "3", "-i", "0.2", "-W", "2", addr::VPC_HOST];
    h.lab
        .run_ok(Host::Operator, &ping)
        .expect("ping through the hub");
    let hub =
        std::net::SocketAddr::new(hub_addr::HUB.parse().expect("hub address"), hub_addr::PORT);
    // From the operator host (another port than the client's), as an attacker there could:
    // 64 flows (the client's is among them: the hub numbers flows from 1) × 8 guessed tokens.
    let sent = crate::pair::in_ns(&h.lab, Host::Operator, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut sent = 0u64;
        for flow in 1..=64u32 {
            for _ in 0..8 {
                let mut d = vec![0x2a];
                d.extend_from_slice(&flow.to_be_bytes());
                d.extend_from_slice(&rand::random::<u64>().to_be_bytes());
                d.extend_from_slice(&[0x55; 1200]);
                sent += u64::from(s.send_to(&d, hub).is_ok());
            }
        }
        for short in [&[0x2a, 0, 0, 0, 1][..], &[0u8; 13][..]] {
            sent += u64::from(s.send_to(short, hub).is_ok());
        }
        sent
    });
    assert_eq!(sent, 64 * 8 + 2);
    let drops = |t: &gateway::api::TunnelStatus, name: &str| t.drops.get(name).copied();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let hub_status = loop {
        let t = status_json(&h.lab, Host::Hub, &h.hub_socket)
            .tunnel
            .expect("tunnel");
        let counted = ["relay_bad_token", "relay_unknown_flow", "relay_malformed"]
            .iter()
            .map(|n| drops(&t, n).unwrap_or(0))
            .sum::<u64>();
        if counted == sent || std::time::Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        drops(&hub_status, "relay_bad_token"),
        Some(8),
        "{:?}",
        hub_status.drops
    );
    assert_eq!(
        drops(&hub_status, "relay_unknown_flow"),
        Some(63 * 8),
        "{:?}",
        hub_status.drops
    );
    assert_eq!(
        drops(&hub_status, "relay_malformed"),
        Some(2),
        "{:?}",
        hub_status.drops
    );
    let relay = hub_status.hub.expect("hub tables");
    assert!(
        relay.clients.len() == 1 && relay.clients[0].relayed,
        "{relay:?}"
    );
    // Nothing reached the connector, and the session is the one from before.
    let on_connector = status_json(&h.lab, Host::VpcGateway, &h.connectors[0].2)
        .tunnel
        .expect("tunnel");
    assert!(
        !on_connector.drops.keys().any(|k| k.starts_with("relay_")),
        "{:?}",
        on_connector.drops
    );
    h.lab
        .run_ok(Host::Operator, &ping)
        .expect("ping through the hub after the forgeries");

    // A flood of them (at most 3 s and 2 million packets, as fast as one sender goes) while
    // the session pings 5 times a second: the hub keeps relaying and keeps its outer links.
    let flood = std::thread::spawn({
        let lab_ns = format!("/var/run/netns/{}", h.lab.ns(Host::Underlay));
        move || flood_hub(&lab_ns, hub)
    });
    let pings = ["ping", "-c", "15", "-i", "0.2", "-W", "1", addr::VPC_HOST];
    let out = h.lab.run(Host::Operator, &pings).expect("ping");
    let flooded = flood.join().expect("flood thread");
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received")?.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(received >= 13, "{flooded} forged packets sent; {text}");
    assert!(flooded > 10_000, "a flood: {flooded}");
    let after = status_json(&h.lab, Host::Operator, &h.client_socket).tunnel;
    assert_eq!(
        after.map(|t| t.peers[0].connected_since),
        since,
        "the same session"
    );
}

/// `relay = false` on a connector (a network that passes QUIC and nothing else on its flow):
/// its side of every session rides its outer QUIC link, the client's stays relayed, the hub
/// converts between the two, and ssh and ping work.
#[test]
fn with_relay_off_on_the_connector_its_packets_ride_its_outer_link() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "relay = false\n");
    h.start_client("");
    let out = crate::pair::ssh(
        &h.lab,
        Host::Operator,
        addr::VPC_HOST,
        "echo mixed-$((6*7))",
    )
    .expect("ssh through the hub");
    assert_eq!(out.trim(), "mixed-42");
    let ping = ["ping", "-c", "5", "-i", "0.2", "-W", "2", addr::VPC_HOST];
    h.lab.run_ok(Host::Operator, &ping).expect("ping");
    let relay = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .and_then(|t| t.hub)
        .expect("hub tables");
    assert_eq!(relay.connectors[0].transport, "quic", "{relay:?}");
    assert!(!relay.connectors[0].relayed, "{relay:?}");
    assert!(relay.clients[0].relayed, "{relay:?}");
    assert!(relay.clients[0].bytes_relayed > 1_000, "{relay:?}");
}

/// Sends forged relayed packets to `hub` from the namespace at `ns` (another host than the
/// client's) for at most 3 s or 2 million packets; how many went out.
fn flood_hub(ns: &str, hub: std::net::SocketAddr) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(ns).expect("namespace");
    // SAFETY: setns on a valid namespace fd affects only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    let mut d = vec![0x2a, 0, 0, 0, 1];
    d.extend_from_slice(&[0x55; 1208]);
    let end = std::time::Instant::now() + Duration::from_secs(3);
    let mut sent = 0u64;
    while sent < 2_000_000 && std::time::Instant::now() < end {
        for _ in 0..256 {
            sent += u64::from(s.send_to(&d, hub).is_ok());
        }
    }
    sent
}
