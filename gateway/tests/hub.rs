//! A connector with no public address: connectors dial out to a hub, clients reach the VPC
//! through it, end to end encrypted (issue 13). Every test runs in the hub lab
//! (`gateway_lab::hub`), where both VPC gateways drop every inbound connection attempt.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::time::Duration;

use common::*;
use gateway_lab::hub::addr as hub_addr;
use gateway_lab::{Host, Lab, addr, zone};
use setup::*;

/// ssh, ping (v4 and v6), dig through the host's normal resolver, and iperf3 both ways.
fn reaches_the_vpc(lab: &Lab, host: Host) {
    let argv = lab.ssh_argv(addr::VPC_HOST, "echo tunnelled-$((6*7))");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = lab
        .run_ok(host, &argv)
        .unwrap_or_else(|e| panic!("ssh from {host:?}: {e:#}"));
    assert_eq!(out.trim(), "tunnelled-42");
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(host, &["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
            .unwrap_or_else(|e| panic!("ping {target} from {host:?}: {e:#}"));
    }
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(host, &["dig", "+short", "+time=3", "+tries=2", &db])
        .expect("dig");
    assert_eq!(out.trim(), zone::DB_PRIVATE, "dig from {host:?}");
    for reverse in [false, true] {
        let mut argv = vec!["iperf3", "-c", addr::VPC_HOST, "-t", "1"];
        if reverse {
            argv.push("-R");
        }
        iperf(lab, host, &argv);
    }
}

/// iperf3 to the VPC host; again (bounded) while the server is still busy with the last run.
fn iperf(lab: &Lab, host: Host, argv: &[&str]) {
    for _ in 0..10 {
        match lab.run_ok(host, argv) {
            Ok(_) => return,
            Err(e) if format!("{e:#}").contains("server is busy") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("{argv:?} from {host:?}: {e:#}"),
        }
    }
    panic!("{argv:?} from {host:?}: the iperf3 server stayed busy");
}

/// Nothing reaches a connector directly: a TCP connect to its tunnel port and SSH port from
/// the operator host both fail, and its filter counted what it dropped.
fn connector_takes_no_inbound(lab: &Lab) {
    for port in [7844u16, 22] {
        let to = format!("{}:{port}", addr::GW_WAN).parse().expect("addr");
        let r = crate::pair::tcp_connect(lab, Host::Operator, None, to, Duration::from_secs(1));
        assert!(r.is_err(), "a connection to {to} got through: {r:?}");
    }
    assert!(lab.inbound_dropped(Host::VpcGateway).expect("counters") > 0);
}

#[test]
fn ssh_ping_dig_and_iperf_through_the_hub_over_quic_with_no_inbound_to_the_connector() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    let status = h.start_client("");
    let t = status.tunnel.expect("tunnel");
    assert_eq!(
        t.peers[0].identity, GW_A,
        "the peer is the connector, not the hub"
    );
    assert_eq!(t.peers[0].transport, "quic");
    assert_eq!(
        t.via_hub.as_deref(),
        Some(&*format!("{}:{}", hub_addr::HUB, hub_addr::PORT))
    );
    reaches_the_vpc(&h.lab, Host::Operator);
    reaches_the_vpc(&h.lab, Host::Office);
    connector_takes_no_inbound(&h.lab);

    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    assert_eq!(hub.role, "hub");
    let relay = hub.hub.expect("hub tables");
    assert_eq!(relay.connectors.len(), 1, "{relay:?}");
    assert_eq!(relay.connectors[0].identity, GW_A);
    assert_eq!(relay.connectors[0].group, GROUP);
    assert_eq!(relay.connectors[0].transport, "quic");
    assert_eq!(relay.clients.len(), 1, "{relay:?}");
    assert_eq!(relay.clients[0].identity, CLIENT);
    assert_eq!(relay.clients[0].connector, GW_A);
    assert!(relay.clients[0].bytes_relayed > 100_000, "{relay:?}");
    // Both ends' packets travel beside their outer QUIC links, as relayed UDP.
    assert!(
        relay.clients[0].relayed && relay.connectors[0].relayed,
        "{relay:?}"
    );
    let on_connector = status_json(&h.lab, Host::VpcGateway, &h.connectors[0].2)
        .tunnel
        .expect("tunnel");
    assert_eq!(on_connector.peers.len(), 1, "{on_connector:?}");
    assert_eq!(on_connector.peers[0].identity, CLIENT);
    // A relayed session shows the hub it came through, not its made-up address.
    assert!(
        on_connector.peers[0]
            .remote
            .starts_with(&format!("{} (hub, flow ", hub_target())),
        "{:?}",
        on_connector.peers[0].remote
    );

    // Both documented: the hub's tables and the client's hub fit docs/status.schema.json.
    let v = status_validated(&h.lab, Host::Hub, &h.hub_socket);
    assert_eq!(v["tunnel"]["hub"]["clients"][0]["identity"], CLIENT);
    let v = status_validated(&h.lab, Host::Operator, &h.client_socket);
    assert_eq!(v["tunnel"]["via_hub"], hub_target());

    // What an operator reads: the hub's tables, the client's connector and hub, and a plan
    // for the connector with nothing inbound.
    let text = |host, socket: &std::path::Path| {
        let out = gatewayctl(
            &h.lab,
            host,
            &["status", "--socket", socket.to_str().expect("utf-8")],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let on_hub = text(Host::Hub, &h.hub_socket);
    for want in [
        "CONNECTOR",
        "GROUP",
        "gw-a",
        "BYTES RELAYED",
        "ops-alice",
        "10.128.0.0/16",
    ] {
        assert!(on_hub.contains(want), "{want}:\n{on_hub}");
    }
    let on_client = text(Host::Operator, &h.client_socket);
    assert!(
        on_client.contains(&format!("through hub: {}", hub_target())),
        "{on_client}"
    );
    let config = h.lab.dir().join(format!("{GW_A}.toml"));
    let out = gatewayctl(
        &h.lab,
        Host::VpcGateway,
        &[
            "firewall",
            "plan",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(plan.contains(hub_addr::HUB), "{plan}");
}

#[test]
fn with_udp_blocked_everything_goes_over_tcp_through_the_hub() {
    let mut h = start_hub();
    // The underlay drops all UDP it forwards: both outer links must take TLS over TCP.
    let rules = h.lab.dir().join("block-udp.nft");
    std::fs::write(
        &rules,
        "table inet block_udp {\n  chain forward {\n    type filter hook forward priority 0; \
         policy accept;\n    meta l4proto udp counter drop\n  }\n}\n",
    )
    .expect("rules");
    h.lab
        .run_ok(
            Host::Underlay,
            &["nft", "-f", rules.to_str().expect("utf-8")],
        )
        .expect("block udp");
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_client("");
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    let relay = hub.hub.expect("hub tables");
    assert_eq!(relay.connectors[0].transport, "tcp", "{relay:?}");
    assert_eq!(relay.clients[0].transport, "tcp", "{relay:?}");
    assert!(
        !relay.clients[0].relayed && !relay.connectors[0].relayed,
        "no relayed UDP where UDP does not pass: {relay:?}"
    );
    // The client says what the network carries: TCP to the hub, though the session inside is
    // QUIC; and, as on a direct link, it looks for QUIC again.
    let client = status_json(&h.lab, Host::Operator, &h.client_socket)
        .tunnel
        .expect("tunnel");
    assert_eq!(client.peers[0].transport, "tcp", "{client:?}");
    assert!(client.state.contains("over TCP"), "{}", client.state);
    reaches_the_vpc(&h.lab, Host::Operator);
    reaches_the_vpc(&h.lab, Host::Office);
    connector_takes_no_inbound(&h.lab);

    // An ssh session open across both moves back to QUIC keeps going: same connector, same
    // overlay address, same NAT state.
    let session = Ticking::start(&h.lab, Host::Operator, addr::VPC_HOST);
    h.lab
        .run_ok(
            Host::Underlay,
            &["nft", "delete", "table", "inet", "block_udp"],
        )
        .expect("unblock udp");
    let back = wait_transport(
        &h.lab,
        &h.client_socket,
        Some("quic"),
        std::time::Instant::now(),
        20,
        h.client.as_ref().expect("client"),
    );
    let relay = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .and_then(|t| t.hub)
        .expect("hub tables");
    // The client's packets are relayed UDP again; the hub hands them to the connector over
    // its TLS link until that moves too (the mixed path, which the ticking ssh crosses).
    assert!(
        relay.clients.len() == 1
            && relay.clients[0].transport == "quic"
            && relay.clients[0].relayed,
        "{relay:?}"
    );
    assert_eq!(
        back.address_v4, client.peers[0].address_v4,
        "the overlay address stays"
    );
    // The connector's uplink moves back to QUIC too; the client's session moves with it.
    wait_hub(
        &h,
        Duration::from_secs(20),
        "the connector's uplink on QUIC",
        |t| {
            t.hub.as_ref().is_some_and(|r| {
                r.connectors.len() == 1
                    && r.connectors[0].transport == "quic"
                    && r.clients.len() == 1
            })
        },
    );
    let again = wait_transport(
        &h.lab,
        &h.client_socket,
        Some("quic"),
        std::time::Instant::now(),
        10,
        h.client.as_ref().expect("client"),
    );
    assert_eq!(
        again.address_v4, back.address_v4,
        "the overlay address stays"
    );
    session.ticks_on(5, "the ssh session stalled after the moves");
    session.finish();
    let argv = h.lab.ssh_argv(addr::VPC_HOST, "echo back-on-quic");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert_eq!(
        h.lab.run_ok(Host::Operator, &argv).expect("ssh").trim(),
        "back-on-quic"
    );
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_hub_sees_no_plaintext_and_holds_no_key_but_its_own() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_client("");
    // The hub's wire, and for contrast the connector's VPC side, where the same bytes are plain.
    let hub_pcap = h.lab.dir().join("hub.pcap");
    let tun_pcap = h.lab.dir().join("tun.pcap");
    let mut captures = Vec::new();
    for (host, iface, file) in [
        (Host::Hub, "any", &hub_pcap),
        (Host::VpcGateway, "vpc0", &tun_pcap),
    ] {
        let argv = [
            "tcpdump",
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
            file.to_str().expect("utf-8"),
        ];
        let log = format!("tcpdump-{iface}.log");
        let capture = h.lab.spawn(host, &argv, &log).expect("tcpdump");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !capture.log().contains("listening on") {
            assert!(
                std::time::Instant::now() < deadline,
                "tcpdump: {}",
                capture.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        captures.push(capture);
    }
    // The output is computed on the VPC host, so its text never travels as the command does.
    let argv = h
        .lab
        .ssh_argv(addr::VPC_HOST, "echo plain-$((6*7*1000))-text");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = h.lab.run_ok(Host::Operator, &argv).expect("ssh");
    assert_eq!(out.trim(), "plain-42000-text");
    // ssh encrypts its own output; a plain TCP greeting is sealed by the tunnel alone.
    let greeting_at = format!("{}:22", addr::RESOLVER_PRIMARY)
        .parse()
        .expect("addr");
    let _plain =
        crate::pair::Listener::start(&h.lab, Host::Vpc, greeting_at, "plain-greeting-4242");
    let line = crate::pair::tcp_connect(
        &h.lab,
        Host::Operator,
        None,
        greeting_at,
        Duration::from_secs(3),
    )
    .expect("plain TCP through the hub");
    assert_eq!(line, "plain-greeting-4242");
    let db = format!("db.{}", zone::DOMAIN);
    let answer = h
        .lab
        .run_ok(
            Host::Operator,
            &["dig", "+short", "+time=3", "+tries=2", &db],
        )
        .expect("dig");
    assert_eq!(answer.trim(), zone::DB_PRIVATE);
    std::thread::sleep(Duration::from_millis(300));
    for mut c in captures {
        c.signal(libc::SIGINT).expect("stop tcpdump");
        c.wait_timeout(Duration::from_secs(5))
            .expect("tcpdump exits");
    }
    let bytes = std::fs::read(&hub_pcap).expect("capture");
    let plain = std::fs::read(&tun_pcap).expect("capture");
    assert!(
        bytes.len() > 20_000,
        "the session went through the hub: {} bytes",
        bytes.len()
    );
    for clear in [b"hoge-vpc".as_slice(), b"plain-greeting-4242".as_slice()] {
        assert!(
            contains(&plain, clear),
            "the contrast capture misses {clear:?}"
        );
    }
    for plain in [
        b"plain-42000-text".as_slice(),
        b"plain-greeting-4242".as_slice(),
        b"hoge-vpc".as_slice(),
        b"\x02db\x08hoge-vpc\x03com".as_slice(),
        zone::DB_PRIVATE.as_bytes(),
    ] {
        assert!(
            !contains(&bytes, plain),
            "{:?} in the clear on the hub's wire",
            String::from_utf8_lossy(plain)
        );
    }

    // The hub's config names one key, its own, and it is no other node's.
    let config = std::fs::read_to_string(h.lab.dir().join(format!("{HUB}.toml"))).expect("config");
    let keys: Vec<&str> = config
        .lines()
        .filter(|l| l.trim_start().starts_with("key"))
        .collect();
    assert_eq!(keys.len(), 1, "{config}");
    assert!(keys[0].contains(&format!("{HUB}.key")), "{config}");
    let own = std::fs::read(h.pki.join(format!("{HUB}.key"))).expect("hub key");
    for other in [GW_A, GW_B, CLIENT, "ca"] {
        let theirs = std::fs::read(h.pki.join(format!("{other}.key"))).expect("key");
        assert_ne!(own, theirs, "{other}");
        assert!(!config.contains(&format!("{other}.key")), "{config}");
    }
}

#[test]
fn policy_holds_through_the_hub_and_a_foreign_ca_gets_no_relay() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");

    // A client whose certificate another CA signed (trusting ours, to get as far as it can).
    let other = h.lab.dir().join("other-pki");
    let d = other.to_str().expect("utf-8");
    for args in [
        vec!["pki", "init", "--dir", d],
        vec!["pki", "issue", "ops-mallory", "--dir", d],
    ] {
        let out = gatewayctl(&h.lab, Host::Operator, &args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let foreign = write_config(
        &h.lab,
        "ops-mallory",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}\"]\ngroup = \"{GROUP}\"\nsource_port = {}\ntun = \"mtun\"\n\n\
             [tls]\nca = \"{}/ca.pem\"\ncert = \"{d}/ops-mallory.pem\"\nkey = \"{d}/ops-mallory.key\"\n",
            hub_target(),
            hub_addr::PORT,
            h.pki.display()
        ),
    );
    let foreign_socket = socket_path(&h.lab, "ops-mallory");
    let mallory = start_daemon(
        &h.lab,
        Host::Operator,
        &foreign,
        &foreign_socket,
        "mallory.log",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
            .tunnel
            .expect("tunnel");
        if let Some(r) = hub
            .refusals
            .iter()
            .find(|r| r.reason.contains("TLS handshake"))
        {
            break (r.clone(), hub);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal on the hub: {hub:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused.0.remote.starts_with(addr::OP_WAN),
        "{:?}",
        refused.0
    );
    let relay = refused.1.hub.expect("hub tables");
    assert!(relay.clients.is_empty(), "{relay:?}");
    let m = status_json(&h.lab, Host::Operator, &foreign_socket)
        .tunnel
        .expect("tunnel");
    assert!(
        m.peers.is_empty() && !m.state.starts_with("connected"),
        "{m:?}"
    );
    let rendered = gatewayctl(
        &h.lab,
        Host::Hub,
        &["status", "--socket", h.hub_socket.to_str().expect("utf-8")],
    );
    assert!(
        String::from_utf8_lossy(&rendered.stdout).contains("TLS handshake"),
        "{rendered:?}"
    );
    mallory.terminate().expect("stop");
    drop(mallory);

    // Our client is relayed, and its policy is the connector's to enforce: ssh yes, a port
    // the policy does not list no.
    h.start_client("");
    let _web = crate::pair::Listener::start(
        &h.lab,
        Host::Vpc,
        format!("{}:8080", addr::VPC_HOST).parse().expect("addr"),
        "web",
    );
    let to = format!("{}:8080", addr::VPC_HOST).parse().expect("addr");
    let r = crate::pair::tcp_connect(&h.lab, Host::Operator, None, to, Duration::from_secs(2));
    assert!(r.is_err(), "tcp/8080 is not in the policy, yet: {r:?}");
    let argv = h.lab.ssh_argv(addr::VPC_HOST, "echo ok");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert_eq!(
        h.lab.run_ok(Host::Operator, &argv).expect("ssh").trim(),
        "ok"
    );
    let on_connector = status_json(&h.lab, Host::VpcGateway, &h.connectors[0].2)
        .tunnel
        .expect("tunnel");
    assert!(
        on_connector.peers[0].policy_drops > 0,
        "{:?}\n{}",
        on_connector.peers,
        h.logs()
    );
}
