//! Issue 10 from the outside: an authenticated or unauthenticated peer (a small hostile
//! client, `peer`, with a certificate from the lab's CA) tries to make the connector route
//! what it was not granted, freeze it through DNS, exhaust its memory and descriptors before
//! the hello, and break or forge its status; real clients (`ssh`, `ping`, `dig` through a real
//! gatewayd client) must not notice.

#[path = "../common/mod.rs"]
mod common;
mod peer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use gateway::tunnel::control::Control;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr, zone};
use peer::Target;

mod flood;
mod routes;
mod status;

/// A zone whose resolver is an address in the VPC where nothing answers.
pub const SILENT_ZONE: &str = "silent.test";
const SILENT_RESOLVER: &str = "10.128.0.200";
/// Identities: the real client, and hostile ones the policy knows (`ops-*`).
const IDENTITIES: &[&str] = &[
    "lab-gw",
    "ops-alice",
    "ops-mallory",
    "ops-m1",
    "ops-m2",
    "ops-m3",
];

pub struct Hostile {
    pub lab: Lab,
    pub connector: Spawned,
    pub client: Option<Spawned>,
    pub connector_socket: PathBuf,
    pub client_socket: PathBuf,
    pub pki: PathBuf,
}

fn tls(pki: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
        pki.display()
    )
}

/// The connector's config: the VPC routes, `extra_routes`, the private zone and the silent
/// one; `ops-*` may advertise the office LAN when `grant` says so.
pub fn connector_config(lab: &Lab, pki: &Path, grant: bool, extra_routes: &[&str]) -> PathBuf {
    let advertise = if grant {
        "advertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n"
    } else {
        ""
    };
    let routes: String = [addr::VPC_CIDR, addr::VPC_CIDR_V6]
        .iter()
        .chain(extra_routes)
        .map(|r| format!("[[route]]\ncidr = \"{r}\"\n"))
        .collect();
    write_config(
        lab,
        "lab-gw",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n{routes}\n\
             [[policy]]\nidentity = \"ops-*\"\n\
             allow = [\"10.128.0.0/16 tcp/22\", \"10.128.0.0/16 icmp\", \"10.128.0.0/16 udp/53\", \"fd00:128::/64\"]\n\
             {advertise}\n\
             [[dns.zone]]\ndomain = \"{}\"\nservers = [\"{}\", \"{}\"]\n\n\
             [[dns.zone]]\ndomain = \"{SILENT_ZONE}\"\nservers = [\"{SILENT_RESOLVER}\"]\n\n\
             [icmp]\nmanage_ping_group_range = true\n",
            tls(pki, "lab-gw"),
            zone::DOMAIN,
            addr::RESOLVER_PRIMARY,
            addr::RESOLVER_SECONDARY,
        ),
    )
}

fn client_config(lab: &Lab, pki: &Path, site: bool) -> PathBuf {
    let lan = if site {
        "lan = [\"lan0\"]\nadvertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n"
    } else {
        ""
    };
    write_config(
        lab,
        "ops-alice",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\nsource_port = 7844\n\
             tun = \"optun\"\n\n{}\n[icmp]\nmanage_ping_group_range = true\n\
             [client]\ndns_stub = \"127.0.0.53:53\"\n{lan}",
            addr::GW_WAN,
            tls(pki, "ops-alice")
        ),
    )
}

/// `LimitNOFILE=` of the shipped unit: the connector runs under it here as under systemd.
pub fn unit_nofile() -> u64 {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/gatewayd.service"
    ))
    .expect("read the unit");
    unit.lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("the unit sets LimitNOFILE to a number")
}

/// A lab with a connector (under the unit's descriptor limit) and, unless `client` is None,
/// the operator host's client (`Some(true)`: also the office's site gateway), connected.
pub fn start(client: Option<bool>, extra_routes: &[&str]) -> Hostile {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = lab.dir().join("pki");
    let d = pki.to_str().expect("utf-8");
    let out = gatewayctl(&lab, Host::Operator, &["pki", "init", "--dir", d]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    for n in IDENTITIES {
        // lab-gw serves clients: it needs the connector profile (ServerAuth).
        let profile = if *n == "lab-gw" {
            "connector"
        } else {
            "client"
        };
        let argv = ["pki", "issue", n, "--dir", d, "--profile", profile];
        let out = gatewayctl(&lab, Host::Operator, &argv);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let cc = connector_config(&lab, &pki, true, extra_routes);
    let connector_socket = socket_path(&lab, "lab-gw");
    let nofile = format!("--nofile={0}:{0}", unit_nofile());
    let argv = [
        "prlimit",
        &nofile,
        "--",
        GATEWAYD,
        "--config",
        cc.to_str().expect("utf-8"),
    ];
    let connector = start_daemon_argv(
        &lab,
        Host::VpcGateway,
        &argv,
        &connector_socket,
        "connector.log",
    );
    let comm =
        std::fs::read_to_string(format!("/proc/{}/comm", connector.id())).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "gatewayd",
        "the spawned pid is gatewayd itself"
    );
    let client_socket = socket_path(&lab, "ops-alice");
    let client = client.map(|site| {
        let oc = client_config(&lab, &pki, site);
        let c = start_daemon(&lab, Host::Operator, &oc, &client_socket, "client.log");
        wait_connected(&lab, &client_socket);
        c
    });
    Hostile {
        lab,
        connector,
        client,
        connector_socket,
        client_socket,
        pki,
    }
}

fn wait_connected(lab: &Lab, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_json(lab, Host::Operator, socket);
        if s.tunnel
            .as_ref()
            .is_some_and(|t| t.state.starts_with("connected") && !t.peers.is_empty())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "client not connected: {:?}",
            s.tunnel
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Hostile {
    /// The hostile peer `name` on the operator host, towards the connector's TCP port.
    pub fn target(&self, name: &str) -> Target {
        let addr = format!("{}:7844", addr::GW_WAN).parse().expect("addr");
        Target::new(self.lab.ns(Host::Operator), addr, &self.pki, name)
    }

    pub fn connector_status(&self) -> gateway::api::Status {
        status_json(&self.lab, Host::VpcGateway, &self.connector_socket)
    }

    /// The connector's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.connector.id()))
            .expect("connector's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Descriptors the connector holds.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.connector.id()))
            .map(|d| d.count())
            .expect("connector's fd directory")
    }

    /// `ip -FAMILY route` on the VPC gateway.
    pub fn gw_routes(&self, family: &str) -> String {
        self.lab
            .run_ok(Host::VpcGateway, &["ip", family, "route", "show"])
            .expect("ip route")
    }

    /// An ssh session from `host` that prints `tick N` every 250 ms for `secs` seconds.
    pub fn ticking_ssh(&self, host: Host, secs: u32, log: &str) -> Spawned {
        let n = secs * 4;
        let argv = self.lab.ssh_argv(
            addr::VPC_HOST,
            &format!("for i in $(seq 1 {n}); do echo tick $i; sleep 0.25; done"),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.lab.spawn(host, &argv, log).expect("ssh")
    }

    /// Waits for a [`ticking_ssh`](Self::ticking_ssh) session: it must end well, every tick.
    pub fn ticked(&self, mut ssh: Spawned, secs: u32) {
        let exit = ssh
            .wait_timeout(Duration::from_secs(u64::from(secs) + 20))
            .expect("ssh ends");
        let log = ssh.log();
        assert!(exit.success(), "ssh session broke ({exit}):\n{log}");
        assert!(
            log.contains(&format!("tick {}\n", secs * 4)),
            "ticks missing:\n{log}"
        );
    }

    pub fn ssh_ok(&self, host: Host) {
        let argv = self.lab.ssh_argv(addr::VPC_HOST, "echo tunnelled-$((6*7))");
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.lab.run_ok(host, &argv).expect("ssh");
        assert_eq!(out.trim(), "tunnelled-42");
    }

    pub fn ping_ok(&self, host: Host) {
        self.lab
            .run_ok(
                host,
                &["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST],
            )
            .unwrap_or_else(|e| panic!("ping from {host:?}: {e:#}"));
    }
}

/// The refusal text in a connector's answer, or a panic saying what came instead.
pub fn refused(answer: anyhow::Result<Control>) -> String {
    match answer {
        Ok(Control::Refused { reason }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}
