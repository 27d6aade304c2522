//! Who gets a session and how it lives: refusals, reconnects after a killed connector, a clean stop, the unit's capabilities, keepalives on a quiet tunnel.

use super::*;

#[test]
fn refuses_foreign_certificates_and_identities_without_policy_and_says_so() {
    let t = start();
    let lab = &t.lab;

    // A client certificate from another CA, on the TCP fallback: the handshake fails there too.
    let rogue = lab.dir().join("rogue");
    let r = rogue.to_str().expect("utf-8");
    assert!(
        gatewayctl(lab, Host::Operator, &["pki", "init", "--dir", r])
            .status
            .success()
    );
    assert!(
        gatewayctl(
            lab,
            Host::Operator,
            &["pki", "issue", "ops-eve", "--dir", r]
        )
        .status
        .success()
    );
    std::fs::copy(t.pki.join("ca.pem"), rogue.join("trusted-ca.pem")).expect("copy ca");
    let eve = write_config(
        lab,
        "ops-eve",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\ntun = \"evetun\"\ntransport = \"tcp\"\n\n\
             [tls]\nca = \"{r}/trusted-ca.pem\"\ncert = \"{r}/ops-eve.pem\"\nkey = \"{r}/ops-eve.key\"\n",
            addr::GW_WAN
        ),
    );
    let eve_socket = socket_path(lab, "ops-eve");
    let _eve = start_daemon(lab, Host::Operator, &eve, &eve_socket, "eve.log");

    // A certificate from the right CA for an identity no policy names.
    let d = t.pki.to_str().expect("utf-8");
    assert!(
        gatewayctl(
            lab,
            Host::Operator,
            &["pki", "issue", "dev-bob", "--dir", d]
        )
        .status
        .success()
    );
    let bob = write_config(
        lab,
        "dev-bob",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\ntun = \"bobtun\"\n\n{}",
            addr::GW_WAN,
            tls(&t.pki, "dev-bob")
        ),
    );
    let bob_socket = socket_path(lab, "dev-bob");
    let _bob = start_daemon(lab, Host::Operator, &bob, &bob_socket, "bob.log");

    let deadline = Instant::now() + Duration::from_secs(10);
    let refusals = loop {
        let s = status_json(lab, Host::VpcGateway, &t.connector_socket);
        let r = s.tunnel.expect("tunnel").refusals;
        let tls_refused = r
            .iter()
            .any(|x| x.identity.is_none() && x.reason.contains("TLS handshake (TCP) failed"));
        let bob_refused = r.iter().any(|x| {
            x.identity.as_deref() == Some("dev-bob") && x.reason.contains("no [[policy]]")
        });
        if tls_refused && bob_refused {
            break r;
        }
        assert!(Instant::now() < deadline, "refusals not reported: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!refusals.is_empty());
    let bob_status = status_json(lab, Host::Operator, &bob_socket)
        .tunnel
        .expect("tunnel");
    assert!(
        bob_status.state.contains("no [[policy]]"),
        "{}",
        bob_status.state
    );
    assert!(bob_status.peers.is_empty());
    let connector = status_json(lab, Host::VpcGateway, &t.connector_socket)
        .tunnel
        .expect("tunnel");
    let ids: Vec<_> = connector
        .peers
        .iter()
        .map(|p| p.identity.as_str())
        .collect();
    assert_eq!(ids, ["ops-alice"], "only the allowed client is a peer");

    // An allowed identity sending what its policy does not allow: dropped and counted.
    let out = lab
        .run(
            Host::Operator,
            &[
                "timeout",
                "2",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/10.128.0.10/80",
            ],
        )
        .expect("run");
    assert!(!out.status.success());
    let connector = status_json(lab, Host::VpcGateway, &t.connector_socket)
        .tunnel
        .expect("tunnel");
    assert!(
        connector.peers[0].policy_drops >= 1,
        "{:?}",
        connector.peers[0]
    );
    assert!(connector.drops.get("policy").copied().unwrap_or(0) >= 1);
}

#[test]
fn client_reconnects_by_itself_after_the_connector_is_killed_and_restarted() {
    let mut t = start();
    let lab = &t.lab;
    assert_eq!(ssh_ok(lab, Host::Operator, addr::VPC_HOST), "tunnelled-42");
    t.connector.kill().expect("SIGKILL connector");
    t.connector
        .wait_timeout(Duration::from_secs(5))
        .expect("connector died");
    let cc = lab.dir().join("lab-gw.toml");
    let restarted = Instant::now();
    let _connector = start_daemon(
        lab,
        Host::VpcGateway,
        &cc,
        &t.connector_socket,
        "connector2.log",
    );
    // ssh works again within 10 s of the restart, with no manual step.
    loop {
        let argv = lab.ssh_argv(addr::VPC_HOST, "echo back");
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = lab.run(Host::Operator, &argv).expect("ssh");
        if out.status.success() {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no ssh within 10 s of the restart; client log:\n{}",
            t.client.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stopping_both_daemons_leaves_no_tun_route_or_sysctl_behind() {
    let mut t = start();
    let lab = &t.lab;
    let forward_before = lab
        .run_ok(Host::VpcGateway, &["sysctl", "-n", "net.ipv4.ip_forward"])
        .expect("sysctl");
    let table = lab
        .run_ok(
            Host::VpcGateway,
            &["nft", "list", "table", "inet", "gateway_lab_gw"],
        )
        .expect("the connector's nftables table exists while it runs");
    // Its host-firewall part: the tunnel port (QUIC and the TCP fallback) and replies to the
    // pinned range, nothing more.
    assert!(table.contains("udp dport 7844"), "{table}");
    assert!(table.contains("tcp dport 7844"), "{table}");
    assert!(
        table.contains("40000") && table.contains("40999"),
        "{table}"
    );
    let input = table
        .split("chain input {")
        .nth(1)
        .and_then(|c| c.split('}').next())
        .unwrap_or_else(|| panic!("no input chain: {table}"));
    let accepts = input
        .lines()
        .filter(|l| l.trim_end().ends_with(" accept") && !l.contains("policy"))
        .count();
    assert_eq!(accepts, 4, "{table}");
    for (daemon, host, tun) in [
        (&mut t.client, Host::Operator, "optun"),
        (&mut t.connector, Host::VpcGateway, "gwtun"),
    ] {
        assert!(
            lab.run(host, &["ip", "link", "show", tun])
                .expect("ip")
                .status
                .success()
        );
        daemon.terminate().expect("SIGTERM");
        assert!(
            daemon
                .wait_timeout(Duration::from_secs(10))
                .expect("exit")
                .success(),
            "{}",
            daemon.log()
        );
        let out = lab.run(host, &["ip", "link", "show", tun]).expect("ip");
        assert!(!out.status.success(), "{tun} still exists");
    }
    let routes = lab
        .run_ok(Host::Operator, &["ip", "route", "show", addr::VPC_CIDR])
        .expect("ip route");
    assert!(routes.trim().is_empty(), "route left: {routes}");
    let routes6 = lab
        .run_ok(
            Host::Operator,
            &["ip", "-6", "route", "show", addr::VPC_CIDR_V6],
        )
        .expect("ip route");
    assert!(routes6.trim().is_empty(), "route left: {routes6}");
    let out = lab
        .run(
            Host::VpcGateway,
            &["nft", "list", "table", "inet", "gateway_lab_gw"],
        )
        .expect("nft");
    assert!(!out.status.success(), "nftables table left behind");
    let reserved = lab
        .run_ok(
            Host::VpcGateway,
            &["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"],
        )
        .expect("sysctl");
    assert!(
        !reserved.contains("40000"),
        "reservation left behind: {reserved}"
    );
    let forward_after = lab
        .run_ok(Host::VpcGateway, &["sysctl", "-n", "net.ipv4.ip_forward"])
        .expect("sysctl");
    assert_eq!(forward_before, forward_after);
}

/// The shipped unit's capability bounding set is enough for the whole tunnel, both roles.
#[test]
fn the_tunnel_runs_with_only_the_units_capabilities() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/gatewayd.service"
    ))
    .expect("unit");
    let caps = |key: &str| -> String {
        let caps: Vec<String> = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in the unit"))
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        format!("-all,{}", caps.join(","))
    };
    let (bounding, ambient) = (caps("CapabilityBoundingSet="), caps("AmbientCapabilities="));
    assert!(
        unit.contains("\nUser=gateway\n"),
        "the unit runs gatewayd as its own user"
    );
    // Debian's udev makes /dev/net/tun 0666; a machine without udev may have it 0600. So the
    // daemons see a 0666 node of their own, bind-mounted in a private mount namespace: the
    // host's device node is left as it is.
    let node = std::env::temp_dir().join(format!("gw-tun-node-{}", std::process::id()));
    let _ = std::fs::remove_file(&node);
    let out = std::process::Command::new("mknod")
        .args([node.to_str().expect("utf-8"), "c", "10", "200"])
        .output()
        .expect("mknod");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("chmod")
        .args(["0666", node.to_str().expect("utf-8")])
        .output()
        .expect("chmod");
    assert!(out.status.success());
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _node = RemoveOnDrop(node.clone());
    let mount = format!(
        "mount --bind {} /dev/net/tun && exec \"$@\"",
        node.display()
    );
    // As the unit runs it: not root, the unit's ambient capabilities and bounding set only.
    let t = start_owned(
        true,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &mount,
            "sh",
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--bounding-set",
            &bounding,
            "--inh-caps",
            &ambient,
            "--ambient-caps",
            &ambient,
        ],
        "failover",
        Some("nobody:nogroup"),
    );
    for (host, socket) in [
        (Host::VpcGateway, &t.connector_socket),
        (Host::Operator, &t.client_socket),
    ] {
        let pid = status_json(&t.lab, host, socket).pid;
        let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("proc status")
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .expect("Uid line");
        assert_eq!(uid, "65534", "{host:?} gatewayd is not running as nobody");
    }
    assert_eq!(ssh_ok(&t.lab, Host::Office, addr::VPC_HOST), "tunnelled-42");
    assert_eq!(
        ssh_ok(&t.lab, Host::Operator, addr::VPC_HOST),
        "tunnelled-42"
    );
}

/// With no traffic, control-stream keepalives (every 2 s, 3 unanswered = reconnect) keep the
/// same connection up: a connector that did not answer them would cause a reconnect here.
#[test]
fn a_quiet_tunnel_stays_on_one_connection() {
    let t = start();
    let before = status_json(&t.lab, Host::Operator, &t.client_socket)
        .tunnel
        .expect("tunnel");
    std::thread::sleep(Duration::from_secs(9));
    let after = status_json(&t.lab, Host::Operator, &t.client_socket)
        .tunnel
        .expect("tunnel");
    assert!(after.state.starts_with("connected"), "{}", after.state);
    assert_eq!(
        before.peers[0].connection_id,
        after.peers[0].connection_id,
        "the tunnel reconnected; client log:\n{}",
        t.client.log()
    );
    assert_eq!(
        before.peers[0].connected_since,
        after.peers[0].connected_since
    );
}
