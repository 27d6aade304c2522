//! Configuration: TOML in, a validated [`Config`] out, or every problem found named by file, key
//! and reason.
//!
//! Parsing happens in two passes. Serde checks the shape (unknown keys, wrong types) and
//! `serde_path_to_error` tells which key it was looking at; then `validate` checks meaning
//! (CIDRs, names, duplicates) and reports all problems at once, so an operator fixes a file in
//! one round. Whether the named interfaces exist depends on the network namespace the check runs
//! in, so that lives apart, in `preflight`.
//!
//! The pieces: the validated types and the two entry points ([`load`], [`parse`]) here;
//! `raw` the serde shape of the file, `validate` the top-level sections, `tunnel` the
//! sections of a tunnel node, `checks` the checks across keys, `reload` what SIGHUP may apply.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::core::policy::Rule;
use crate::routes::RouteTable;

pub mod checks;
mod names;
mod raw;
mod reload;
mod tunnel;
mod validate;

pub use reload::{ReloadChanges, reload_changes};
pub use tunnel::{DEFAULT_OVERLAY_V4, DEFAULT_OVERLAY_V6, DEFAULT_TUN};

/// Where the daemon listens and `gatewayctl` connects when nothing else is said.
pub const DEFAULT_SOCKET: &str = "/run/gateway/gatewayd.sock";
/// Where the daemon records what it set up, so a crashed run can be cleaned at the next start:
/// the unit's `StateDirectory=gateway`, which (unlike its `RuntimeDirectory`) survives the
/// automatic restart that follows a crash.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gateway";
/// Exit status of gatewayd and `gatewayctl check-config` for a config that does not validate;
/// the unit's `RestartPreventExitStatus=` lists it, since restarting cannot fix a file.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, for messages and `gatewayctl status`.
    pub path: PathBuf,
    pub node: Node,
    /// Interfaces whose TC ingress gets the classifier.
    pub interfaces: Vec<String>,
    /// `[dataplane] attach`: how TC programs are attached.
    pub attach: crate::dataplane::AttachMode,
    pub routes: RouteTable,
    /// The tunnel, when this node is a connector or a client; `None` for a classifier only.
    pub tunnel: Option<Tunnel>,
    /// `[icmp] manage_ping_group_range`: widen `net.ipv4.ping_group_range` to the daemon's group
    /// at start and restore it on stop.
    pub manage_ping_group_range: bool,
    /// `[metrics] listen`: where the Prometheus endpoint serves `/metrics`; off when absent.
    pub metrics: Option<SocketAddr>,
    /// What is valid but probably not meant (see `checks`): printed by check-config,
    /// logged at start.
    pub warnings: Vec<ConfigIssue>,
}

/// What a node does in the tunnel: `[tunnel] role`, or which of `listen` / `connect` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Accepts clients on `listen` (if set) and through the hubs it dials (`hubs`, from
    /// `source_port`), and forwards their packets into the VPC.
    Connector {
        listen: Option<SocketAddr>,
        hubs: Vec<String>,
        source_port: u16,
    },
    /// Relays sessions between clients and connectors that dial it on `listen`; reads none.
    Hub { listen: SocketAddr },
    /// Dials the connector at `connect` (`HOST:PORT`), expecting its certificate to name
    /// `server_name`.
    Client {
        connect: Vec<String>,
        server_name: String,
        source_port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub role: Role,
    /// Name of the TUN device the daemon creates (and the kernel removes when it exits).
    pub tun: String,
    /// Connector: the overlay prefixes clients get addresses from; the first address is the
    /// connector's own.
    pub overlay_v4: Ipv4Net,
    pub overlay_v6: Ipv6Net,
    pub tls: TlsPaths,
    /// Client: interfaces whose traffic to tunnelled routes the classifier redirects into the
    /// TUN (an office LAN behind a site gateway).
    pub lan: Vec<String>,
    /// Client: prefixes behind it (its LANs), announced so the connector routes replies back.
    pub advertise: Vec<IpNet>,
    /// Client that forwards (a site gateway: `lan` or `advertise` set): its nftables table
    /// (family inet), which lets it forward only between the LAN and the TUN.
    pub client_table: Option<String>,
    /// Connector: who may reach what.
    pub policy: Vec<PolicyEntry>,
    /// Connector: source NAT of tunnelled traffic leaving into the VPC.
    pub egress: Option<Egress>,
    /// Connector: private DNS zones answered by their resolvers.
    pub zones: Vec<Zone>,
    /// Client: where to answer DNS queries for the connector's zones (a resolver address for
    /// systemd-resolved's routing domains, say).
    pub dns_stub: Option<SocketAddr>,
    /// Client: uplinks at whose egress the host's own queries for the zones, sent to whatever
    /// resolver it uses, are steered into the tunnel.
    pub dns_intercept: Vec<String>,
    /// Client: `[client] dns`, whether systemd-resolved is told to send the zones' names to
    /// the stub.
    pub dns: HostDns,
    /// Which transports to use: QUIC with the TLS-over-TCP fallback, or one of them only.
    pub transport: Transport,
    /// TCP port of the fallback when it is not the tunnel's port (443 for networks that only
    /// let HTTPS out). Connector: where it listens; client: where it dials.
    pub fallback_port: Option<u16>,
    /// Client, `auto`: how long a QUIC handshake may take before the TCP fallback is tried.
    pub quic_timeout: std::time::Duration,
    /// `[tunnel] group`. Connector with hubs: the replica group it announces. Client: its
    /// `connect` targets are hubs, and it asks them for a connector of this group.
    pub group: Option<String>,
    /// `[tunnel] relay` (default on): through hubs over QUIC, a session's packets travel
    /// beside the outer link as relayed UDP (docs/hub.md). Off, for a network that passes
    /// QUIC but drops other UDP on the same flow: they ride inside the outer link. A hub with
    /// it off offers relaying to nobody.
    pub relay: bool,
}

/// `[client] dns`: how the host's own resolver learns the connector's zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostDns {
    /// Unset: systemd-resolved when it is on the system bus at start, else nothing.
    #[default]
    Auto,
    /// systemd-resolved, over D-Bus: per-link DNS server and `~zone` routing domains on the
    /// TUN. Asked for and absent: the tunnel starts anyway and status says why it is not set.
    Resolved,
    /// Nothing: the operator routes names to `dns_stub` (or relies on eBPF steering).
    None,
}

impl HostDns {
    /// resolved's own listeners: its stub (127.0.0.53) and its proxy stub (127.0.0.54). A
    /// link DNS server there would make resolved ask itself.
    pub fn is_resolved_listener(ip: std::net::IpAddr) -> bool {
        [[127, 0, 0, 53], [127, 0, 0, 54]]
            .iter()
            .any(|a| ip == std::net::IpAddr::from(*a))
    }
}

/// `[tunnel] transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC, and TLS over TCP when QUIC gets no handshake; back to QUIC when it works again.
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl Transport {
    pub fn uses_quic(self) -> bool {
        self != Transport::Tcp
    }

    pub fn uses_tcp(self) -> bool {
        self != Transport::Quic
    }
}

/// Long enough for a QUIC handshake over a slow path, short enough that a network that drops
/// UDP costs the operator under two seconds before the fallback.
pub const DEFAULT_QUIC_TIMEOUT_MS: u64 = 1500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Lowercase, no trailing dot.
    pub domain: String,
    /// Asked in this order.
    pub servers: Vec<std::net::IpAddr>,
    pub on_servfail: crate::core::resolver::OnServfail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The VPC-facing interface.
    pub interface: String,
    /// Inclusive source-port range for TCP and UDP leaving through it.
    pub ports: (u16, u16),
    /// The daemon's nftables table (family inet).
    pub table: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `[tls] crl`: certificates the CA revoked (`gatewayctl pki revoke`); read again on SIGHUP.
    pub crl: Option<PathBuf>,
}

/// One `[[policy]]` entry, its rules parsed once here so nothing downstream parses (or can
/// fail on) a rule string again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    pub identity: String,
    pub allow: Vec<Rule>,
    /// Prefixes a client with this identity may advertise (its LANs); nothing else is routed
    /// to it.
    pub advertise: Vec<IpNet>,
    /// Connections VPC sources may open to this identity's addresses, same grammar as `allow`
    /// with the CIDR naming the VPC sources.
    pub inbound: Vec<Rule>,
}

impl PolicyEntry {
    /// The entry as `core::policy` decides with it.
    fn policy_entry(&self) -> crate::core::policy::Entry {
        crate::core::policy::Entry {
            identity: self.identity.clone(),
            rules: self.allow.clone(),
            inbound: self.inbound.clone(),
        }
    }
}

/// The policy a connector enforces, from validated entries: cannot fail.
pub fn policy_of(entries: &[PolicyEntry]) -> crate::core::policy::Policy {
    crate::core::policy::Policy::from_entries(
        entries.iter().map(PolicyEntry::policy_entry).collect(),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides it.
    pub log_level: String,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub file: PathBuf,
    /// Dotted key path such as `route[1].cidr`, or `line 3, column 7` for a syntax error.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

/// Every problem found in a config file; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// Reads and validates `path`. Checks nothing outside the file; see `preflight::check_system`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![ConfigIssue {
            file: path.to_owned(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Validates `text` as if read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let issue = |key: String, reason: String| ConfigIssue {
        file: path.to_owned(),
        key,
        reason,
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError(vec![issue(location(text, &e), clean_message(&e))]))?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let key = if key == "." || key.is_empty() {
            location(text, &inner)
        } else {
            key
        };
        ConfigError(vec![issue(key, clean_message(&inner))])
    })?;
    validate::validate(path, raw)
}

/// Line and column of a TOML error, when it has a position.
fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "(document)".into(),
    }
}

fn clean_message(e: &toml::de::Error) -> String {
    e.message().trim().replace('\n', " ")
}

#[cfg(test)]
mod hub_tests;
#[cfg(test)]
mod tests;
