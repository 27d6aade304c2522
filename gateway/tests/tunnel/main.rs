//! Through the tunnel only: the lab's underlay has no route to the VPC, so everything that
//! reaches a VPC host from the operator host went through gatewayd's QUIC datagrams.

#[path = "../common/mod.rs"]
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

mod access;
mod dns;
mod fallback;
mod observe;
mod reach;
mod reload;
mod sessions;

// Helpers one group of tests shares with another.
#[allow(unused_imports)]
use access::*;
#[allow(unused_imports)]
use dns::*;
#[allow(unused_imports)]
use fallback::*;
#[allow(unused_imports)]
use observe::*;
#[allow(unused_imports)]
use reach::*;
#[allow(unused_imports)]
use reload::*;
#[allow(unused_imports)]
use sessions::*;
