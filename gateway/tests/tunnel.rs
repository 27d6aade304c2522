//! Through the tunnel only: the lab's underlay has no route to the VPC, so everything that
//! reaches a VPC host from the operator host went through gatewayd's QUIC datagrams.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use gateway::api::AttachKind;
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
advertise = ["192.0.2.0/24", "2001:db8:2::/64"]
"#;

fn pki(lab: &Lab, names: &[&str]) -> PathBuf {
    let dir = lab.dir().join("pki");
    let d = dir.to_str().expect("utf-8");
    let out = gatewayctl(lab, Host::Operator, &["pki", "init", "--dir", d]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    for n in names {
        // lab-gw serves clients: it needs the connector profile (ServerAuth).
        let profile = if *n == "lab-gw" {
            "connector"
        } else {
            "client"
        };
        let out = gatewayctl(
            lab,
            Host::Operator,
            &["pki", "issue", n, "--dir", d, "--profile", profile],
        );
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

fn connector_config(lab: &Lab, pki: &std::path::Path, on_servfail: &str) -> PathBuf {
    let zone = format!(
        "[[dns.zone]]\ndomain = \"{}\"\nservers = [\"{}\", \"{}\"]\non_servfail = \"{on_servfail}\"\n",
        zone::DOMAIN,
        addr::RESOLVER_PRIMARY,
        addr::RESOLVER_SECONDARY,
    );
    write_config(
        lab,
        "lab-gw",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\n\n[[route]]\ncidr = \"{}\"\n{POLICY}\n{zone}\n\
             [icmp]\nmanage_ping_group_range = true\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
            tls(pki, "lab-gw"),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6
        ),
    )
}

/// The operator host's client; as a site gateway it also steers its office LAN.
fn client_config(lab: &Lab, pki: &std::path::Path, name: &str, site: bool) -> PathBuf {
    client_config_attach(lab, pki, name, site, None)
}

/// [`client_config`] with `[dataplane] attach` set ("tc": legacy TC on a clsact qdisc).
fn client_config_attach(
    lab: &Lab,
    pki: &std::path::Path,
    name: &str,
    site: bool,
    attach: Option<&str>,
) -> PathBuf {
    let lan = if site {
        "lan = [\"lan0\"]\nadvertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n"
    } else {
        ""
    };
    write_config_attach(
        lab,
        name,
        &[],
        attach,
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\nsource_port = 7844\n\
             tun = \"optun\"\n\n{}\n[icmp]\nmanage_ping_group_range = true\n[metrics]\nlisten = \"127.0.0.1:9469\"\n[client]\ndns_stub = \"127.0.0.53:53\"\ndns_intercept = [\"wan0\"]\n{lan}",
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
    start_with(false)
}

fn start_with(site: bool) -> TunnelLab {
    start_wrapped(site, &[])
}

fn start_servfail(on_servfail: &str) -> TunnelLab {
    start_full(false, &[], on_servfail)
}

/// `wrapper` goes in front of gatewayd on both ends (e.g. setpriv with fewer capabilities).
fn start_wrapped(site: bool, wrapper: &[&str]) -> TunnelLab {
    start_full(site, wrapper, "failover")
}

fn start_full(site: bool, wrapper: &[&str], on_servfail: &str) -> TunnelLab {
    start_owned(site, wrapper, on_servfail, None)
}

/// `owner`: the user both daemons run as; the lab directory (for sockets and state) and the
/// certificates are made theirs.
fn start_owned(site: bool, wrapper: &[&str], on_servfail: &str, owner: Option<&str>) -> TunnelLab {
    start_attached(site, wrapper, on_servfail, owner, None)
}

/// [`start_owned`] with the client's `[dataplane] attach` set.
fn start_attached(
    site: bool,
    wrapper: &[&str],
    on_servfail: &str,
    owner: Option<&str>,
    attach: Option<&str>,
) -> TunnelLab {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = pki(&lab, &["lab-gw", "ops-alice"]);
    if let Some(owner) = owner {
        for (recursive, path) in [(false, lab.dir()), (true, pki.as_path())] {
            let mut cmd = std::process::Command::new("chown");
            if recursive {
                cmd.arg("-R");
            }
            let out = cmd.arg(owner).arg(path).output().expect("chown");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let cc = connector_config(&lab, &pki, on_servfail);
    let connector_socket = socket_path(&lab, "lab-gw");
    let argv = |config: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = wrapper.iter().map(|w| w.to_string()).collect();
        v.extend([
            GATEWAYD.to_string(),
            "--config".into(),
            config.display().to_string(),
        ]);
        v
    };
    let cargv = argv(&cc);
    let cargv: Vec<&str> = cargv.iter().map(String::as_str).collect();
    let connector = start_daemon_argv(
        &lab,
        Host::VpcGateway,
        &cargv,
        &connector_socket,
        "connector.log",
    );
    let oc = client_config_attach(&lab, &pki, "ops-alice", site, attach);
    let client_socket = socket_path(&lab, "ops-alice");
    let oargv = argv(&oc);
    let oargv: Vec<&str> = oargv.iter().map(String::as_str).collect();
    let client = start_daemon_argv(&lab, Host::Operator, &oargv, &client_socket, "client.log");
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

/// ping (IPv4 and IPv6), dig at the primary resolver and iperf3 both ways, from `host`.
fn reaches_the_vpc(lab: &Lab, host: Host) {
    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(host, &["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
            .unwrap_or_else(|e| panic!("ping {target} from {host:?}: {e:#}"));
    }
    let at = format!("@{}", addr::RESOLVER_PRIMARY);
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(host, &["dig", "+short", "+time=2", &at, &db])
        .expect("dig");
    assert_eq!(out.trim(), zone::DB_PRIVATE, "{host:?}");
    for reverse in [false, true] {
        let mut argv = vec!["iperf3", "-c", addr::VPC_HOST, "-t", "1"];
        if reverse {
            argv.push("-R");
        }
        lab.run_ok(host, &argv)
            .unwrap_or_else(|e| panic!("iperf3 (reverse: {reverse}) from {host:?}: {e:#}"));
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

fn office_host_reaches_the_vpc(t: &TunnelLab, mode: AttachKind) {
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

fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut argv = vec!["dig", "@127.0.0.53", "+time=5", "+tries=1"];
    argv.extend_from_slice(args);
    let out = lab.run(Host::Operator, &argv).expect("dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn resolver_log(lab: &Lab, which: &str) -> String {
    std::fs::read_to_string(lab.dir().join(format!("unbound-{which}/unbound.log")))
        .unwrap_or_default()
}

#[test]
fn private_zone_resolves_through_the_tunnel_with_failover_and_tcp_retry() {
    let t = start();
    let lab = &t.lab;
    let db = format!("db.{}", zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &db]).trim(), zone::DB_PRIVATE);
    // Outside the zone: refused by the stub, never sent to the private resolvers.
    assert!(dig(lab, &["www.example.com"]).contains("status: REFUSED"));
    for which in ["primary", "secondary"] {
        assert!(
            !resolver_log(lab, which).contains("www.example.com"),
            "{which} saw it"
        );
    }
    // SERVFAIL from the primary: the secondary answers (the default, stub-resolver semantics).
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &broken]).trim(), zone::BROKEN_ANSWER);
    // Over 2 KB: the forwarder retried over TCP and the whole answer came through.
    let big = format!("{}.{}", zone::BIG, zone::DOMAIN);
    let out = dig(lab, &["+short", "+bufsize=4096", &big, "TXT"]);
    assert_eq!(out.lines().count(), 12, "{out}");

    // The primary stops: answers come from the secondary within 3 s, then without waiting.
    let conf = lab.dir().join("unbound-primary/unbound.conf");
    lab.run(Host::Vpc, &["pkill", "-f", conf.to_str().expect("utf-8")])
        .expect("pkill");
    let which = format!("which.{}", zone::DOMAIN);
    let started = Instant::now();
    assert_eq!(dig(lab, &["+short", &which, "TXT"]).trim(), "\"secondary\"");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(dig(lab, &["+short", &which, "TXT"]).trim(), "\"secondary\"");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a later query waited for the primary: {:?}",
        started.elapsed()
    );
    let status = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let z = &status.tunnel.expect("tunnel").zones[0];
    assert_eq!(z.domain, zone::DOMAIN);
    assert!(!z.resolvers[0].up && z.resolvers[1].up, "{z:?}");
    assert!(
        z.failovers >= 2 && z.queries == 5 && z.answers == 5,
        "{z:?}"
    );
}

/// Queries sent to the hosts' normal resolver (the public one in the underlay): names under the
/// private zone are steered by eBPF into the tunnel and answered by the VPC's resolvers, as if
/// from the resolver asked; every other name goes to the normal resolver, untouched.
#[test]
fn private_names_sent_to_the_normal_resolver_are_answered_privately() {
    private_names_are_answered_privately(&start_with(true), AttachKind::Tcx);
}

fn private_names_are_answered_privately(t: &TunnelLab, mode: AttachKind) {
    let lab = &t.lab;
    let db = format!("db.{}", zone::DOMAIN);
    for host in [Host::Operator, Host::Office] {
        let out = lab
            .run_ok(host, &["dig", "+time=3", "+tries=1", &db])
            .expect("dig via resolv.conf");
        assert!(
            out.contains(&format!("SERVER: {}#53", addr::PUBLIC_DNS)),
            "{out}"
        );
        let answer: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&db))
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(answer, [zone::DB_PRIVATE], "{host:?}: {out}");
        let out = lab
            .run_ok(
                host,
                &["dig", "+short", "+time=3", "+tries=1", "www.example.com"],
            )
            .expect("dig");
        assert_eq!(out.trim(), zone::WWW_EXAMPLE, "{host:?}");
    }
    for which in ["primary", "secondary"] {
        assert!(
            !resolver_log(lab, which).contains("www.example.com"),
            "{which} saw it"
        );
    }
    let public =
        std::fs::read_to_string(lab.dir().join("unbound-public/unbound.log")).unwrap_or_default();
    assert!(
        !public.contains("db.hoge-vpc.com"),
        "the private name leaked to the public resolver"
    );
    let status = status_json(lab, Host::Operator, &t.client_socket);
    assert!(
        status.classifier.get("dns_steered").copied().unwrap_or(0) >= 2,
        "{:?}",
        status.classifier
    );
    assert_eq!(attached_via(&status.dns_egress[0]), mode);
}

#[test]
fn on_servfail_return_gives_servfail_and_spares_the_secondary() {
    let t = start_servfail("return");
    let lab = &t.lab;
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    assert!(dig(lab, &[&broken]).contains("status: SERVFAIL"));
    assert!(resolver_log(lab, "primary").contains(&broken));
    assert!(
        !resolver_log(lab, "secondary").contains(&broken),
        "the secondary was asked"
    );
}

/// A sustained query load at the private zone through the stub: every query answered, none
/// lost, and the forwarder still on its small pinned socket pool.
#[test]
fn sustained_dns_load_loses_no_query() {
    let t = start();
    let lab = &t.lab;
    let names: String = ["db", "ssh", "which"]
        .iter()
        .map(|n| format!("{n}.{} A\n", zone::DOMAIN))
        .collect();
    let file = lab.dir().join("queries.txt");
    std::fs::write(&file, names).expect("query file");
    let out = lab
        .run_ok(
            Host::Operator,
            &[
                "dnsperf",
                "-s",
                "127.0.0.53",
                "-d",
                file.to_str().expect("utf-8"),
                "-l",
                "4",
                "-Q",
                "2000",
            ],
        )
        .expect("dnsperf");
    let field = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in dnsperf output:\n{out}"))
    };
    let (sent, completed, lost) = (
        field("Queries sent"),
        field("Queries completed"),
        field("Queries lost"),
    );
    assert!(sent > 4000, "{out}");
    assert_eq!(lost, 0, "{out}");
    assert_eq!(completed, sent, "{out}");
    let status = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let z = &status.tunnel.expect("tunnel").zones[0];
    assert_eq!(z.servfails, 0, "{z:?}");
}

/// nftables for the underlay router: a stateless ACL on the connector's public address made
/// only from `firewall plan`'s rules (no connection tracking), everything else dropped.
fn acl_from_plan(rules: &[gateway::plan::FwRule]) -> String {
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
struct ConnectorOnly {
    lab: Lab,
    pki: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    daemon: Spawned,
}

/// `edit` may rewrite the connector's config before it starts.
fn connector_only(edit: impl FnOnce(&std::path::Path)) -> ConnectorOnly {
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
struct UdpBlocked<'a>(&'a Lab);

impl<'a> UdpBlocked<'a> {
    fn new(lab: &'a Lab) -> Self {
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

fn client_peer(lab: &Lab, socket: &std::path::Path) -> Option<gateway::api::PeerStatus> {
    let s = status_json(lab, Host::Operator, socket);
    let t = s.tunnel?;
    if !t.state.starts_with("connected") {
        return None;
    }
    t.peers.into_iter().next()
}

/// Waits until the client is connected (over `transport`, when given) and returns its peer;
/// fails the test if that takes more than `within` seconds from `since`.
fn wait_transport(
    lab: &Lab,
    socket: &std::path::Path,
    transport: Option<&str>,
    since: Instant,
    within: u64,
    client: &Spawned,
) -> gateway::api::PeerStatus {
    loop {
        if let Some(p) = client_peer(lab, socket)
            && transport.is_none_or(|t| p.transport == t)
        {
            eprintln!("connected over {} after {:?}", p.transport, since.elapsed());
            return p;
        }
        assert!(
            since.elapsed() < Duration::from_secs(within),
            "not connected over {transport:?} within {within} s; client log:\n{}",
            client.log()
        );
        std::thread::sleep(Duration::from_millis(50));
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
    let stop = lab.dir().join("stop-ticking");
    let remote = format!(
        "while [ ! -e {} ]; do echo tick; sleep 0.2; done; echo finished",
        stop.display()
    );
    let argv = lab.ssh_argv(addr::VPC_HOST, &remote);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut session = lab
        .spawn(Host::Operator, &argv, "long-ssh.log")
        .expect("ssh");
    let ticks = |s: &gateway_lab::Spawned| s.log().matches("tick").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks(&session) < 3 {
        assert!(Instant::now() < deadline, "ssh session never started");
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let before = ticks(&session);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks(&session) < before + 5 {
        assert!(
            Instant::now() < deadline,
            "the ssh session stalled after the move to QUIC:\n{}",
            session.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop, "").expect("stop file");
    let status = session
        .wait_timeout(Duration::from_secs(10))
        .expect("ssh ends");
    assert!(status.success(), "ssh: {status}\n{}", session.log());
    assert!(session.log().contains("finished"), "{}", session.log());
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

/// A non-root user's own copy of what `gatewayctl access` needs: its certificate and key, the
/// CA, a client config, the ssh key and the gatewayctl binary, all owned by `nobody`.
fn unprivileged_user_dir(lab: &Lab, pki: &std::path::Path) -> PathBuf {
    let dir = lab.dir().join("user");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["ca.pem", "ops-alice.pem", "ops-alice.key"] {
        std::fs::copy(pki.join(f), dir.join(f)).expect("copy pki");
    }
    std::fs::copy(GATEWAYCTL, dir.join("gatewayctl")).expect("copy gatewayctl");
    std::fs::copy(lab.ssh_key(), dir.join("id")).expect("copy ssh key");
    std::fs::write(
        dir.join("access.toml"),
        format!(
            "[node]\nname = \"alice-laptop\"\n\n[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\n\n{}",
            addr::GW_WAN,
            tls(&dir, "ops-alice")
        ),
    )
    .expect("write access.toml");
    let out = std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup", dir.to_str().expect("utf-8")])
        .output()
        .expect("chown");
    assert!(out.status.success());
    dir
}

/// `argv` run in the operator namespace as `nobody`, with no capabilities at all.
fn as_nobody(lab: &Lab, user: &std::path::Path, argv: &[&str]) -> std::process::Output {
    let home = format!("HOME={}", user.display());
    let mut full = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "env",
        &home,
    ];
    full.extend_from_slice(argv);
    lab.run(Host::Operator, &full).expect("run as nobody")
}

fn user_ssh(user: &str, extra: &[&str], target: &str, cmd: &str) -> Vec<String> {
    let key = std::path::Path::new(user).join("id");
    let mut extra = extra.to_vec();
    extra.extend(["-o", "ConnectTimeout=10"]);
    gateway_lab::ssh_argv_with(&key, &extra, target, cmd)
}

#[test]
fn an_unprivileged_user_reaches_ssh_through_access_without_a_tunnel() {
    let ConnectorOnly {
        lab,
        pki,
        config: _,
        socket: connector_socket,
        daemon: _connector,
    } = connector_only(|_| {});
    let user = unprivileged_user_dir(&lab, &pki);
    let u = user.to_str().expect("utf-8");
    let config = format!("GATEWAY_CONFIG={u}/access.toml");
    // No TUN, no route: the operator host cannot reach the VPC by itself.
    let direct = lab
        .run(
            Host::Operator,
            &["ping", "-c", "1", "-W", "1", addr::VPC_HOST],
        )
        .expect("ping");
    assert!(
        !direct.status.success(),
        "the operator host has a path of its own"
    );

    // 1. ssh with the ProxyCommand, to a private name the connector resolves.
    let proxy = format!("ProxyCommand={u}/gatewayctl access ssh --hostname %h");
    let host = format!("ssh.{}", zone::DOMAIN);
    let argv = user_ssh(
        u,
        &["-o", &proxy],
        &host,
        "echo shell-$((6*7)) on $(hostname -I)",
    );
    let mut full = vec!["env", config.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = as_nobody(&lab, &user, &full);
    assert!(
        out.status.success(),
        "ssh via access failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("shell-42 on ") && said.contains(addr::VPC_HOST),
        "{said}"
    );
    // Through the tunnel's pinned egress range, like everything else from the connector.
    let sshd_log = std::fs::read_to_string(lab.dir().join("sshd.log")).unwrap_or_default();
    let from_gw: Vec<&str> = sshd_log
        .lines()
        .filter(|l| l.contains(&format!("from {} port 40", addr::GW_VPC)))
        .collect();
    assert!(!from_gw.is_empty(), "{sshd_log}");
    let status = status_json(&lab, Host::VpcGateway, &connector_socket)
        .tunnel
        .expect("tunnel");
    assert!(status.access_streams_total >= 1, "{status:?}");
    // The stream ends on the connector when ssh ends (an explicit close, not an idle timeout).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let t = status_json(&lab, Host::VpcGateway, &connector_socket)
            .tunnel
            .expect("tunnel");
        if t.access_streams_active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "stream still open: {t:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 2. A local forward: `access tcp`, then plain ssh to it.
    let forward = lab
        .spawn(
            Host::Operator,
            &[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                &format!("{u}/gatewayctl"),
                "access",
                "tcp",
                "--listen",
                "127.0.0.1:2222",
                "--to",
                &format!("{host}:22"),
                "--config",
                &format!("{u}/access.toml"),
            ],
            "access-tcp.log",
        )
        .expect("spawn access tcp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !forward.log().contains("forwarding") {
        assert!(Instant::now() < deadline, "{}", forward.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let argv = user_ssh(u, &["-p", "2222"], "127.0.0.1", "echo forwarded-$((6*7))");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = as_nobody(&lab, &user, &argv);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "forwarded-42",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        forward.log()
    );

    // 3. What the policy does not allow, and names outside the zones, are refused with why.
    for (host, port, why) in [
        (addr::VPC_HOST, "5432", "may not reach 10.128.0.10 tcp/5432"),
        ("db.example.org", "22", "not under this connector's zones"),
    ] {
        let out = as_nobody(
            &lab,
            &user,
            &[
                config.as_str(),
                &format!("{u}/gatewayctl"),
                "access",
                "ssh",
                "--hostname",
                host,
                "--port",
                port,
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{host}:{port}: {err}"
        );
    }

    // 4. Where UDP is dropped, access takes the TLS-over-TCP fallback by itself.
    let _blocked = UdpBlocked::new(&lab);
    let argv = user_ssh(u, &["-o", &proxy], &host, "echo over-tcp");
    let mut full = vec!["env", config.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = as_nobody(&lab, &user, &full);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over-tcp",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

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

/// Every counter the metrics endpoint shows agrees with `status --json`: read metrics, status,
/// metrics again, and the status value lies between the two reads (and traffic made it move).
fn assert_metrics_match(
    lab: &Lab,
    host: Host,
    socket: &std::path::Path,
    pairs: &dyn Fn(&gateway::api::Status) -> Vec<(String, u64)>,
) {
    let ns = lab.ns(host);
    let before = http_get_in_ns(&ns, "127.0.0.1:9469", "/metrics");
    let status = status_json(lab, host, socket);
    let after = http_get_in_ns(&ns, "127.0.0.1:9469", "/metrics");
    let expected = pairs(&status);
    assert!(!expected.is_empty());
    for (series, value) in expected {
        let lo = metric(&before, &series).unwrap_or_else(|| panic!("{series} missing:\n{before}"));
        let hi = metric(&after, &series).unwrap_or_else(|| panic!("{series} missing:\n{after}"));
        assert!(
            lo <= value as f64 && value as f64 <= hi,
            "{host:?} {series}: metrics {lo}..{hi}, status {value}"
        );
        assert!(value > 0, "{host:?} {series} never moved");
    }
}

#[test]
fn the_metrics_endpoint_serves_the_counters_status_shows() {
    let t = start_with(true);
    let lab = &t.lab;
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .expect("ping from the office");
    let db = format!("db.{}", zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &db]).trim(), zone::DB_PRIVATE);

    let peer_series = |s: &gateway::api::Status| -> Vec<(String, u64)> {
        let t = s.tunnel.as_ref().expect("tunnel");
        t.peers
            .iter()
            .flat_map(|p| {
                let l = format!(
                    "{{identity=\"{}\",transport=\"{}\"}}",
                    p.identity, p.transport
                );
                [
                    (format!("gateway_peer_tx_packets_total{l}"), p.tx_packets),
                    (format!("gateway_peer_rx_packets_total{l}"), p.rx_packets),
                    (format!("gateway_peer_tx_bytes_total{l}"), p.tx_bytes),
                    (format!("gateway_peer_rx_bytes_total{l}"), p.rx_bytes),
                ]
            })
            .collect()
    };
    // The client: its classifier's per-route counters (the office's traffic) and the peer.
    assert_metrics_match(lab, Host::Operator, &t.client_socket, &|s| {
        let mut v: Vec<(String, u64)> = s
            .routes
            .iter()
            .filter(|r| r.cidr == addr::VPC_CIDR)
            .map(|r| {
                (
                    format!(
                        "gateway_route_packets_total{{route=\"{}\",cidr=\"{}\"}}",
                        r.name, r.cidr
                    ),
                    r.packets,
                )
            })
            .collect();
        v.extend(peer_series(s));
        v
    });
    // The connector: its peer and the private zone's DNS counters.
    assert_metrics_match(lab, Host::VpcGateway, &t.connector_socket, &|s| {
        let mut v = peer_series(s);
        for z in &s.tunnel.as_ref().expect("tunnel").zones {
            v.push((
                format!("gateway_dns_queries_total{{zone=\"{}\"}}", z.domain),
                z.queries,
            ));
            v.push((
                format!("gateway_dns_answers_total{{zone=\"{}\"}}", z.domain),
                z.answers,
            ));
        }
        v
    });
}

/// Whitespace-separated cells of the first line of `text` that starts with `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{text}"))
        .split_whitespace()
        .collect()
}

#[test]
fn status_on_a_live_tunnel_shows_the_peer_its_transport_and_counters_that_move() {
    let t = start_with(true);
    let lab = &t.lab;
    let sock = t.client_socket.to_str().expect("utf-8");
    let human = || {
        let out = gatewayctl(lab, Host::Operator, &["status", "--socket", sock]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let before = human();
    assert!(
        !before.contains('\u{1b}'),
        "colour in piped output:\n{before}"
    );
    lab.run_ok(
        Host::Office,
        &["ping", "-c", "5", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .expect("ping");
    let after = human();
    // The peer row: identity, version (three words), remote, transport, then the counters.
    let peer = row(&after, "lab-gw");
    let version = format!("{} (protocol", env!("CARGO_PKG_VERSION"));
    assert_eq!(peer[1..3].join(" "), version, "{after}");
    assert_eq!(peer[4], format!("{}:7844", addr::GW_WAN), "{after}");
    assert_eq!(peer[5], "quic", "{after}");
    let tx = |text: &str| -> u64 {
        let r = row(text, "lab-gw");
        // TX PKTS/BYTES is the third cell from the end (TX, RX, POLICY DROPS).
        r[r.len() - 3]
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("TX cell in {r:?}"))
    };
    assert!(
        tx(&after) >= tx(&before) + 5,
        "before:\n{before}\nafter:\n{after}"
    );
    // The office's pings went through the classifier's route for the VPC.
    let route = |text: &str| -> u64 {
        row(text, addr::VPC_CIDR)[2]
            .parse()
            .unwrap_or_else(|_| panic!("{text}"))
    };
    assert!(route(&after) >= route(&before) + 5, "{after}");
    assert!(after.contains("tunnel: client on optun"), "{after}");
    assert!(
        after
            .lines()
            .next()
            .is_some_and(|l| l.contains("on node ops-alice, client")),
        "{after}"
    );

    // --json on both ends, with peers, zones, routes and programs, fits the documented schema.
    let client = status_validated(lab, Host::Operator, &t.client_socket);
    assert_eq!(client["tunnel"]["peers"][0]["transport"], "quic");
    let connector = status_validated(lab, Host::VpcGateway, &t.connector_socket);
    assert_eq!(connector["tunnel"]["zones"][0]["domain"], zone::DOMAIN);
    // Each end shows the release and protocol the other said (version skew is visible).
    let said = format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        gateway::core::control::PROTOCOL_VERSION
    );
    assert_eq!(client["tunnel"]["peers"][0]["version"], said.as_str());
    assert_eq!(connector["tunnel"]["peers"][0]["version"], said.as_str());

    // --watch redraws until interrupted; piped, snapshots are separated by a line.
    let mut watch = spawn_watch(lab, Host::Operator, sock, "watch.log");
    std::thread::sleep(Duration::from_millis(1500));
    watch.terminate().expect("SIGTERM");
    let _ = watch.wait_timeout(Duration::from_secs(5));
    let log = watch.log();
    assert!(
        log.matches("\n--- ").count() + usize::from(log.starts_with("--- ")) >= 3,
        "{log}"
    );
    assert!(log.matches("TRANSPORT").count() >= 3, "{log}");
}
