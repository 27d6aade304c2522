//! The hub lab: a hub on the underlay side, connectors in the VPC whose public side takes no
//! inbound connection at all, a client on the operator host (a site gateway for the office).
#![allow(
    dead_code,
    reason = "each hub test file uses a different part of this module"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::pair::SITE;
use gateway_lab::hub::addr as hub_addr;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr};

pub const GROUP: &str = "vpc";
pub const HUB: &str = "lab-hub";
pub const GW_A: &str = "gw-a";
pub const GW_B: &str = "gw-b";
pub const CLIENT: &str = "ops-alice";

/// What `ops-*` may reach: ssh, iperf3, ping and DNS in the VPC, all of its IPv6 prefix.
pub const POLICY: &str = r#"
[[policy]]
identity = "ops-*"
allow = ["10.128.0.0/16 tcp/22", "10.128.0.0/16 tcp/5201", "10.128.0.0/16 icmp",
         "10.128.0.0/16 udp/53", "fd00:128::/64"]
advertise = ["192.0.2.0/24", "2001:db8:2::/64"]
"#;

pub struct HubLab {
    pub lab: Lab,
    pub pki: PathBuf,
    pub hub: Option<Spawned>,
    pub hub_socket: PathBuf,
    pub connectors: Vec<(Host, Spawned, PathBuf)>,
    pub client: Option<Spawned>,
    pub client_socket: PathBuf,
}

pub fn tls(pki: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
        pki.display()
    )
}

/// `gatewayctl pki ARGS --dir PKI`, which must succeed.
pub fn pki_issue(lab: &Lab, pki: &Path, args: &[&str]) {
    let d = pki.to_str().expect("utf-8");
    let mut argv = vec!["pki"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--dir", d]);
    let out = gatewayctl(lab, Host::Operator, &argv);
    assert!(out.status.success(), "{argv:?}: {}", stderr_of(&out));
}

/// The lab, its PKI (a hub certificate for the hub's address, two connectors that both carry
/// the group's name, a client), the inbound filter on both VPC gateways, and a hub running
/// with the PKI's CRL (empty until a test revokes).
pub fn start_hub() -> HubLab {
    let mut lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    lab.add_hub().expect("hub topology");
    lab.close_inbound(Host::VpcGateway).expect("filter gw");
    lab.close_inbound(Host::VpcGateway2).expect("filter gw2");
    let pki = lab.dir().join("pki");
    pki_issue(&lab, &pki, &["init"]);
    pki_issue(
        &lab,
        &pki,
        &["issue", HUB, "--profile", "hub", "--ip", hub_addr::HUB],
    );
    for gw in [GW_A, GW_B] {
        pki_issue(
            &lab,
            &pki,
            &["issue", gw, "--profile", "connector", "--dns", GROUP],
        );
    }
    pki_issue(&lab, &pki, &["issue", CLIENT]);
    let hub_config = write_config(
        &lab,
        HUB,
        &[],
        &format!(
            "[tunnel]\nrole = \"hub\"\nlisten = \"0.0.0.0:{}\"\n\n{}crl = \"{}/crl.pem\"\n",
            hub_addr::PORT,
            tls(&pki, HUB),
            pki.display()
        ),
    );
    let hub_socket = socket_path(&lab, HUB);
    let hub = start_daemon(&lab, Host::Hub, &hub_config, &hub_socket, "hub.log");
    HubLab {
        client_socket: socket_path(&lab, CLIENT),
        lab,
        pki,
        hub: Some(hub),
        hub_socket,
        connectors: Vec::new(),
        client: None,
    }
}

pub fn hub_target() -> String {
    format!("{}:{}", hub_addr::HUB, hub_addr::PORT)
}

/// The config of connector `name`: no listen, an outbound link to the hub from the pinned
/// port, the standard lab's routes, policy and zone.
pub fn connector_config(lab: &Lab, pki: &Path, name: &str, tunnel_extra: &str) -> PathBuf {
    write_config(
        lab,
        name,
        &[],
        &format!(
            "[tunnel]\nrole = \"connector\"\nconnect = [\"{}\"]\nsource_port = {}\n\
             group = \"{GROUP}\"\ntun = \"gwtun\"\n{tunnel_extra}\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\n\n[[route]]\ncidr = \"{}\"\n{POLICY}\n\
             [[dns.zone]]\ndomain = \"hoge-vpc.com\"\nservers = [\"{}\"]\n",
            hub_target(),
            hub_addr::PORT,
            tls(pki, name),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6,
            addr::RESOLVER_PRIMARY,
        ),
    )
}

impl HubLab {
    /// Starts connector `name` in `host` and waits (bounded) until the hub lists it.
    pub fn start_connector(&mut self, host: Host, name: &str, tunnel_extra: &str) {
        let config = connector_config(&self.lab, &self.pki, name, tunnel_extra);
        let socket = socket_path(&self.lab, name);
        let d = start_daemon(&self.lab, host, &config, &socket, &format!("{name}.log"));
        self.connectors.push((host, d, socket));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.hub_lists(name) {
            assert!(
                Instant::now() < deadline,
                "{name} never linked to the hub; its log:\n{}\nhub's log:\n{}",
                self.connectors
                    .last()
                    .map(|c| c.1.log())
                    .unwrap_or_default(),
                self.hub.as_ref().map(|h| h.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the hub's status lists connector `name`.
    pub fn hub_lists(&self, name: &str) -> bool {
        let s = status_json(&self.lab, Host::Hub, &self.hub_socket);
        s.tunnel
            .and_then(|t| t.hub)
            .is_some_and(|h| h.connectors.iter().any(|c| c.identity == name))
    }

    /// Starts the client (a site gateway) through the hub with `tunnel_extra` lines, and waits
    /// until it is connected.
    pub fn start_client(&mut self, tunnel_extra: &str) -> gateway::api::Status {
        let config = write_config(
            &self.lab,
            CLIENT,
            &[],
            &format!(
                "[tunnel]\nconnect = [\"{}\"]\ngroup = \"{GROUP}\"\nsource_port = {}\n\
                 tun = \"optun\"\n{tunnel_extra}\n{}\n[client]\ndns_stub = \"127.0.0.53:53\"\n{SITE}",
                hub_target(),
                hub_addr::PORT,
                tls(&self.pki, CLIENT)
            ),
        );
        let d = start_daemon(
            &self.lab,
            Host::Operator,
            &config,
            &self.client_socket,
            "client.log",
        );
        self.client = Some(d);
        let status =
            crate::pair::wait_connected(&self.lab, &self.client_socket, Duration::from_secs(15));
        // "connected" is said a moment before the learned routes are in the kernel.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .lab
            .run_ok(Host::Operator, &["ip", "route", "get", addr::VPC_HOST])
            .is_ok_and(|r| r.contains("optun"))
        {
            assert!(Instant::now() < deadline, "no route into the tunnel");
            std::thread::sleep(Duration::from_millis(50));
        }
        status
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(h) = &self.hub {
            s.push_str(&format!("--- hub\n{}\n", h.log()));
        }
        for (_, d, _) in &self.connectors {
            s.push_str(&format!("--- connector\n{}\n", d.log()));
        }
        if let Some(c) = &self.client {
            s.push_str(&format!("--- client\n{}\n", c.log()));
        }
        s
    }
}

/// The hub's refusals and relay tables now.
pub fn hub_now(h: &HubLab) -> gateway::api::TunnelStatus {
    status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel")
}

/// Waits (bounded) until the hub's status satisfies `ok`.
pub fn wait_hub(
    h: &HubLab,
    within: Duration,
    what: &str,
    ok: impl Fn(&gateway::api::TunnelStatus) -> bool,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let t = hub_now(h);
        if ok(&t) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}: {t:?}\n{}",
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
