//! Through the tunnel only: the lab's underlay has no route to the VPC, so everything that
//! reaches a VPC host from the operator host went through gatewayd's QUIC datagrams.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr, zone};

struct TunnelLab {
    lab: Lab,
    connector: Spawned,
    client: Spawned,
    connector_socket: PathBuf,
    client_socket: PathBuf,
    pki: PathBuf,
}

const POLICY: &str = r#"
[[policy]]
identity = "ops-*"
allow = ["10.128.0.0/16 tcp/22", "10.128.0.0/16 tcp/5201", "10.128.0.0/16 icmp",
         "10.128.0.0/16 udp/53", "fd00:128::/64"]
"#;

fn pki(lab: &Lab, names: &[&str]) -> PathBuf {
    let dir = lab.dir().join("pki");
    let d = dir.to_str().expect("utf-8");
    let out = gatewayctl(lab, Host::Operator, &["pki", "init", "--dir", d]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    for n in names {
        let out = gatewayctl(lab, Host::Operator, &["pki", "issue", n, "--dir", d]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    dir
}

fn tls(pki: &std::path::Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
        pki.display()
    )
}

fn connector_config(lab: &Lab, pki: &std::path::Path) -> PathBuf {
    write_config(
        lab,
        "lab-gw",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [[route]]\ncidr = \"{}\"\n\n[[route]]\ncidr = \"{}\"\n{POLICY}",
            tls(pki, "lab-gw"),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6
        ),
    )
}

fn client_config(lab: &Lab, pki: &std::path::Path, name: &str) -> PathBuf {
    write_config(
        lab,
        name,
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\nsource_port = 7844\n\
             tun = \"optun\"\n\n{}",
            addr::GW_WAN,
            tls(pki, name)
        ),
    )
}

/// Waits (bounded) until the client's status says it is connected.
fn wait_connected(lab: &Lab, socket: &std::path::Path, within: Duration) -> gateway::api::Status {
    let deadline = Instant::now() + within;
    loop {
        let s = status_json(lab, Host::Operator, socket);
        if let Some(t) = &s.tunnel
            && t.state.starts_with("connected")
            && !t.peers.is_empty()
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "client not connected: {:?}",
            s.tunnel
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start() -> TunnelLab {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = pki(&lab, &["lab-gw", "ops-alice"]);
    let cc = connector_config(&lab, &pki);
    let connector_socket = socket_path(&lab, "lab-gw");
    let connector = start_daemon(
        &lab,
        Host::VpcGateway,
        &cc,
        &connector_socket,
        "connector.log",
    );
    let oc = client_config(&lab, &pki, "ops-alice");
    let client_socket = socket_path(&lab, "ops-alice");
    let client = start_daemon(&lab, Host::Operator, &oc, &client_socket, "client.log");
    wait_connected(&lab, &client_socket, Duration::from_secs(10));
    TunnelLab {
        lab,
        connector,
        client,
        connector_socket,
        client_socket,
        pki,
    }
}

fn ssh_ok(lab: &Lab, host: Host, target: &str) -> String {
    let argv = lab.ssh_argv(target, "echo tunnelled-$((6*7))");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.run_ok(host, &argv).expect("ssh").trim().to_string()
}

#[test]
fn ssh_ping_dns_and_iperf_from_the_operator_host_go_through_the_tunnel() {
    let t = start();
    let lab = &t.lab;

    assert_eq!(ssh_ok(lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(
            Host::Operator,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", target],
        )
        .expect("ping through the tunnel");
    }
    let at = format!("@{}", addr::RESOLVER_PRIMARY);
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(Host::Operator, &["dig", "+short", "+time=2", &at, &db])
        .expect("dig");
    assert_eq!(out.trim(), zone::DB_PRIVATE);
    for reverse in [false, true] {
        let mut argv = vec!["iperf3", "-c", addr::VPC_HOST, "-t", "1"];
        if reverse {
            argv.push("-R");
        }
        lab.run_ok(Host::Operator, &argv)
            .expect("iperf3 through the tunnel");
    }

    // Both ends account for it.
    let client = status_json(lab, Host::Operator, &t.client_socket);
    let peer = &client.tunnel.as_ref().expect("tunnel status").peers[0];
    assert_eq!(peer.identity, "lab-gw");
    assert_eq!(peer.transport, "quic");
    assert!(peer.tx_packets > 100 && peer.rx_packets > 100, "{peer:?}");
    let connector = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let tunnel = connector.tunnel.expect("tunnel status");
    assert_eq!(tunnel.role, "connector");
    assert_eq!(tunnel.peers[0].identity, "ops-alice");
    assert_eq!(tunnel.peers[0].policy_drops, 0);
    let _ = (&t.pki, &t.connector, &t.client);
}
