//! The tunnel's IO: IP packets in QUIC DATAGRAM frames between a client and a connector,
//! through a TUN device on each end, around the sans-IO `node` that makes every decision.
//!
//! ```text
//!  client host                                        connector (VPC gateway)
//!  app ─ route ─▶ TUN ─▶ datagram ══ QUIC/UDP ══▶ policy ─▶ TUN ─▶ kernel forwards ─▶ VPC
//!  app ◀────────── TUN ◀─ datagram ◀══════════════ peer by dst ◀─ TUN ◀─ route (overlay) ◀─ VPC
//! ```
//!
//! `engine` composes a role: `connector` or `client` drives its node (one task owning it);
//! `links` runs each link (control in and out, packets in); `datapath` reads the TUN; `dial`
//! opens a client's links and `link` carries control, packets and DNS alike over QUIC or TLS
//! over TCP (`reader`, `relay`); `dns` and `dns_serve` are the connector's forwarder, `stub`
//! the client's relay; `access_server` the connector's side of `gatewayctl access` (`access`);
//! `status` what `gatewayctl status` reads; `tls`, `nat`, `filter`, `nftdump`, `net`, `probe`,
//! `peer_routes` the kernel and crypto around them; `resolved` tells systemd-resolved to
//! send the zones' names to the stub.

mod accept;
pub mod access;
mod access_server;
mod client;
mod connector;
pub mod control;
mod datapath;
mod dial;
pub mod dns;
mod dns_channel;
mod dns_serve;
pub mod engine;
pub mod filter;
mod hub_dial;
mod hub_raw;
pub mod hub_server;
mod hub_uplink;
pub mod hub_wire;
pub mod link;
mod links;
pub mod nat;
pub mod net;
pub mod nftdump;
mod peer_routes;
pub mod probe;
mod raw;
mod reader;
mod relay;
mod resolved;
mod slots;
pub mod status;
mod stub;
pub mod tls;
mod tun_write;
pub mod vsock;

pub use engine::{TunnelHandle, start};
pub use status::Shared;

/// Called on a client with the routes and DNS zones (lowercase wire names) the connector sent
/// and the TUN's ifindex, so the eBPF programs can count them and steer traffic into the TUN.
pub type RoutesHook =
    std::sync::Arc<dyn Fn(&[ipnet::IpNet], &[Vec<u8>], u32) -> anyhow::Result<()> + Send + Sync>;
