//! SIGHUP: what a reload applies on live connections and what it refuses.

use super::*;

#[test]
fn sighup_adds_a_route_without_touching_the_tunnel_and_refuses_what_needs_a_restart() {
    let v4_route = format!("[[route]]\ncidr = \"{}\"\n", addr::VPC_CIDR);
    let mut full = String::new();
    let ConnectorOnly {
        lab,
        pki,
        config: cc,
        socket: connector_socket,
        daemon: connector,
    } = connector_only(|cc| {
        full = std::fs::read_to_string(cc).expect("read config");
        assert!(full.contains(&v4_route));
        // Start offering only the IPv6 prefix.
        std::fs::write(cc, full.replace(&v4_route, "")).expect("write config");
    });
    let oc = client_config(&lab, &pki, "ops-alice", false);
    let client_socket = socket_path(&lab, "ops-alice");
    let _client = start_daemon(&lab, Host::Operator, &oc, &client_socket, "client.log");
    wait_connected(&lab, &client_socket, Duration::from_secs(10));
    let ping = |target: &str| {
        lab.run(Host::Operator, &["ping", "-c", "1", "-W", "1", target])
            .expect("ping")
            .status
            .success()
    };
    assert!(ping(addr::VPC_HOST_V6));
    assert!(!ping(addr::VPC_HOST), "10.128.0.0/16 is not offered yet");
    let before = client_peer(&lab, &client_socket).expect("peer");
    let gw_before = status_json(&lab, Host::VpcGateway, &connector_socket)
        .tunnel
        .expect("tunnel")
        .peers;

    // Add the route, SIGHUP: usable within seconds, same connection on both ends.
    std::fs::write(&cc, &full).expect("write config");
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping(addr::VPC_HOST) {
        assert!(
            Instant::now() < deadline,
            "the new route is not usable 5 s after SIGHUP; connector log:\n{}",
            connector.log()
        );
    }
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    let after = client_peer(&lab, &client_socket).expect("peer");
    assert_eq!(
        (after.connection_id, after.connected_since),
        (before.connection_id, before.connected_since),
        "the tunnel was re-established"
    );
    let gw = status_json(&lab, Host::VpcGateway, &connector_socket);
    let gw_after = gw.tunnel.expect("tunnel").peers;
    assert_eq!(
        gw_after
            .iter()
            .map(|p| (p.connection_id, p.connected_since))
            .collect::<Vec<_>>(),
        gw_before
            .iter()
            .map(|p| (p.connection_id, p.connected_since))
            .collect::<Vec<_>>()
    );
    let reload = gw.last_reload.expect("a reload is reported");
    assert!(reload.ok && reload.message.contains("route"), "{reload:?}");
    let client_routes = status_json(&lab, Host::Operator, &client_socket).routes;
    assert!(
        client_routes.iter().any(|r| r.cidr == addr::VPC_CIDR),
        "the client's classifier learned it too: {client_routes:?}"
    );

    // A change that needs a restart is refused whole, and says so; nothing else moves.
    std::fs::write(
        &cc,
        full.replace("0.0.0.0:7844", "0.0.0.0:7845")
            .replace(&v4_route, ""),
    )
    .expect("write config");
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let r = status_json(&lab, Host::VpcGateway, &connector_socket).last_reload;
        if let Some(r) = r.filter(|r| !r.ok) {
            break r;
        }
        assert!(Instant::now() < deadline, "no refusal reported");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.message.contains("tunnel.listen") && refused.message.contains("restart"),
        "{refused:?}"
    );
    assert!(
        ping(addr::VPC_HOST),
        "the refused reload removed the route anyway"
    );
    let text = gatewayctl(
        &lab,
        Host::VpcGateway,
        &[
            "status",
            "--socket",
            connector_socket.to_str().expect("utf-8"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("REFUSED (running the previous config)"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // A policy change applies live too: ICMP withdrawn, ssh still allowed, same connection.
    let icmp_rule = "\"10.128.0.0/16 icmp\",";
    assert!(full.contains(icmp_rule));
    std::fs::write(&cc, full.replace(icmp_rule, "")).expect("write config");
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ping(addr::VPC_HOST) {
        assert!(
            Instant::now() < deadline,
            "ICMP still allowed after the reload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    let gw = status_json(&lab, Host::VpcGateway, &connector_socket);
    let reload = gw.last_reload.expect("reload");
    assert!(reload.ok && reload.message.contains("policy"), "{reload:?}");
    let peers = gw.tunnel.expect("tunnel").peers;
    assert!(peers[0].policy_drops >= 1, "{peers:?}");
    assert_eq!(
        (peers[0].connection_id, peers[0].connected_since),
        (gw_before[0].connection_id, gw_before[0].connected_since)
    );

    // And a zone change: on_servfail = "return" makes the primary's SERVFAIL the answer.
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    assert_eq!(
        dig(&lab, &["+short", &broken]).trim(),
        zone::BROKEN_ANSWER,
        "failover to the secondary before the reload"
    );
    std::fs::write(
        &cc,
        full.replace(icmp_rule, "")
            .replace("on_servfail = \"failover\"", "on_servfail = \"return\""),
    )
    .expect("write config");
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dig(&lab, &[&broken]).contains("status: SERVFAIL") {
        assert!(Instant::now() < deadline, "the zone change did not apply");
    }
    let reload = status_json(&lab, Host::VpcGateway, &connector_socket)
        .last_reload
        .expect("reload");
    assert!(
        reload.ok && reload.message.contains("DNS zones"),
        "{reload:?}"
    );
    assert_eq!(
        client_peer(&lab, &client_socket).map(|p| p.connection_id),
        Some(before.connection_id)
    );

    // Withdrawing a route removes it from the client too, still on the same connection.
    std::fs::write(&cc, full.replace(&v4_route, "")).expect("write config");
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let routes = lab
            .run_ok(Host::Operator, &["ip", "route", "show", addr::VPC_CIDR])
            .expect("ip route");
        if routes.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "route still there: {routes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ping(addr::VPC_HOST_V6), "the remaining route still works");
    assert_eq!(
        client_peer(&lab, &client_socket).map(|p| p.connection_id),
        Some(before.connection_id)
    );

    // Status asks the kernel for the firewall table rather than assuming it is there.
    let firewall = || {
        status_json(&lab, Host::VpcGateway, &connector_socket)
            .tunnel
            .expect("tunnel")
            .firewall
            .expect("a connector with [egress] reports its table")
    };
    let f = firewall();
    assert!(
        f.contains("gateway_lab_gw present") && f.contains("udp/7844, tcp/7844"),
        "{f}"
    );
    lab.run_ok(
        Host::VpcGateway,
        &["nft", "delete", "table", "inet", "gateway_lab_gw"],
    )
    .expect("delete the table behind the daemon's back");
    assert!(firewall().contains("MISSING"), "{}", firewall());
}
