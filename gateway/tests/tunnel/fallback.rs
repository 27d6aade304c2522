//! Restricted underlays: a stateless ACL built from `firewall plan`, and UDP blocked (the TLS-over-TCP fallback and the way back to QUIC).

use super::*;

/// nftables for the underlay router: a stateless ACL on the connector's public address made
/// only from `firewall plan`'s rules (no connection tracking), everything else dropped.
pub(crate) fn acl_from_plan(rules: &[gateway::plan::FwRule]) -> String {
    use gateway::plan::Direction;
    let gw = addr::GW_WAN;
    let ports = |p: Option<(u16, u16)>| match p {
        Some((a, b)) if a == b => format!("{a}"),
        Some((a, b)) => format!("{a}-{b}"),
        None => "0-65535".into(),
    };
    let mut lines = Vec::new();
    for r in rules {
        let peer = if r.peer.contains(':') {
            continue;
        } else {
            r.peer.clone()
        };
        let (here, there) = match r.direction {
            Direction::Inbound => ("daddr", "saddr"),
            Direction::Outbound => ("saddr", "daddr"),
        };
        let (local_dir, peer_dir) = match r.direction {
            Direction::Inbound => ("dport", "sport"),
            Direction::Outbound => ("sport", "dport"),
        };
        let l4 = match r.proto {
            "icmp" => "meta l4proto icmp".to_string(),
            p => format!(
                "{p} {local_dir} {} {p} {peer_dir} {}",
                ports(r.local_ports),
                ports(r.peer_ports)
            ),
        };
        lines.push(format!("    ip {here} {gw} ip {there} {peer} {l4} accept"));
    }
    format!(
        "table inet acl {{\n  chain forward_acl {{\n    type filter hook forward priority 0; policy accept;\n{}\n    \
         ip daddr {gw} drop\n    ip saddr {gw} drop\n    ip6 daddr {} drop\n    ip6 saddr {} drop\n  }}\n}}\n",
        lines.join("\n"),
        addr::GW_WAN_V6,
        addr::GW_WAN_V6
    )
}

#[test]
fn works_behind_a_stateless_acl_built_from_firewall_plan() {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = pki(&lab, &["lab-gw", "ops-alice", "ops-random"]);
    let cc = connector_config(&lab, &pki, "failover");
    let out = gatewayctl(
        &lab,
        Host::VpcGateway,
        &["firewall", "plan", "--config", cc.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("1024-65535"));
    let config = gateway::config::load(&cc).expect("config");
    let rules = gateway::plan::plan(&config).expect("plan");
    let acl = lab.dir().join("acl.nft");
    std::fs::write(&acl, acl_from_plan(&rules)).expect("write acl");
    lab.run_ok(Host::Underlay, &["nft", "-f", acl.to_str().expect("utf-8")])
        .expect("apply the ACL on the underlay router");

    let connector_socket = socket_path(&lab, "lab-gw");
    let _connector = start_daemon(
        &lab,
        Host::VpcGateway,
        &cc,
        &connector_socket,
        "connector.log",
    );

    // A client that does not pin its source port is stuck behind this ACL...
    let random = write_config(
        &lab,
        "ops-random",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\ntun = \"rndtun\"\n\n{}",
            addr::GW_WAN,
            tls(&pki, "ops-random")
        ),
    );
    let random_socket = socket_path(&lab, "ops-random");
    let mut random_client =
        start_daemon(&lab, Host::Operator, &random, &random_socket, "random.log");

    // ...and the one that pins it, as the plan says, gets through.
    let oc = client_config(&lab, &pki, "ops-alice", false);
    let client_socket = socket_path(&lab, "ops-alice");
    let _client = start_daemon(&lab, Host::Operator, &oc, &client_socket, "client.log");
    wait_connected(&lab, &client_socket, Duration::from_secs(10));
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    lab.run_ok(
        Host::Operator,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .expect("ping behind the ACL");
    let db = format!("db.{}", zone::DOMAIN);
    assert_eq!(dig(&lab, &["+short", &db]).trim(), zone::DB_PRIVATE);

    let stuck = status_json(&lab, Host::Operator, &random_socket)
        .tunnel
        .expect("tunnel");
    assert!(
        stuck.peers.is_empty(),
        "an unpinned client got through the ACL: {stuck:?}"
    );
    random_client.terminate().expect("SIGTERM");
    let _ = random_client.wait_timeout(Duration::from_secs(10));
}

/// A lab with only the connector running (the test starts its clients itself).
pub(crate) struct ConnectorOnly {
    pub(crate) lab: Lab,
    pub(crate) pki: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) daemon: Spawned,
}

/// `edit` may rewrite the connector's config before it starts.
pub(crate) fn connector_only(edit: impl FnOnce(&std::path::Path)) -> ConnectorOnly {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = pki(&lab, &["lab-gw", "ops-alice"]);
    let config = connector_config(&lab, &pki, "failover");
    edit(&config);
    let socket = socket_path(&lab, "lab-gw");
    let daemon = start_daemon(&lab, Host::VpcGateway, &config, &socket, "connector.log");
    ConnectorOnly {
        lab,
        pki,
        config,
        socket,
        daemon,
    }
}

/// The underlay router drops every forwarded UDP packet (QUIC included) while this lives.
pub(crate) struct UdpBlocked<'a>(&'a Lab);

impl<'a> UdpBlocked<'a> {
    pub(crate) fn new(lab: &'a Lab) -> Self {
        let rules = lab.dir().join("block-udp.nft");
        std::fs::write(
            &rules,
            "table inet block_udp {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             meta l4proto udp counter drop\n  }\n}\n",
        )
        .expect("write rules");
        lab.run_ok(
            Host::Underlay,
            &["nft", "-f", rules.to_str().expect("utf-8")],
        )
        .expect("block UDP in the underlay");
        UdpBlocked(lab)
    }

    fn lift(self) {}
}

impl Drop for UdpBlocked<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(
            Host::Underlay,
            &["nft", "delete", "table", "inet", "block_udp"],
        );
    }
}

#[test]
fn falls_back_to_tcp_when_udp_is_blocked_and_moves_back_to_quic_keeping_ssh() {
    let ConnectorOnly {
        lab,
        pki,
        config: _,
        socket: connector_socket,
        daemon: _connector,
    } = connector_only(|_| {});
    let blocked = UdpBlocked::new(&lab);

    // 1. A client started fresh while UDP is dropped is up on TCP within 5 s.
    let oc = client_config(&lab, &pki, "ops-alice", false);
    let client_socket = socket_path(&lab, "ops-alice");
    let started = Instant::now();
    let client = start_daemon(&lab, Host::Operator, &oc, &client_socket, "client.log");
    let peer = wait_transport(&lab, &client_socket, None, started, 5, &client);
    assert_eq!(peer.transport, "tcp", "{peer:?}");
    assert!(
        peer.transport_reason.contains("no QUIC handshake in 1.5 s"),
        "{peer:?}"
    );
    let rendered = gatewayctl(
        &lab,
        Host::Operator,
        &["status", "--socket", client_socket.to_str().expect("utf-8")],
    );
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.contains("tcp: no QUIC handshake in 1.5 s"),
        "{rendered}"
    );
    let on_connector = status_json(&lab, Host::VpcGateway, &connector_socket)
        .tunnel
        .expect("tunnel");
    assert_eq!(on_connector.peers.len(), 1, "{on_connector:?}");
    assert_eq!(on_connector.peers[0].transport, "tcp");

    // ssh, ping and dig (the host's normal resolver, steered into the tunnel, and the stub)
    // all work over TCP.
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(
            Host::Operator,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", target],
        )
        .unwrap_or_else(|e| panic!("ping {target} over TCP: {e:#}"));
    }
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(
            Host::Operator,
            &["dig", "+short", "+time=3", "+tries=1", &db],
        )
        .expect("dig via resolv.conf");
    assert_eq!(out.trim(), zone::DB_PRIVATE);
    assert_eq!(dig(&lab, &["+short", &db]).trim(), zone::DB_PRIVATE);
    let blocked_udp = lab
        .run_ok(
            Host::Underlay,
            &["nft", "list", "table", "inet", "block_udp"],
        )
        .expect("list");
    assert!(
        !blocked_udp.contains("packets 0 "),
        "the underlay dropped no UDP, so QUIC was never tried: {blocked_udp}"
    );

    // The daemons' own reachability probes are ICMP echo sockets (ping_group_range managed):
    // the connector pings its resolvers, the client the connector's public address, which
    // answers even while the tunnel's UDP is blocked.
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let zones = status_json(&lab, Host::VpcGateway, &connector_socket)
            .tunnel
            .expect("tunnel")
            .zones;
        let pinged = zones[0].resolvers.iter().all(|r| r.ping_ms.is_some());
        let peer_pinged = client_peer(&lab, &client_socket).is_some_and(|p| p.ping_ms.is_some());
        if pinged && peer_pinged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ICMP echo results: {zones:?} / {:?}",
            client_peer(&lab, &client_socket)
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // 2. An ssh session opened on TCP survives the move back to QUIC.
    let session = Ticking::start(&lab, Host::Operator, addr::VPC_HOST);
    blocked.lift();
    let lifted = Instant::now();
    let back = wait_transport(&lab, &client_socket, Some("quic"), lifted, 30, &client);
    assert_eq!(
        (back.address_v4.as_str(), back.address_v6.as_str()),
        (peer.address_v4.as_str(), peer.address_v6.as_str()),
        "the overlay addresses stay, so open sessions keep their endpoints"
    );
    let on_connector = status_json(&lab, Host::VpcGateway, &connector_socket)
        .tunnel
        .expect("tunnel");
    assert_eq!(on_connector.peers.len(), 1, "{on_connector:?}");
    assert_eq!(on_connector.peers[0].transport, "quic");
    // The session keeps ticking over QUIC, then ends by itself, cleanly.
    session.ticks_on(5, "the ssh session stalled after the move to QUIC");
    session.finish();
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");

    // 3. QUIC lost mid-session (UDP blocked again): the client is back on TCP by itself.
    let _blocked = UdpBlocked::new(&lab);
    wait_transport(
        &lab,
        &client_socket,
        Some("tcp"),
        Instant::now(),
        20,
        &client,
    );
    assert_eq!(ssh_ok(&lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
}
