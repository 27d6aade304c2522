//! Replicas (issue 13): two connectors of one group; SIGKILL the one serving a client and
//! its traffic is back on the other within 5 s, through the hub and with `connect = [a, b]`
//! straight to both. New sessions spread over the replicas.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::time::{Duration, Instant};

use common::*;
use gateway_lab::hub::addr as hub_addr;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr};
use setup::*;

/// The longest run of echo replies missing from ping's output, in seconds (5 a second).
fn longest_silence(ping_output: &str) -> f64 {
    let seqs: Vec<u64> = ping_output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let i = l.find("icmp_seq=")?;
            l[i + 9..].split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert!(seqs.len() > 10, "too few replies:\n{ping_output}");
    let gap = seqs
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(1);
    (gap.saturating_sub(1)) as f64 * 0.2
}

/// Starts a ping at 5/s for 15 s from the operator host, runs `kill` 3 s in, and returns the
/// longest silence.
fn silence_across(lab: &Lab, kill: impl FnOnce()) -> f64 {
    let mut ping = lab
        .spawn(
            Host::Operator,
            &[
                "ping",
                "-n",
                "-i",
                "0.2",
                "-c",
                "75",
                "-W",
                "1",
                addr::VPC_HOST,
            ],
            "ping-failover.log",
        )
        .expect("ping");
    std::thread::sleep(Duration::from_secs(3));
    kill();
    ping.wait_timeout(Duration::from_secs(40))
        .expect("ping ends");
    longest_silence(&ping.log())
}

/// A new ssh session; the client's routes may land a moment after it says "connected".
fn ssh_ok(lab: &Lab) {
    let argv = lab.ssh_argv(addr::VPC_HOST, "echo replica-ok");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match lab.run_ok(Host::Operator, &argv) {
            Ok(out) => return assert_eq!(out.trim(), "replica-ok"),
            Err(e) if Instant::now() < deadline && format!("{e:#}").contains("unreachable") => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("ssh: {e:#}"),
        }
    }
}

/// The connector serving the client now, by its status.
fn serving(lab: &Lab, socket: &std::path::Path) -> String {
    let s = pair::wait_connected(lab, socket, Duration::from_secs(10));
    s.tunnel.expect("tunnel").peers[0].identity.clone()
}

fn kill_named(connectors: &mut [(Host, Spawned, std::path::PathBuf)], lab: &Lab, name: &str) {
    let i = connectors
        .iter()
        .position(|(_, _, s)| *s == socket_path(lab, name))
        .expect("serving connector");
    connectors[i].1.kill().expect("SIGKILL");
}

#[test]
fn killing_the_serving_replica_moves_the_client_through_the_hub_within_5_s() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_connector(Host::VpcGateway2, GW_B, "");
    h.start_client("");
    ssh_ok(&h.lab);
    let first = serving(&h.lab, &h.client_socket);
    let other = if first == GW_A { GW_B } else { GW_A };
    let (lab, connectors) = (&h.lab, &mut h.connectors);
    let silence = silence_across(lab, || kill_named(connectors, lab, &first));
    assert!(silence <= 5.0, "{silence} s without replies\n{}", h.logs());
    assert_eq!(serving(&h.lab, &h.client_socket), other);
    ssh_ok(&h.lab);
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    let relay = hub.hub.expect("hub tables");
    assert_eq!(relay.connectors.len(), 1, "{relay:?}");
    assert_eq!(relay.connectors[0].identity, other);
    assert_eq!(relay.clients[0].connector, other);
    println!("through the hub: {silence:.1} s without replies");
}

#[test]
fn killing_the_serving_replica_moves_a_client_with_two_targets_within_5_s() {
    let mut lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    lab.add_hub().expect("topology");
    let pki = lab.dir().join("pki");
    let d = pki.to_str().expect("utf-8");
    for args in [
        vec!["pki", "init", "--dir", d],
        vec![
            "pki",
            "issue",
            GW_A,
            "--dir",
            d,
            "--profile",
            "connector",
            "--dns",
            GROUP,
        ],
        vec![
            "pki",
            "issue",
            GW_B,
            "--dir",
            d,
            "--profile",
            "connector",
            "--dns",
            GROUP,
        ],
        vec!["pki", "issue", CLIENT, "--dir", d],
    ] {
        let out = gatewayctl(&lab, Host::Operator, &args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let mut connectors = Vec::new();
    for (host, name) in [(Host::VpcGateway, GW_A), (Host::VpcGateway2, GW_B)] {
        let config = write_config(
            &lab,
            name,
            &[],
            &format!(
                "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
                 [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
                 [[route]]\ncidr = \"{}\"\n{POLICY}\n",
                tls(&pki, name),
                addr::VPC_CIDR,
            ),
        );
        let socket = socket_path(&lab, name);
        let daemon = start_daemon(&lab, host, &config, &socket, &format!("{name}.log"));
        pair::wait_listening(&lab, &socket, Duration::from_secs(10));
        connectors.push((host, daemon, socket));
    }
    let config = write_config(
        &lab,
        CLIENT,
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\", \"{}:7844\"]\nserver_name = \"{GROUP}\"\n\
             source_port = 7844\ntun = \"optun\"\n\n{}",
            addr::GW_WAN,
            hub_addr::GW2_WAN,
            tls(&pki, CLIENT)
        ),
    );
    let client_socket = socket_path(&lab, CLIENT);
    let client = start_daemon(&lab, Host::Operator, &config, &client_socket, "client.log");
    let first = serving(&lab, &client_socket);
    ssh_ok(&lab);
    assert_eq!(first, GW_A, "the first target first");
    let started = Instant::now();
    let silence = silence_across(&lab, || kill_named(&mut connectors, &lab, &first));
    assert!(
        silence <= 5.0,
        "{silence} s without replies\n{}",
        client.log()
    );
    assert_eq!(serving(&lab, &client_socket), GW_B);
    ssh_ok(&lab);
    println!(
        "direct: {silence:.1} s without replies ({:?} in all)",
        started.elapsed()
    );
}
