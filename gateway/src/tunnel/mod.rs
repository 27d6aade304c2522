//! The tunnel: IP packets in QUIC DATAGRAM frames between a client and a connector, through a
//! TUN device on each end.
//!
//! ```text
//!  client host                                        connector (VPC gateway)
//!  app ─ route ─▶ TUN ─▶ datagram ══ QUIC/UDP ══▶ policy ─▶ TUN ─▶ kernel forwards ─▶ VPC
//!  app ◀────────── TUN ◀─ datagram ◀══════════════ peer by dst ◀─ TUN ◀─ route (overlay) ◀─ VPC
//! ```
//!
//! Control (hello, welcome or refusal) travels on one bidirectional stream per connection.
//! Where UDP does not get through, the same messages, packets and DNS queries travel as frames
//! on TLS 1.3 over TCP (`link`), and the client keeps probing QUIC to move back to it.
//! Decisions (policy, packet parsing) are the sans-IO `core`; this module is the IO around it.

pub mod access;
mod client;
pub mod control;
pub mod dns;
mod dns_serve;
pub mod engine;
pub mod filter;
mod keepalive;
pub mod link;
pub mod nat;
pub mod net;
pub mod nftdump;
mod peer_routes;
pub mod probe;
mod reader;
pub mod tls;

pub use engine::{TunnelHandle, start};

/// Called on a client with the routes and DNS zones (lowercase wire names) the connector sent
/// and the TUN's ifindex, so the eBPF programs can count them and steer traffic into the TUN.
pub type RoutesHook =
    std::sync::Arc<dyn Fn(&[ipnet::IpNet], &[Vec<u8>], u32) -> anyhow::Result<()> + Send + Sync>;
