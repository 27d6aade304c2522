//! What the daemon and `gatewayctl` say to each other over the status socket.
//!
//! One JSON request line, one JSON response line. `gatewayctl status --json` prints exactly
//! [`Status`]; its fields are documented in the README and only ever added to within a
//! [`STATUS_SCHEMA`] version.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the [`Status`] JSON. Bumped only when a field changes meaning or disappears.
pub const STATUS_SCHEMA: u32 = 1;

/// Longest request or response line accepted, so a confused peer cannot make either side
/// buffer without bound.
pub const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Error { message: String },
}

/// The daemon's state as `gatewayctl status` shows it. Counters are read from the kernel's maps
/// at the moment of the request, and attached programs are what the kernel reports, not what
/// the daemon believes it attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema: u32,
    /// Version of the running gatewayd.
    pub version: String,
    /// `[node] name`.
    pub node: String,
    pub pid: u32,
    /// Absolute path of the config file the daemon runs with.
    pub config: PathBuf,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_secs: u64,
    /// One entry per configured `[dataplane] interfaces`, in config order.
    pub interfaces: Vec<InterfaceStatus>,
    /// One entry per `[[route]]`, in config order.
    pub routes: Vec<RouteStatus>,
    /// Classifier totals over all interfaces, by counter name (`matched`, `unmatched`,
    /// `not_ip`, `malformed`, `bad_route_id`).
    pub classifier: BTreeMap<String, u64>,
    /// Present when the node runs a tunnel (connector or client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatus>,
    /// One entry per `[client] dns_intercept` interface: `classifier_attached` means the DNS
    /// steering program is at its TCX egress; `programs` are every TCX egress program there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_egress: Vec<InterfaceStatus>,
    /// The latest reload (SIGHUP), if any: when, and what it did or why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadStatus>,
    /// ICMP echo sockets: `net.ipv4.ping_group_range` and whether probes can work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpStatus>,
    /// With a tunnel: this node's own certificate (`[tls] cert`) and the CRL in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
}

/// What `gatewayctl status` shows under `icmp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IcmpStatus {
    /// The sysctl's current value in the daemon's namespace.
    pub ping_group_range: String,
    /// The daemon's group.
    pub gid: u32,
    /// Whether the daemon changes the sysctl (`[icmp] manage_ping_group_range`).
    pub managed: bool,
    /// Whether an ICMP echo socket opens right now (tried, not inferred).
    pub probes_possible: bool,
    /// When probes are impossible: the command that fixes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// This node's certificate as loaded at start, and the revocation list as of the last reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsStatus {
    /// The certificate's name.
    pub identity: String,
    /// `client`, `connector` or `hub` (from its extended key usage).
    pub profile: String,
    /// Hexadecimal, as `gatewayctl pki list` shows it.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// Whole days left; negative once expired.
    pub expires_in_days: i64,
    /// Set within 30 days of expiry, after it, or when the CRL in force lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// `[tls] crl`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<CrlStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrlStatus {
    pub path: PathBuf,
    /// Certificates it lists.
    pub revoked: u64,
    /// Its CRL number: grows with each `pki revoke`.
    pub number: u64,
    /// When `pki revoke` signed it, seconds since the Unix epoch.
    pub issued_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// False when the new config was refused; the daemon then runs the old one, unchanged.
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// `connector` or `client`.
    pub role: String,
    /// Name of the TUN device.
    pub tun: String,
    /// Current TUN MTU: the largest packet one QUIC datagram carries (0 before any peer).
    pub mtu: u32,
    /// One line: listening, connected, or why it is reconnecting.
    pub state: String,
    pub peers: Vec<PeerStatus>,
    /// The latest refusals of authenticated peers (20) and the latest failed handshakes (5),
    /// oldest first, with why.
    pub refusals: Vec<Refusal>,
    /// Packets dropped by the tunnel, by reason (`policy`, `spoofed_source`, `too_big`, ...).
    pub drops: BTreeMap<String, u64>,
    /// Private DNS zones: on a connector with their resolvers' health; on a client those it
    /// learned (without resolvers).
    #[serde(default)]
    pub zones: Vec<ZoneStatus>,
    /// Connector: the pinned egress port range and whether the kernel keeps its ephemeral
    /// ports out of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ports: Option<String>,
    /// Connector: the daemon's nftables table as the kernel has it now (present or MISSING)
    /// and what it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<String>,
    /// Connector: `gatewayctl access` byte streams open now, and opened since start.
    #[serde(default)]
    pub access_streams_active: u64,
    #[serde(default)]
    pub access_streams_total: u64,
    /// Connector: what a bound refused or dropped, by name: `dns_rate`, `dns_in_flight_peer`,
    /// `dns_in_flight_global`, `dns_resolver_busy`, `frame_too_long`, `control_rate`,
    /// `advertise_refused`, `descriptors_low`, ...; client: `learned_route_refused`, ...
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// Connector: connections that never authenticated, by reason: `tls_failed`, `timed_out`,
    /// `over_capacity`, `over_capacity_per_source`, `no_name`, `bad_name`.
    #[serde(default)]
    pub handshake_failures: BTreeMap<String, u64>,
    /// Connector and site gateway: the forward filter in the daemon's nftables table, with its
    /// counters as the kernel has them now; absent when the table is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_filter: Option<ForwardFilterStatus>,
    /// Hub: the connectors linked to it and the client sessions it relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubStatus>,
    /// Client through a hub: the hub's address (its peer is the connector behind it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_hub: Option<String>,
    /// Client: whether systemd-resolved sends the zones' names to the DNS stub (`[client] dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<ResolvedStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HubStatus {
    pub connectors: Vec<HubConnectorStatus>,
    pub clients: Vec<HubClientStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubConnectorStatus {
    /// The connector's certificate name.
    pub identity: String,
    /// Its replica group: connectors of one group serve the same routes.
    pub group: String,
    /// What it says it serves (shown only; the hub routes nothing).
    pub routes: Vec<String>,
    pub remote: String,
    /// `quic` or `tcp`: its outer link to the hub.
    pub transport: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
    /// Client sessions relayed to it now.
    pub sessions: u64,
    /// Its packets travel beside the outer link as relayed UDP (docs/hub.md), not inside it.
    #[serde(default)]
    pub relayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubClientStatus {
    pub identity: String,
    /// The connector its session goes to.
    pub connector: String,
    pub remote: String,
    pub transport: String,
    pub since: u64,
    /// Bytes relayed both ways (sealed end to end; the hub reads none of them).
    pub bytes_relayed: u64,
    /// As for a connector: packets beside the outer link, not inside it.
    #[serde(default)]
    pub relayed: bool,
}

/// Client: systemd-resolved's settings for the TUN link, as this daemon last made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedStatus {
    /// The integration is in use (`[client] dns = "resolved"`, or unset with resolved running).
    pub on: bool,
    /// Why on or off: the config, or what the system bus said at start.
    pub reason: String,
    /// The stub resolved is pointed at (`ADDRESS:PORT`), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stub: Option<String>,
    /// Routing domains (`~zone`) set on the link now; empty when nothing is set.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Zones the connector announced that were not set, with why.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// The latest failure talking to resolved; cleared when a later attempt succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardFilterStatus {
    pub table: String,
    /// Packets dropped, by what they tried: `into_vpc` (to the VPC from anywhere but the
    /// tunnel), `into_tunnel` (a new connection into the tunnel no rule allows, e.g. a VPC host
    /// to a client), `from_tunnel` (out of the tunnel against policy), `other`.
    pub drops: BTreeMap<String, u64>,
    /// Connector: connections VPC hosts opened to clients as an `inbound` rule allows.
    #[serde(default)]
    pub inbound_accepted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneStatus {
    pub domain: String,
    pub queries: u64,
    pub answers: u64,
    /// Times a query moved on to the next resolver.
    pub failovers: u64,
    /// Queries no resolver answered (the client got SERVFAIL from the forwarder).
    pub servfails: u64,
    pub resolvers: Vec<ResolverStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolverStatus {
    pub address: String,
    pub up: bool,
    /// Round trip of its latest answer.
    pub latency_ms: Option<f64>,
    /// Round trip of the latest ICMP echo (echo socket), `None` without a reply or where echo
    /// sockets are not permitted: tells "host down" from "DNS server down".
    #[serde(default)]
    pub ping_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's certificate name.
    pub identity: String,
    /// The peer's release and protocol as its hello or welcome said: `0.2.0 (protocol 1)`;
    /// nodes one protocol version apart work together, so a fleet upgrades one node at a time.
    #[serde(default)]
    pub version: String,
    pub remote: String,
    /// `quic` or `tcp` (the TLS-over-TCP fallback).
    pub transport: String,
    /// Why this transport: e.g. `no QUIC handshake in 1.5 s` for a fallback to TCP.
    #[serde(default)]
    pub transport_reason: String,
    /// The client's overlay addresses.
    pub address_v4: String,
    pub address_v6: String,
    /// Connector: the prefixes the client advertised that its policy granted, routed to it.
    #[serde(default)]
    pub advertised: Vec<String>,
    pub rtt_ms: f64,
    /// Seconds since the Unix epoch.
    pub connected_since: u64,
    /// Stays the same for as long as the connection (QUIC or TCP) lives.
    pub connection_id: u64,
    pub max_datagram: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets from this peer that its policy did not allow.
    pub policy_drops: u64,
    /// Round trip of the latest ICMP echo to the peer's public address (outside the tunnel),
    /// `None` without a reply.
    #[serde(default)]
    pub ping_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub identity: Option<String>,
    pub remote: String,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// True when the kernel reports this daemon's program at the interface's hook.
    pub classifier_attached: bool,
    /// Every program the kernel reports at that hook, ours and others', in run order: TCX
    /// links first, then filters on the clsact qdisc.
    pub programs: Vec<ProgramInfo>,
    /// How this daemon attaches its program there (`[dataplane] attach` on this kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<AttachKind>,
    /// Set when the kernel could not be asked (e.g. the interface disappeared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramInfo {
    /// Kernel program id (as in `bpftool prog show id N`).
    pub id: u32,
    pub name: String,
    /// Whether it is this daemon's classifier.
    pub ours: bool,
    /// How the kernel holds it there: a TCX link, or a filter on the clsact qdisc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AttachKind>,
}

/// How a TC program is attached: a TCX link (Linux 6.6 and later), or a netlink TC filter on a
/// `clsact` qdisc (any kernel this product supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    Tcx,
    Tc,
}

impl AttachKind {
    /// As status shows it to a person.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Tc => "tc (clsact)",
        }
    }

    /// As a metric's label value and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub id: u32,
    pub name: String,
    pub cidr: String,
    /// Packets whose destination this route matched (longest prefix) at a classified interface.
    pub packets: u64,
    /// Their bytes, counted from the IP header on.
    pub bytes: u64,
}

/// Why `gatewayctl` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running (or runs with another socket).
    #[error("gatewayd is not running (no daemon at {socket}: {reason})")]
    NotRunning { socket: PathBuf, reason: String },
    /// The socket exists but we may not use it: access control is by file permission.
    #[error("permission denied on {socket}: the status socket is for root only")]
    PermissionDenied { socket: PathBuf },
    #[error("talking to gatewayd at {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("gatewayd at {socket} answered something that is not a response: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

/// Sends one request and waits (bounded) for its response.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning {
                socket: socket.to_owned(),
                reason: e.to_string(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_owned(),
        },
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol {
        socket: socket.to_owned(),
        reason: e.to_string(),
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        socket: socket.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests;
