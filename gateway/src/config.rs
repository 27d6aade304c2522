//! Configuration: TOML in, a validated [`Config`] out, or every problem found named by file, key
//! and reason.
//!
//! Parsing happens in two passes. Serde checks the shape (unknown keys, wrong types) and
//! `serde_path_to_error` tells which key it was looking at; then [`validate`] checks meaning
//! (CIDRs, names, duplicates) and reports all problems at once, so an operator fixes a file in
//! one round. Whether the named interfaces exist depends on the network namespace the check runs
//! in, so that lives apart, in `preflight`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use gateway_common::MAX_ROUTES;
use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::core::cidr::{parse_cidr, parse_port_range};
use crate::core::policy::Rule;
use crate::routes::{Route, RouteTable};

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
    /// What is valid but probably not meant (see `config_checks`): printed by check-config,
    /// logged at start.
    pub warnings: Vec<ConfigIssue>,
}

/// What a node does in the tunnel, from which of `[tunnel] listen` / `connect` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Accepts clients on `listen` and forwards their packets into the VPC.
    Connector { listen: SocketAddr },
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
    /// Which transports to use: QUIC with the TLS-over-TCP fallback, or one of them only.
    pub transport: Transport,
    /// TCP port of the fallback when it is not the tunnel's port (443 for networks that only
    /// let HTTPS out). Connector: where it listens; client: where it dials.
    pub fallback_port: Option<u16>,
    /// Client, `auto`: how long a QUIC handshake may take before the TCP fallback is tried.
    pub quic_timeout: std::time::Duration,
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
    pub fn policy_entry(&self) -> crate::core::policy::Entry {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    route: Vec<RawRoute>,
    tunnel: Option<RawTunnel>,
    tls: Option<RawTls>,
    client: Option<RawClient>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
    egress: Option<RawEgress>,
    dns: Option<RawDns>,
    icmp: Option<RawIcmp>,
    metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
    /// Listening beyond loopback on purpose: no warning.
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmp {
    #[serde(default)]
    manage_ping_group_range: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    zone: Vec<RawZone>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    domain: String,
    servers: Vec<String>,
    on_servfail: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    interface: String,
    port_range: String,
    table: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: Option<String>,
    connect: Option<Vec<String>>,
    server_name: Option<String>,
    source_port: Option<u16>,
    tun: Option<String>,
    overlay: Option<String>,
    overlay_v6: Option<String>,
    transport: Option<String>,
    fallback_port: Option<u16>,
    quic_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    crl: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    #[serde(default)]
    lan: Vec<String>,
    #[serde(default)]
    advertise: Vec<String>,
    dns_stub: Option<String>,
    #[serde(default)]
    dns_intercept: Vec<String>,
    table: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    identity: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    advertise: Vec<String>,
    #[serde(default)]
    inbound: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    #[serde(default)]
    interfaces: Vec<String>,
    attach: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    cidr: String,
    name: Option<String>,
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
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let key = if key == "." || key.is_empty() {
            location(text, &inner)
        } else {
            key
        };
        ConfigError(vec![issue(key, clean_message(&inner))])
    })?;
    validate(path, raw)
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

fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut issues = Vec::new();
    let mut push = |key: String, reason: String| {
        issues.push(ConfigIssue {
            file: path.to_owned(),
            key,
            reason,
        })
    };

    if let Err(reason) = check_node_name(&raw.node.name) {
        push("node.name".into(), reason);
    }
    let socket = raw
        .node
        .socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if !socket.is_absolute() {
        push(
            "node.socket".into(),
            format!(
                "must be an absolute path, got {:?}",
                socket.display().to_string()
            ),
        );
    }
    let state_dir = raw
        .node
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if !state_dir.is_absolute() {
        push(
            "node.state_dir".into(),
            format!(
                "must be an absolute path, got {:?}",
                state_dir.display().to_string()
            ),
        );
    }

    let mut seen_ifaces = BTreeSet::new();
    for (i, name) in raw.dataplane.interfaces.iter().enumerate() {
        let key = format!("dataplane.interfaces[{i}]");
        if let Err(reason) = check_interface_name(name) {
            push(key, reason);
        } else if !seen_ifaces.insert(name.as_str()) {
            push(key, format!("interface {name:?} is listed twice"));
        }
    }

    let attach = match raw.dataplane.attach.as_deref().map(str::parse) {
        None => crate::dataplane::AttachMode::Auto,
        Some(Ok(mode)) => mode,
        Some(Err(reason)) => {
            push("dataplane.attach".into(), reason);
            crate::dataplane::AttachMode::Auto
        }
    };

    let mut routes = Vec::new();
    if raw.route.len() > MAX_ROUTES as usize {
        push(
            "route".into(),
            format!(
                "{} routes configured; the classifier holds at most {MAX_ROUTES}",
                raw.route.len()
            ),
        );
    }
    for (i, r) in raw.route.iter().enumerate() {
        let key = format!("route[{i}].cidr");
        match parse_cidr(&r.cidr) {
            Err(reason) => push(key, reason),
            Ok(cidr) => {
                if let Some(prev) = routes.iter().position(|p: &Route| p.cidr == cidr) {
                    push(
                        key,
                        format!("{cidr} is already configured as route[{prev}]"),
                    );
                    continue;
                }
                let name = match &r.name {
                    Some(n) if n.trim().is_empty() => {
                        push(format!("route[{i}].name"), "must not be empty".into());
                        continue;
                    }
                    Some(n) => n.clone(),
                    None => cidr.to_string(),
                };
                routes.push(Route {
                    // Bounded by the MAX_ROUTES check above; ids index the counter array.
                    id: u32::try_from(routes.len()).unwrap_or(u32::MAX),
                    cidr,
                    name,
                });
            }
        }
    }

    let manage_ping_group_range = raw.icmp.as_ref().is_some_and(|i| i.manage_ping_group_range);
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => match m.listen.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                push(
                    "metrics.listen".into(),
                    "port 0 is not a port to scrape".into(),
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                push(
                    "metrics.listen".into(),
                    format!(
                        "{:?} is not ADDRESS:PORT, e.g. 127.0.0.1:9469 (keep it local)",
                        m.listen
                    ),
                );
                None
            }
        },
    };
    let log_level = raw.node.log_level.clone().unwrap_or_else(|| "info".into());
    if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
        push(
            "node.log_level".into(),
            format!("{log_level:?} is not one of error, warn, info, debug, trace"),
        );
    }
    let node_name = raw.node.name.clone();
    let metrics_allow_remote = raw.metrics.as_ref().is_some_and(|m| m.allow_remote);
    let tunnel = validate_tunnel(
        &node_name,
        raw.egress,
        raw.dns,
        raw.tunnel,
        raw.tls,
        raw.client,
        raw.policy,
        &mut |k, r| push(k, r),
    );

    if !issues.is_empty() {
        return Err(ConfigError(issues));
    }
    let mut config = Config {
        manage_ping_group_range,
        metrics,
        tunnel,
        path: path.to_owned(),
        node: Node {
            name: raw.node.name,
            socket,
            state_dir,
            log_level,
        },
        interfaces: raw.dataplane.interfaces,
        attach,
        routes: RouteTable::new(routes),
        warnings: Vec::new(),
    };
    let review = crate::config_checks::review(&config, metrics_allow_remote);
    if !review.errors.is_empty() {
        return Err(ConfigError(review.errors));
    }
    config.warnings = review.warnings;
    Ok(config)
}

/// Default overlay prefixes; RFC 6598 shared space and a ULA, unlikely to clash with a VPC.
pub const DEFAULT_OVERLAY_V4: &str = "100.64.0.0/24";
pub const DEFAULT_OVERLAY_V6: &str = "fd00:64::/64";
pub const DEFAULT_TUN: &str = "gateway0";

#[allow(clippy::too_many_arguments, reason = "one argument per config section")]
fn validate_tunnel(
    node_name: &str,
    egress: Option<RawEgress>,
    dns: Option<RawDns>,
    tunnel: Option<RawTunnel>,
    tls: Option<RawTls>,
    client: Option<RawClient>,
    policy: Vec<RawPolicy>,
    push: &mut dyn FnMut(String, String),
) -> Option<Tunnel> {
    let Some(t) = tunnel else {
        if tls.is_some() {
            push(
                "tls".into(),
                "set, but there is no [tunnel] to use it".into(),
            );
        }
        if client.is_some() {
            push("client".into(), "set, but there is no [tunnel]".into());
        }
        if !policy.is_empty() {
            push("policy".into(), "set, but there is no [tunnel]".into());
        }
        if egress.is_some() {
            push("egress".into(), "set, but there is no [tunnel]".into());
        }
        if dns.is_some() {
            push("dns".into(), "set, but there is no [tunnel]".into());
        }
        return None;
    };
    let mut ok = true;
    let mut bad = |k: &str, r: String, ok: &mut bool| {
        *ok = false;
        push(k.into(), r)
    };
    let role = match (&t.listen, &t.connect) {
        (Some(_), Some(_)) => {
            bad("tunnel.connect", "set together with tunnel.listen: a node either listens (connector) or connects (client)".into(), &mut ok);
            None
        }
        (None, None) => {
            bad(
                "tunnel",
                "needs listen (connector) or connect (client)".into(),
                &mut ok,
            );
            None
        }
        (Some(listen), None) => match listen.parse::<SocketAddr>() {
            Ok(listen) => Some(Role::Connector { listen }),
            Err(_) => {
                bad(
                    "tunnel.listen",
                    format!("{listen:?} is not ADDRESS:PORT, e.g. 0.0.0.0:7844"),
                    &mut ok,
                );
                None
            }
        },
        (None, Some(connect)) => {
            let mut hosts = Vec::new();
            for (i, c) in connect.iter().enumerate() {
                match c.rsplit_once(':') {
                    Some((host, port))
                        if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                    {
                        hosts.push(host.trim_matches(['[', ']']).to_string())
                    }
                    _ => bad(
                        &format!("tunnel.connect[{i}]"),
                        format!("{c:?} is not HOST:PORT"),
                        &mut ok,
                    ),
                }
            }
            if connect.is_empty() {
                bad("tunnel.connect", "is empty".into(), &mut ok);
            }
            // Unset, the name is the host the client dials: a DNS name the connector's
            // certificate carries (`pki issue --dns`), or an address it carries (`--ip`).
            let server_name = match (&t.server_name, hosts.first()) {
                (Some(n), _) => Some(n.clone()),
                (None, Some(h)) => Some(h.clone()),
                (None, None) => None,
            };
            if let Some(n) = &t.server_name
                && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
            {
                bad(
                    "tunnel.server_name",
                    format!("{n:?} is neither a DNS name nor an IP address"),
                    &mut ok,
                );
            }
            server_name.map(|server_name| Role::Client {
                connect: connect.clone(),
                server_name,
                source_port: t.source_port.unwrap_or(0),
            })
        }
    };
    if t.source_port.is_some() && t.listen.is_some() {
        bad(
            "tunnel.source_port",
            "only for clients; a connector answers from its listen port".into(),
            &mut ok,
        );
    }
    let transport = match t.transport.as_deref() {
        None | Some("auto") => Transport::Auto,
        Some("quic") => Transport::Quic,
        Some("tcp") => Transport::Tcp,
        Some(other) => {
            bad(
                "tunnel.transport",
                format!("{other:?} is not one of \"auto\", \"quic\", \"tcp\""),
                &mut ok,
            );
            Transport::Auto
        }
    };
    if t.fallback_port == Some(0) {
        bad(
            "tunnel.fallback_port",
            "0 is not a port; leave it out to use the tunnel's port".into(),
            &mut ok,
        );
    }
    if t.fallback_port.is_some() && transport == Transport::Quic {
        bad(
            "tunnel.fallback_port",
            "set, but transport = \"quic\" never uses TCP".into(),
            &mut ok,
        );
    }
    let quic_timeout_ms = t.quic_timeout_ms.unwrap_or(DEFAULT_QUIC_TIMEOUT_MS);
    if !(100..=30_000).contains(&quic_timeout_ms) {
        bad(
            "tunnel.quic_timeout_ms",
            format!("{quic_timeout_ms} is outside 100-30000"),
            &mut ok,
        );
    }
    let tun = t.tun.unwrap_or_else(|| DEFAULT_TUN.into());
    if let Err(r) = check_interface_name(&tun) {
        bad("tunnel.tun", r, &mut ok);
    }
    let overlay_v4 = match parse_cidr(t.overlay.as_deref().unwrap_or(DEFAULT_OVERLAY_V4)) {
        Ok(IpNet::V4(n)) if n.prefix_len() <= 30 => Some(n),
        Ok(_) => {
            bad(
                "tunnel.overlay",
                "must be an IPv4 prefix of /30 or shorter".into(),
                &mut ok,
            );
            None
        }
        Err(r) => {
            bad("tunnel.overlay", r, &mut ok);
            None
        }
    };
    let overlay_v6 = match parse_cidr(t.overlay_v6.as_deref().unwrap_or(DEFAULT_OVERLAY_V6)) {
        Ok(IpNet::V6(n)) if n.prefix_len() <= 120 => Some(n),
        Ok(_) => {
            bad(
                "tunnel.overlay_v6",
                "must be an IPv6 prefix of /120 or shorter".into(),
                &mut ok,
            );
            None
        }
        Err(r) => {
            bad("tunnel.overlay_v6", r, &mut ok);
            None
        }
    };
    let Some(tls) = tls else {
        bad(
            "tls",
            "the tunnel needs [tls] ca, cert and key".into(),
            &mut ok,
        );
        return None;
    };
    let client = client.unwrap_or_default();
    let is_connector = t.listen.is_some();
    if is_connector && (!client.lan.is_empty() || !client.advertise.is_empty()) {
        bad(
            "client",
            "only for clients (this node listens: it is a connector)".into(),
            &mut ok,
        );
    }
    for (i, name) in client.lan.iter().enumerate() {
        if let Err(r) = check_interface_name(name) {
            bad(&format!("client.lan[{i}]"), r, &mut ok);
        }
    }
    let mut advertise = Vec::new();
    for (i, c) in client.advertise.iter().enumerate() {
        match parse_cidr(c) {
            Ok(n) => advertise.push(n),
            Err(r) => bad(&format!("client.advertise[{i}]"), r, &mut ok),
        }
    }
    // A client that forwards (a site gateway) owns a table that keeps forwarding to LAN <-> TUN.
    let client_table = if client.lan.is_empty() && client.advertise.is_empty() {
        if client.table.is_some() {
            bad(
                "client.table",
                "only for a site gateway (client.lan or client.advertise set)".into(),
                &mut ok,
            );
        }
        None
    } else {
        let table = client
            .table
            .clone()
            .unwrap_or_else(|| default_table(node_name));
        if let Err(r) = check_table_name(&table) {
            bad("client.table", r, &mut ok);
        }
        Some(table)
    };
    if !is_connector && !policy.is_empty() {
        bad(
            "policy",
            "only for connectors: they decide what clients may reach".into(),
            &mut ok,
        );
    }
    let mut entries = Vec::new();
    for (i, p) in policy.into_iter().enumerate() {
        if p.identity.trim().is_empty() {
            bad(
                &format!("policy[{i}].identity"),
                "must not be empty".into(),
                &mut ok,
            );
        }
        let allow = parse_rules(&format!("policy[{i}].allow"), &p.allow, &mut bad, &mut ok);
        let mut advertise = Vec::new();
        for (j, c) in p.advertise.iter().enumerate() {
            match parse_cidr(c) {
                Ok(n) if n.prefix_len() == 0 => bad(
                    &format!("policy[{i}].advertise[{j}]"),
                    format!("{c:?} is a default route; a client is never routed everything"),
                    &mut ok,
                ),
                Ok(n) => advertise.push(n),
                Err(r) => bad(&format!("policy[{i}].advertise[{j}]"), r, &mut ok),
            }
        }
        let inbound = parse_rules(&format!("policy[{i}].inbound"), &p.inbound, &mut bad, &mut ok);
        entries.push(PolicyEntry {
            identity: p.identity,
            allow,
            advertise,
            inbound,
        });
    }
    let egress = match egress {
        None => None,
        Some(_) if !is_connector => {
            bad("egress", "only for connectors".into(), &mut ok);
            None
        }
        Some(e) => {
            if let Err(r) = check_interface_name(&e.interface) {
                bad("egress.interface", r, &mut ok);
            }
            let ports = match parse_port_range(&e.port_range) {
                Ok(p) => Some(p),
                Err(r) => {
                    bad("egress.port_range", r, &mut ok);
                    None
                }
            };
            let table = e.table.unwrap_or_else(|| default_table(node_name));
            if let Err(r) = check_table_name(&table) {
                bad("egress.table", r, &mut ok);
            }
            ports.map(|ports| Egress {
                interface: e.interface,
                ports,
                table,
            })
        }
    };
    let raw_zones = dns.map(|d| d.zone).unwrap_or_default();
    if !is_connector && !raw_zones.is_empty() {
        bad(
            "dns.zone",
            "only for connectors: clients learn zones from them".into(),
            &mut ok,
        );
    }
    let mut zones: Vec<Zone> = Vec::new();
    for (i, z) in raw_zones.into_iter().enumerate() {
        let domain = z.domain.trim_end_matches('.').to_ascii_lowercase();
        if let Err(e) = crate::core::dns::wire_name(&domain) {
            bad(
                &format!("dns.zone[{i}].domain"),
                format!("{:?} is not a domain name ({})", z.domain, e.name()),
                &mut ok,
            );
        } else if domain.is_empty() {
            bad(
                &format!("dns.zone[{i}].domain"),
                "the root zone cannot be private".into(),
                &mut ok,
            );
        } else if zones.iter().any(|p| p.domain == domain) {
            bad(
                &format!("dns.zone[{i}].domain"),
                format!("{domain} is listed twice"),
                &mut ok,
            );
        }
        let mut servers = Vec::new();
        for (j, srv) in z.servers.iter().enumerate() {
            match srv.parse() {
                Ok(ip) => servers.push(ip),
                Err(_) => bad(
                    &format!("dns.zone[{i}].servers[{j}]"),
                    format!("{srv:?} is not an IP address"),
                    &mut ok,
                ),
            }
        }
        if z.servers.is_empty() {
            bad(
                &format!("dns.zone[{i}].servers"),
                "needs at least one resolver".into(),
                &mut ok,
            );
        }
        let on_servfail = match z.on_servfail.as_deref() {
            None | Some("failover") => crate::core::resolver::OnServfail::Failover,
            Some("return") => crate::core::resolver::OnServfail::Return,
            Some(other) => {
                bad(
                    &format!("dns.zone[{i}].on_servfail"),
                    format!("{other:?}: use \"failover\" (the default) or \"return\""),
                    &mut ok,
                );
                crate::core::resolver::OnServfail::Failover
            }
        };
        zones.push(Zone {
            domain,
            servers,
            on_servfail,
        });
    }
    if is_connector && !client.dns_intercept.is_empty() {
        bad("client.dns_intercept", "only for clients".into(), &mut ok);
    }
    for (i, name) in client.dns_intercept.iter().enumerate() {
        if let Err(r) = check_interface_name(name) {
            bad(&format!("client.dns_intercept[{i}]"), r, &mut ok);
        }
    }
    let dns_stub = match client.dns_stub.as_deref() {
        None => None,
        Some(_) if is_connector => {
            bad("client.dns_stub", "only for clients".into(), &mut ok);
            None
        }
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                bad(
                    "client.dns_stub",
                    format!("{s:?} is not ADDRESS:PORT, e.g. 127.0.0.53:53"),
                    &mut ok,
                );
                None
            }
        },
    };
    let (Some(role), Some(overlay_v4), Some(overlay_v6), true) = (role, overlay_v4, overlay_v6, ok)
    else {
        return None;
    };
    Some(Tunnel {
        role,
        tun,
        overlay_v4,
        overlay_v6,
        tls: TlsPaths {
            ca: tls.ca,
            cert: tls.cert,
            key: tls.key,
            crl: tls.crl,
        },
        lan: client.lan,
        advertise,
        client_table,
        policy: entries,
        egress,
        zones,
        dns_stub,
        dns_intercept: client.dns_intercept,
        transport,
        fallback_port: t.fallback_port,
        quic_timeout: std::time::Duration::from_millis(quic_timeout_ms),
    })
}

/// Each rule of `key` (`policy[0].allow`, say) parsed, every one that does not parse reported
/// as `key[j]`.
fn parse_rules(
    key: &str,
    written: &[String],
    bad: &mut impl FnMut(&str, String, &mut bool),
    ok: &mut bool,
) -> Vec<Rule> {
    let mut parsed = Vec::new();
    for (j, rule) in written.iter().enumerate() {
        match Rule::parse(rule) {
            Ok(r) => parsed.push(r),
            Err(reason) => bad(&format!("{key}[{j}]"), reason, ok),
        }
    }
    parsed
}

/// What a reload (SIGHUP) applies to a running daemon without dropping its tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    pub routes: bool,
    pub policy: bool,
    pub zones: bool,
    /// `[tls] crl` names another file (or none). The file itself is read again on every reload.
    pub crl: bool,
}

impl ReloadChanges {
    pub fn any(self) -> bool {
        self.routes || self.policy || self.zones || self.crl
    }
}

/// Compares the running config with a newly read one. Routes, `[[policy]]`, `[[dns.zone]]`
/// and `[tls] crl` apply live; anything else (addresses, ports, certificates, interfaces, ...) needs a
/// restart, and then the whole reload is refused, naming those keys, so the daemon never runs
/// half of each.
pub fn reload_changes(old: &Config, new: &Config) -> Result<ReloadChanges, Vec<&'static str>> {
    let mut fixed = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            fixed.push(key);
        }
    };
    differs("node", old.node != new.node);
    differs("dataplane.interfaces", old.interfaces != new.interfaces);
    differs("dataplane.attach", old.attach != new.attach);
    differs("metrics.listen", old.metrics != new.metrics);
    differs(
        "icmp.manage_ping_group_range",
        old.manage_ping_group_range != new.manage_ping_group_range,
    );
    match (&old.tunnel, &new.tunnel) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            differs("tunnel.listen/connect", a.role != b.role);
            differs("tunnel.tun", a.tun != b.tun);
            differs(
                "tunnel.overlay",
                a.overlay_v4 != b.overlay_v4 || a.overlay_v6 != b.overlay_v6,
            );
            differs(
                "tls",
                (&a.tls.ca, &a.tls.cert, &a.tls.key) != (&b.tls.ca, &b.tls.cert, &b.tls.key),
            );
            differs("client.lan", a.lan != b.lan);
            differs("client.advertise", a.advertise != b.advertise);
            differs("client.table", a.client_table != b.client_table);
            differs("egress", a.egress != b.egress);
            differs("client.dns_stub", a.dns_stub != b.dns_stub);
            differs("client.dns_intercept", a.dns_intercept != b.dns_intercept);
            differs("tunnel.transport", a.transport != b.transport);
            differs("tunnel.fallback_port", a.fallback_port != b.fallback_port);
            differs("tunnel.quic_timeout_ms", a.quic_timeout != b.quic_timeout);
        }
        _ => differs("tunnel", true),
    }
    if !fixed.is_empty() {
        return Err(fixed);
    }
    let (policy, zones, crl) = match (&old.tunnel, &new.tunnel) {
        (Some(a), Some(b)) => (
            a.policy != b.policy,
            a.zones != b.zones,
            a.tls.crl != b.tls.crl,
        ),
        _ => (false, false, false),
    };
    Ok(ReloadChanges {
        routes: old.routes != new.routes,
        policy,
        zones,
        crl,
    })
}

/// The daemon's nftables table when the config names none: one per node name.
fn default_table(node_name: &str) -> String {
    format!("gateway_{}", node_name.replace(['-', '.'], "_"))
}

fn check_table_name(table: &str) -> Result<(), String> {
    if table.is_empty()
        || table.len() > 64
        || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("{table:?}: use 1-64 letters, digits and '_'"));
    }
    Ok(())
}

fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "must be 1 to 64 characters, got {} characters",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The kernel's own rules for interface names (IFNAMSIZ and dev_valid_name()).
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "{name:?} is not a valid interface name (1 to 15 bytes)"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "{name:?} is not a valid interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/gateway/test.toml"), text)
    }

    fn only_issue(text: &str) -> ConfigIssue {
        let err = parse_str(text).expect_err("config should be rejected");
        assert_eq!(err.0.len(), 1, "expected one issue, got {err}");
        err.0.into_iter().next().expect("one issue")
    }

    const GOOD: &str = r#"
[node]
name = "vpc-gw-1"
socket = "/run/gw/a.sock"

[dataplane]
interfaces = ["lan0", "eth1"]

[[route]]
cidr = "10.128.0.0/16"

[[route]]
cidr = "fd00:128::/64"
name = "vpc-v6"
"#;

    #[test]
    fn accepts_a_good_config_and_numbers_routes_in_order() {
        let c = parse_str(GOOD).expect("valid");
        assert_eq!(c.node.name, "vpc-gw-1");
        assert_eq!(c.node.socket, PathBuf::from("/run/gw/a.sock"));
        assert_eq!(c.node.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.interfaces, vec!["lan0", "eth1"]);
        let routes: Vec<_> = c
            .routes
            .iter()
            .map(|r| (r.id, r.cidr.to_string(), r.name.clone()))
            .collect();
        assert_eq!(
            routes,
            vec![
                (0, "10.128.0.0/16".to_string(), "10.128.0.0/16".to_string()),
                (1, "fd00:128::/64".to_string(), "vpc-v6".to_string()),
            ]
        );
    }

    #[test]
    fn minimal_config_uses_default_paths() {
        let c = parse_str("[node]\nname = \"n\"\n").expect("valid");
        assert_eq!(c.node.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(c.interfaces.is_empty());
        assert!(c.routes.is_empty());
    }

    #[test]
    fn rejects_cidr_that_is_not_a_cidr_naming_the_key() {
        let issue = only_issue("[node]\nname = \"n\"\n[[route]]\ncidr = \"10.128.0.0/33\"\n");
        assert_eq!(issue.key, "route[0].cidr");
        assert!(issue.reason.contains("is not a CIDR"), "{}", issue.reason);
        assert_eq!(issue.file, PathBuf::from("/etc/gateway/test.toml"));
    }

    #[test]
    fn rejects_cidr_with_host_bits_and_suggests_the_network() {
        let issue = only_issue(
            "[node]\nname = \"n\"\n[[route]]\ncidr = \"10.0.0.0/8\"\n[[route]]\ncidr = \"10.128.0.1/16\"\n",
        );
        assert_eq!(issue.key, "route[1].cidr");
        assert!(issue.reason.contains("10.128.0.0/16"), "{}", issue.reason);
    }

    #[test]
    fn rejects_duplicate_cidr() {
        let issue = only_issue(
            "[node]\nname = \"n\"\n[[route]]\ncidr = \"fd00::/8\"\n[[route]]\ncidr = \"fd00::/8\"\n",
        );
        assert_eq!(issue.key, "route[1].cidr");
        assert!(issue.reason.contains("route[0]"), "{}", issue.reason);
    }

    #[test]
    fn rejects_unknown_key_naming_its_table() {
        let issue = only_issue("[node]\nname = \"n\"\nsockett = \"/x\"\n");
        assert_eq!(issue.key, "node.sockett");
        assert!(
            issue.reason.contains("unknown field `sockett`"),
            "{}",
            issue.reason
        );
    }

    #[test]
    fn rejects_unknown_key_inside_an_array_of_tables() {
        let issue =
            only_issue("[node]\nname = \"n\"\n[[route]]\ncidr = \"10.0.0.0/8\"\nvia = \"x\"\n");
        assert_eq!(issue.key, "route[0].via");
        assert!(issue.reason.contains("via"), "{}", issue.reason);
    }

    #[test]
    fn rejects_unknown_section() {
        let issue = only_issue("[node]\nname = \"n\"\n[tunel]\nlisten = \"x\"\n");
        assert!(issue.reason.contains("tunel"), "{}", issue.reason);
    }

    #[test]
    fn rejects_wrong_type_naming_the_key() {
        let issue = only_issue("[node]\nname = \"n\"\n[dataplane]\ninterfaces = \"lan0\"\n");
        assert_eq!(issue.key, "dataplane.interfaces");
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let issue = only_issue("[node]\nname = \"n\"\n[[route]\n");
        assert!(issue.key.starts_with("line 3"), "{}", issue.key);
    }

    #[test]
    fn missing_node_section_is_named() {
        let issue = only_issue("[[route]]\ncidr = \"10.0.0.0/8\"\n");
        assert!(issue.reason.contains("node"), "{issue}");
    }

    #[test]
    fn reports_every_semantic_issue_at_once() {
        let err = parse_str(
            "[node]\nname = \"bad name\"\nsocket = \"rel.sock\"\n[dataplane]\ninterfaces = [\"a/b\", \"x\", \"x\"]\n[[route]]\ncidr = \"nope\"\n",
        )
        .expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "node.name",
                "node.socket",
                "dataplane.interfaces[0]",
                "dataplane.interfaces[2]",
                "route[0].cidr"
            ]
        );
    }

    #[test]
    fn display_names_file_key_and_reason() {
        let err = parse_str("[node]\nname = \"n\"\n[[route]]\ncidr = \"x\"\n").expect_err("bad");
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/gateway/test.toml: route[0].cidr: \"x\" is not a CIDR"),
            "{text}"
        );
    }

    const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

    #[test]
    fn a_connector_config_validates_with_policy_and_egress() {
        let c = parse_str(&format!(
            "[node]\nname = \"vpc-gw-1\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\"]\n\
             advertise = [\"192.0.2.0/24\"]\n"
        ))
        .expect("valid");
        let t = c.tunnel.expect("tunnel");
        assert_eq!(
            t.policy[0].advertise,
            ["192.0.2.0/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(
            t.role,
            Role::Connector {
                listen: "0.0.0.0:7844".parse().expect("addr")
            }
        );
        let e = t.egress.expect("egress");
        assert_eq!(
            (e.ports, e.table.as_str()),
            ((40000, 40999), "gateway_vpc_gw_1")
        );
        assert_eq!(t.tun, DEFAULT_TUN);
        assert_eq!(
            t.transport,
            Transport::Auto,
            "QUIC with the TCP fallback by default"
        );
        assert_eq!(t.quic_timeout, std::time::Duration::from_millis(1500));
        assert_eq!(t.fallback_port, None, "the fallback uses the tunnel's port");
    }

    #[test]
    fn inbound_rules_and_a_site_gateways_table_are_read_and_checked() {
        let c = parse_str(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [[policy]]\nidentity = \"ops-*\"\ninbound = [\"10.128.0.0/16 tcp/9100\"]\n"
        ))
        .expect("valid");
        let t = c.tunnel.expect("tunnel");
        assert_eq!(
            t.policy[0].inbound,
            vec![Rule::parse("10.128.0.0/16 tcp/9100").expect("rule")]
        );
        assert!(t.policy[0].allow.is_empty());
        let issue = only_issue(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [[policy]]\nidentity = \"ops-*\"\ninbound = [\"10.128.0.0/16 tcp/0\"]\n"
        ));
        assert_eq!(issue.key, "policy[0].inbound[0]");

        let site = |client: &str| {
            format!(
                "[node]\nname = \"site-1\"\n[tunnel]\nconnect = [\"gw:1\"]\n{TLS}[client]\n{client}"
            )
        };
        let c = parse_str(&site("lan = [\"eth1\"]\n")).expect("valid");
        assert_eq!(
            c.tunnel.expect("tunnel").client_table.as_deref(),
            Some("gateway_site_1"),
            "a site gateway owns a table named after the node by default"
        );
        let c = parse_str(&site(
            "advertise = [\"192.0.2.0/24\"]\ntable = \"gw_site\"\n",
        ))
        .expect("valid");
        assert_eq!(
            c.tunnel.expect("tunnel").client_table.as_deref(),
            Some("gw_site")
        );
        let c = parse_str(&site("dns_stub = \"127.0.0.53:53\"\n")).expect("valid");
        assert_eq!(
            c.tunnel.expect("tunnel").client_table,
            None,
            "a workstation forwards nothing"
        );
        assert_eq!(only_issue(&site("table = \"t\"\n")).key, "client.table");
        assert_eq!(
            only_issue(&site("lan = [\"eth1\"]\ntable = \"a-b\"\n")).key,
            "client.table"
        );
    }

    #[test]
    fn a_client_expects_the_name_or_address_it_dials_unless_told_otherwise() {
        let by_ip = parse_str(&format!(
            "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"[2001:db8::1]:7844\"]\n{TLS}"
        ))
        .expect("an address is checked against the certificate's IP SANs");
        assert!(
            matches!(by_ip.tunnel.expect("tunnel").role, Role::Client { server_name, .. } if server_name == "2001:db8::1")
        );
        let issue = only_issue(&format!(
            "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"gw:7844\"]\nserver_name = \"a b\"\n{TLS}"
        ));
        assert_eq!(issue.key, "tunnel.server_name");
        let c = parse_str(&format!(
            "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\nsource_port = 7844\n{TLS}"
        ))
        .expect("a host name is the server name");
        match c.tunnel.expect("tunnel").role {
            Role::Client {
                server_name,
                source_port,
                ..
            } => assert_eq!(
                (server_name.as_str(), source_port),
                ("gw.example.net", 7844)
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tunnel_mistakes_name_their_keys() {
        let cases = [
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\nconnect = [\"a:1\"]\n",
                "tunnel.connect",
            ),
            ("[tunnel]\nlisten = \"7844\"\n", "tunnel.listen"),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\n[metrics]\nlisten = \"localhost\"\n",
                "metrics.listen",
            ),
            ("[tunnel]\nconnect = [\"gw\"]\n", "tunnel.connect[0]"),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nallow = [\"10.0.0.0/8\", \"10.0.0.0/8 tcp/0\"]\n",
                "policy[0].allow[1]",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nadvertise = [\"192.0.2.0/24\", \"192.0.2.1/24\"]\n",
                "policy[0].advertise[1]",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nadvertise = [\"0.0.0.0/0\"]\n",
                "policy[0].advertise[0]",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\n[egress]\ninterface = \"e\"\nport_range = \"1-99999\"\n",
                "egress.port_range",
            ),
            (
                "[tunnel]\nconnect = [\"gw:1\"]\n[egress]\ninterface = \"e\"\nport_range = \"40000-40001\"\n",
                "egress",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\noverlay = \"100.64.0.0/31\"\n",
                "tunnel.overlay",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\ntransport = \"udp\"\n",
                "tunnel.transport",
            ),
            (
                "[tunnel]\nlisten = \"0.0.0.0:1\"\ntransport = \"quic\"\nfallback_port = 443\n",
                "tunnel.fallback_port",
            ),
            (
                "[tunnel]\nconnect = [\"gw:1\"]\nquic_timeout_ms = 10\n",
                "tunnel.quic_timeout_ms",
            ),
        ];
        for (section, key) in cases {
            let issue = only_issue(&format!("[node]\nname = \"n\"\n{section}{TLS}"));
            assert_eq!(issue.key, key, "{section}: {issue}");
        }
        let issue = only_issue("[node]\nname = \"n\"\n[tunnel]\nlisten = \"0.0.0.0:1\"\n");
        assert_eq!(issue.key, "tls");
        let issue = only_issue("[node]\nname = \"n\"\nlog_level = \"loud\"\n");
        assert_eq!(issue.key, "node.log_level");
        let c = parse_str(
            "[node]\nname = \"n\"\nlog_level = \"debug\"\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
        )
        .expect("valid");
        assert_eq!(c.node.log_level, "debug");
        assert_eq!(c.metrics, Some("127.0.0.1:9469".parse().expect("addr")));
    }

    #[test]
    fn reload_applies_routes_policy_and_zones_and_refuses_the_rest() {
        let base = format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\"]\n"
        );
        let old = parse_str(&base).expect("valid");
        assert_eq!(reload_changes(&old, &old), Ok(ReloadChanges::default()));
        let more = parse_str(&format!(
            "{base}[[route]]\ncidr = \"10.129.0.0/16\"\n[[dns.zone]]\ndomain = \"x.internal\"\n\
             servers = [\"10.129.0.2\"]\n[[policy]]\nidentity = \"dev-*\"\nallow = [\"10.129.0.0/16\"]\n"
        ))
        .expect("valid");
        let changes = reload_changes(&old, &more).expect("reloadable");
        assert_eq!(
            changes,
            ReloadChanges {
                routes: true,
                policy: true,
                zones: true,
                crl: false,
            }
        );
        let with_crl = parse_str(&base.replace(
            "key = \"/p/n.key\"\n",
            "key = \"/p/n.key\"\ncrl = \"/p/crl.pem\"\n",
        ))
        .expect("valid");
        assert_eq!(
            reload_changes(&old, &with_crl).map(|c| c.crl),
            Ok(true),
            "[tls] crl applies live; ca, cert and key do not"
        );
        let other_ca = parse_str(&base.replace("/p/ca.pem", "/q/ca.pem")).expect("valid");
        assert_eq!(reload_changes(&old, &other_ca), Err(vec!["tls"]));
        assert!(changes.any());
        let moved = parse_str(&base.replace("0.0.0.0:7844", "0.0.0.0:7845")).expect("valid");
        assert_eq!(
            reload_changes(&old, &moved),
            Err(vec!["tunnel.listen/connect"])
        );
        let renamed = parse_str(&base.replace("name = \"gw\"", "name = \"gw2\"")).expect("valid");
        assert_eq!(reload_changes(&old, &renamed), Err(vec!["node"]));
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/gateway.toml"
        ));
        let c = load(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.routes.len(), 1);
        // `cargo xtask install` puts these in /etc/gateway/examples: they must load as shipped.
        for (example, connector) in [("connector.toml", true), ("client.toml", false)] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(example);
            let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
            let role = c.tunnel.expect("a tunnel").role;
            assert_eq!(
                matches!(role, Role::Connector { .. }),
                connector,
                "{example}"
            );
        }
    }

    #[test]
    fn interface_names_follow_kernel_rules() {
        assert!(check_interface_name("eth0").is_ok());
        assert!(check_interface_name("a-very-long-nam").is_ok());
        assert!(check_interface_name("a-very-long-name").is_err());
        assert!(check_interface_name("").is_err());
        assert!(check_interface_name("..").is_err());
        assert!(check_interface_name("eth0:1").is_err());
    }
}
