//! Reaching the VPC through the tunnel: ssh, ping, DNS and iperf3 from the operator host and the office behind it (with TCX and with legacy TC), and packets at the tunnel's MTU.

use super::*;

#[test]
fn ssh_ping_dns_and_iperf_from_the_operator_host_go_through_the_tunnel() {
    let t = start();
    let lab = &t.lab;

    assert_eq!(ssh_ok(lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    // The VPC host sees the connector's VPC address, from the pinned port range.
    let argv = lab.ssh_argv(addr::VPC_HOST, "echo $SSH_CLIENT");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let seen = lab.run_ok(Host::Operator, &argv).expect("ssh");
    let words: Vec<&str> = seen.split_whitespace().collect();
    assert_eq!(words.first(), Some(&addr::GW_VPC), "{seen}");
    let port: u16 = words
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("source port");
    assert!(
        (40000..=40999).contains(&port),
        "source port {port} outside 40000-40999"
    );
    reaches_the_vpc(lab, Host::Operator);

    // Both ends account for it.
    let client = status_json(lab, Host::Operator, &t.client_socket);
    let peer = &client.tunnel.as_ref().expect("tunnel status").peers[0];
    assert_eq!(peer.identity, "lab-gw");
    assert_eq!(peer.transport, "quic");
    assert!(peer.tx_packets > 100 && peer.rx_packets > 100, "{peer:?}");
    let connector = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let tunnel = connector.tunnel.expect("tunnel status");
    assert_eq!(tunnel.role, "connector");
    let ports = tunnel.egress_ports.as_deref().unwrap_or_default();
    assert!(
        ports.starts_with("40000-40999 (NAT and DNS; reserved"),
        "{ports}"
    );
    let reserved = lab
        .run_ok(
            Host::VpcGateway,
            &["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"],
        )
        .expect("sysctl");
    assert!(reserved.contains("40000-40999"), "{reserved}");
    assert_eq!(tunnel.peers[0].identity, "ops-alice");
    assert_eq!(tunnel.peers[0].policy_drops, 0);
    let _ = (&t.pki, &t.connector, &t.client);
}

#[test]
fn an_office_host_behind_the_site_gateway_reaches_the_vpc_through_the_tunnel() {
    office_host_reaches_the_vpc(&start_with(true), AttachKind::Tcx);
}

/// As on a kernel before 6.6: the client's programs attached as legacy TC filters on clsact
/// qdiscs pass the same office-LAN and DNS-steering checks as with TCX.
#[test]
fn with_legacy_tc_the_office_lan_and_private_dns_are_steered_as_with_tcx() {
    let t = start_attached(true, &[], "failover", None, Some("tc"));
    office_host_reaches_the_vpc(&t, AttachKind::Tc);
    private_names_are_answered_privately(&t, AttachKind::Tc);
    let out = t
        .lab
        .run_ok(
            Host::Operator,
            &["tc", "filter", "show", "dev", "wan0", "egress"],
        )
        .expect("tc filter show");
    assert!(out.contains("gw_dns_egress"), "{out}");
}

pub(crate) fn office_host_reaches_the_vpc(t: &TunnelLab, mode: AttachKind) {
    let lab = &t.lab;
    assert_eq!(ssh_ok(lab, Host::Office, addr::VPC_HOST), "tunnelled-42");
    reaches_the_vpc(lab, Host::Office);
    // Too big for one datagram, with DF: the office host is told the tunnel's MTU and its
    // next attempt is refused locally with that MTU, instead of vanishing.
    let big_ping = [
        "ping",
        "-M",
        "do",
        "-s",
        "1460",
        "-c",
        "1",
        "-W",
        "2",
        addr::VPC_HOST,
    ];
    let _ = lab.run(Host::Office, &big_ping).expect("ping");
    let out = lab.run(Host::Office, &big_ping).expect("ping");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mtu = status_json(lab, Host::Operator, &t.client_socket)
        .tunnel
        .expect("tunnel")
        .mtu;
    assert!(
        text.contains(&format!("mtu={mtu}")) || text.contains(&format!("mtu = {mtu}")),
        "{text}"
    );

    // The office's packets were steered by the classifier on lan0, not routed.
    let status = status_json(lab, Host::Operator, &t.client_socket);
    let redirected = status.classifier.get("redirected").copied().unwrap_or(0);
    assert!(
        redirected > 100,
        "classifier redirected {redirected}: {status:?}"
    );
    let vpc = status
        .routes
        .iter()
        .find(|r| r.cidr == addr::VPC_CIDR)
        .expect("learned route in status");
    assert!(vpc.packets > 100, "{vpc:?}");
    let lan = status
        .interfaces
        .iter()
        .find(|i| i.name == "lan0")
        .expect("lan0 in status");
    assert_eq!(attached_via(lan), mode);
}

#[test]
fn big_pings_and_a_bulk_scp_fit_the_tunnel_mtu() {
    let t = start();
    let lab = &t.lab;
    // Let MTU discovery settle; the TUN MTU follows it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_json(lab, Host::Operator, &t.client_socket)
        .tunnel
        .map(|s| s.mtu)
        .unwrap_or(0)
        < 1428
    {
        assert!(Instant::now() < deadline, "tunnel MTU stayed below 1428");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.run_ok(
        Host::Operator,
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            "1400",
            addr::VPC_HOST,
        ],
    )
    .expect("1400-byte ping");

    let src = lab.dir().join("bulk.bin");
    let dst = lab.dir().join("bulk.copy");
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write 20 MB");
    let mut argv = lab.ssh_argv(addr::VPC_HOST, "");
    argv.truncate(argv.len() - 2); // drop user@host and the command: scp takes its own
    argv[0] = "scp".into();
    argv.push("-q".into());
    argv.push(src.display().to_string());
    argv.push(format!("root@{}:{}", addr::VPC_HOST, dst.display()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.run_ok(Host::Operator, &argv)
        .expect("scp 20 MB through the tunnel");
    assert!(std::fs::read(&dst).expect("copy") == data, "copy differs");
}
