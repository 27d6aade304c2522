//! Neither end of the tunnel is an open router: what the kernel forwards through a connector or
//! a site gateway is the tunnel's traffic as policy allows, and everything else is dropped and
//! counted — while ssh, ping, DNS, `gatewayctl access` and ICMP errors through the tunnel work.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, LabOptions, addr, zone};
use pair::{Listener, Pair, filter_drops, ssh, tcp_connect};

const NODE_EXPORTER: u16 = 9100;
const CLIENT_V4: &str = "100.64.0.2";
const CLIENT_V6: &str = "fd00:64::2";

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// ssh, ping (IPv4 and IPv6), DNS through the tunnel and through the connector's forwarder,
/// and ICMP errors coming back, all from the operator host.
fn the_tunnel_works(t: &Pair) {
    let lab = &t.lab;
    assert_eq!(
        ssh(
            lab,
            Host::Operator,
            addr::VPC_HOST,
            "echo tunnelled-$((6*7))"
        )
        .expect("ssh")
        .trim(),
        "tunnelled-42"
    );
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(
            Host::Operator,
            &["ping", "-c", "2", "-i", "0.2", "-W", "2", target],
        )
        .unwrap_or_else(|e| panic!("ping {target}: {e:#}"));
    }
    let db = format!("db.{}", zone::DOMAIN);
    for server in [addr::RESOLVER_PRIMARY, "127.0.0.53"] {
        let at = format!("@{server}");
        let out = lab
            .run_ok(Host::Operator, &["dig", "+short", "+time=2", &at, &db])
            .expect("dig");
        assert_eq!(out.trim(), zone::DB_PRIVATE, "dig {at}");
    }
    // Nothing listens on udp/53 at the ssh host: its port unreachable must come back through
    // the filter (related) for dig to hear "refused" instead of timing out. (A name outside
    // the private zone, which the client would answer through the forwarder.)
    let at = format!("@{}", addr::VPC_HOST);
    let out = lab
        .run(
            Host::Operator,
            &["dig", "+time=3", "+tries=1", &at, "nothing.example"],
        )
        .expect("dig");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connection refused"), "{text}");
}

#[test]
fn the_connector_forwards_only_the_tunnels_traffic_and_counts_the_rest() {
    let t = pair::start(pair::POLICY, pair::WORKSTATION);
    let lab = &t.lab;
    let (gw, gws) = (Host::VpcGateway, t.connector_socket.as_path());
    the_tunnel_works(&t);

    // `gatewayctl access` connects from the connector itself: not forwarded, still works.
    let proxy = format!(
        "ProxyCommand={GATEWAYCTL} access ssh --config {} --hostname %h --port %p",
        t.client_config.display()
    );
    let argv = gateway_lab::ssh_argv_with(
        lab.ssh_key(),
        &["-o", &proxy],
        addr::VPC_HOST,
        "echo via-access",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert_eq!(
        lab.run_ok(Host::Operator, &argv)
            .expect("ssh over access")
            .trim(),
        "via-access"
    );

    // 1. The underlay routes the VPC to the connector's public address: it reaches nothing.
    lab.run_ok(
        Host::Underlay,
        &["ip", "route", "add", addr::VPC_CIDR, "via", addr::GW_WAN],
    )
    .expect("route");
    lab.run_ok(
        Host::Underlay,
        &[
            "ip",
            "-6",
            "route",
            "add",
            addr::VPC_CIDR_V6,
            "via",
            addr::GW_WAN_V6,
        ],
    )
    .expect("route");
    let before = filter_drops(lab, gw, gws, "into_vpc");
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        let out = lab
            .run(
                Host::Underlay,
                &["ping", "-c", "2", "-i", "0.2", "-W", "1", target],
            )
            .expect("ping");
        assert!(
            !out.status.success(),
            "the underlay pinged {target} through the connector"
        );
    }
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        let r = tcp_connect(
            lab,
            Host::Underlay,
            None,
            sock(target, 22),
            Duration::from_secs(2),
        );
        assert!(r.is_err(), "the underlay reached sshd at {target}: {r:?}");
    }
    let into_vpc = filter_drops(lab, gw, gws, "into_vpc") - before;
    assert!(
        into_vpc >= 6,
        "4 pings and 2 SYNs at least, counted {into_vpc}"
    );

    // 2. A VPC host cannot connect to the client's overlay address, not even from port 22
    //    (which a stateless "allow tcp/22" would take for an answer).
    let v4 = Listener::start(
        lab,
        Host::Operator,
        sock(CLIENT_V4, NODE_EXPORTER),
        "exporter",
    );
    let v6 = Listener::start(
        lab,
        Host::Operator,
        sock(CLIENT_V6, NODE_EXPORTER),
        "exporter6",
    );
    let before = filter_drops(lab, gw, gws, "into_tunnel");
    let from_ssh_port = Some(sock(addr::RESOLVER_PRIMARY, 22));
    for (from, to) in [
        (None, sock(CLIENT_V4, NODE_EXPORTER)),
        (from_ssh_port, sock(CLIENT_V4, NODE_EXPORTER)),
        (None, sock(CLIENT_V6, NODE_EXPORTER)),
    ] {
        let r = tcp_connect(lab, Host::Vpc, from, to, Duration::from_secs(2));
        assert!(
            r.is_err(),
            "the VPC host connected from {from:?} to {to}: {r:?}"
        );
    }
    assert_eq!((v4.accepted(), v6.accepted()), (0, 0));
    let into_tunnel = filter_drops(lab, gw, gws, "into_tunnel") - before;
    assert!(into_tunnel >= 3, "3 SYNs at least, counted {into_tunnel}");

    // 3. With an explicit inbound rule (applied by SIGHUP), the same connections work...
    let text = std::fs::read_to_string(&t.connector_config).expect("config");
    let text = text.replace(
        "identity = \"ops-*\"\n",
        "identity = \"ops-*\"\ninbound = [\"10.128.0.0/16 tcp/9100\", \"fd00:128::/64 tcp/9100\"]\n",
    );
    std::fs::write(&t.connector_config, text).expect("write config");
    t.connector.signal(libc::SIGHUP).expect("SIGHUP");
    wait_reloaded(lab, gws);
    for to in [
        sock(CLIENT_V4, NODE_EXPORTER),
        sock(CLIENT_V6, NODE_EXPORTER),
    ] {
        let greeting = tcp_connect(lab, Host::Vpc, None, to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("inbound to {to}: {e}"));
        assert!(greeting.starts_with("exporter"), "{greeting}");
    }
    assert_eq!((v4.accepted(), v6.accepted()), (1, 1));
    let accepted = status_json(lab, gw, gws)
        .tunnel
        .and_then(|t| t.forward_filter)
        .map(|f| f.inbound_accepted)
        .unwrap_or(0);
    assert!(accepted >= 2, "inbound connections counted: {accepted}");
    // ...but to that port only.
    let r = tcp_connect(
        lab,
        Host::Vpc,
        None,
        sock(CLIENT_V4, NODE_EXPORTER + 1),
        Duration::from_secs(2),
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{r:?}"
    );

    // 4. The client cannot use the inbound rule's shape to open connections of its own: a SYN
    //    from port 9100 is not an answer to anything.
    drop((v4, v6));
    let before = filter_drops(lab, gw, gws, "from_tunnel");
    let r = tcp_connect(
        lab,
        Host::Operator,
        Some(sock(CLIENT_V4, NODE_EXPORTER)),
        sock(addr::VPC_HOST, 2222),
        Duration::from_secs(2),
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "reached the VPC host (refused means it answered): {r:?}"
    );
    assert!(filter_drops(lab, gw, gws, "from_tunnel") > before);

    the_tunnel_works(&t);
    // Status shows the filter, its counters as the kernel has them, within the schema.
    let out = gatewayctl(
        lab,
        gw,
        &["status", "--socket", gws.to_str().expect("utf-8")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("forward filter dropped") && text.contains("into_vpc"),
        "{text}"
    );
    status_validated(lab, gw, gws);
}

fn wait_reloaded(lab: &Lab, socket: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_json(lab, Host::VpcGateway, socket);
        if let Some(r) = &s.last_reload {
            assert!(r.ok, "reload refused: {}", r.message);
            return;
        }
        assert!(Instant::now() < deadline, "no reload within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_site_gateway_forwards_only_between_its_lan_and_the_tunnel() {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    // The operator host is no router until gatewayd makes it one.
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        lab.run_ok(Host::Operator, &["sysctl", "-q", "-w", &format!("{key}=0")])
            .expect("sysctl");
    }
    let mut t = pair::start_in(lab, pair::POLICY, pair::SITE);
    let lab = &t.lab;
    let (op, ops) = (Host::Operator, t.client_socket.clone());

    // The office reaches the VPC through the tunnel (its replies are forwarded TUN -> LAN).
    assert_eq!(
        ssh(lab, Host::Office, addr::VPC_HOST, "echo office-$((6*7))")
            .expect("ssh from the office")
            .trim(),
        "office-42"
    );
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST_V6],
    )
    .expect("ping6 from the office");

    // The underlay cannot use the site gateway to reach the office LAN...
    let before = filter_drops(lab, op, &ops, "other");
    for target in [addr::OFFICE, addr::OFFICE_V6] {
        let out = lab
            .run(
                Host::Underlay,
                &["ping", "-c", "2", "-i", "0.2", "-W", "1", target],
            )
            .expect("ping");
        assert!(
            !out.status.success(),
            "the underlay reached {target} through the site gateway"
        );
    }
    assert!(filter_drops(lab, op, &ops, "other") >= before + 4);

    // ...nor to send into the tunnel.
    lab.run_ok(
        Host::Underlay,
        &["ip", "route", "add", addr::VPC_CIDR, "via", addr::OP_WAN],
    )
    .expect("route");
    let before = filter_drops(lab, op, &ops, "into_tunnel");
    let out = lab
        .run(
            Host::Underlay,
            &["ping", "-c", "2", "-i", "0.2", "-W", "1", addr::VPC_HOST],
        )
        .expect("ping");
    assert!(
        !out.status.success(),
        "the underlay reached the VPC through the site gateway"
    );
    assert!(filter_drops(lab, op, &ops, "into_tunnel") >= before + 2);
    status_validated(lab, op, &ops);

    // Stopping takes the table away and forwarding back off.
    stop_cleanly(&mut t.client);
    let tables = lab.run_ok(op, &["nft", "list", "tables"]).expect("nft");
    assert!(!tables.contains("gateway_ops_alice"), "{tables}");
    let forward = lab
        .run_ok(op, &["sysctl", "-n", "net.ipv4.ip_forward"])
        .expect("sysctl");
    assert_eq!(forward.trim(), "0");
}

#[test]
fn a_routed_site_gateway_forwards_its_advertised_lan_and_nothing_spoofed() {
    // No eBPF steering: the office's traffic to the VPC is forwarded by the kernel, LAN -> TUN.
    let t = pair::start(pair::POLICY, pair::ROUTED_SITE);
    let lab = &t.lab;
    let (op, ops) = (Host::Operator, t.client_socket.clone());
    assert_eq!(
        ssh(lab, Host::Office, addr::VPC_HOST, "echo routed-$((6*7))")
            .expect("ssh from the office")
            .trim(),
        "routed-42"
    );
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST_V6],
    )
    .expect("ping6 from the office");

    // The underlay sends with an office source address towards the VPC through the site
    // gateway: the source is not routed back where it came from, so it never enters the tunnel.
    lab.run_ok(
        Host::Underlay,
        &["ip", "addr", "add", "192.0.2.77/32", "dev", "lo"],
    )
    .expect("addr");
    lab.run_ok(
        Host::Underlay,
        &["ip", "route", "add", addr::VPC_CIDR, "via", addr::OP_WAN],
    )
    .expect("route");
    let before = filter_drops(lab, op, &ops, "into_tunnel");
    let _ = lab.run(
        Host::Underlay,
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "192.0.2.77",
            addr::VPC_HOST,
        ],
    );
    assert!(
        filter_drops(lab, op, &ops, "into_tunnel") >= before + 3,
        "spoofed LAN sources from the underlay were not dropped"
    );
}
