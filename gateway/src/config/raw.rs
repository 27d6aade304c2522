//! The file's shape as serde reads it: unknown keys refused, every value still as written,
//! so `validate` can name the key of each mistake.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node: RawNode,
    #[serde(default)]
    pub(super) dataplane: RawDataplane,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    pub(super) tunnel: Option<RawTunnel>,
    pub(super) tls: Option<RawTls>,
    pub(super) client: Option<RawClient>,
    #[serde(default)]
    pub(super) policy: Vec<RawPolicy>,
    pub(super) egress: Option<RawEgress>,
    pub(super) dns: Option<RawDns>,
    pub(super) icmp: Option<RawIcmp>,
    pub(super) metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
    /// Listening beyond loopback on purpose: no warning.
    #[serde(default)]
    pub(super) allow_remote: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIcmp {
    #[serde(default)]
    pub(super) manage_ping_group_range: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    pub(super) zone: Vec<RawZone>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZone {
    pub(super) domain: String,
    pub(super) servers: Vec<String>,
    pub(super) on_servfail: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    pub(super) interface: String,
    pub(super) port_range: String,
    pub(super) table: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    /// `connector`, `client` or `hub`; unset, `listen` means connector and `connect` client.
    pub(super) role: Option<String>,
    /// Connector behind hubs: its replica group; client through hubs: the group it asks for.
    pub(super) group: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) connect: Option<Vec<String>>,
    pub(super) server_name: Option<String>,
    pub(super) source_port: Option<u16>,
    pub(super) tun: Option<String>,
    pub(super) overlay: Option<String>,
    pub(super) overlay_v6: Option<String>,
    pub(super) transport: Option<String>,
    pub(super) fallback_port: Option<u16>,
    pub(super) quic_timeout_ms: Option<u64>,
    /// Through hubs over QUIC: session packets beside the outer link as relayed UDP.
    pub(super) relay: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) crl: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    #[serde(default)]
    pub(super) lan: Vec<String>,
    #[serde(default)]
    pub(super) advertise: Vec<String>,
    pub(super) dns_stub: Option<String>,
    /// `"resolved"` or `"none"`; unset: resolved when it runs.
    pub(super) dns: Option<String>,
    #[serde(default)]
    pub(super) dns_intercept: Vec<String>,
    pub(super) table: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) identity: String,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    #[serde(default)]
    pub(super) advertise: Vec<String>,
    #[serde(default)]
    pub(super) inbound: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: String,
    pub(super) socket: Option<PathBuf>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    #[serde(default)]
    pub(super) interfaces: Vec<String>,
    pub(super) attach: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) cidr: String,
    pub(super) name: Option<String>,
}
