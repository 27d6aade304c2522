//! The tunnel's decisions as deterministic state machines, in the shape of quinn-proto and
//! firezone's gateway: no sockets, no clock reads, no tasks. The drivers in `tunnel` feed them
//! inputs and carry out what they ask.
//!
//! Each role ([`Connector`], [`Client`]) takes inputs as `handle_*(now, ..)` calls — a link up or
//! down, a control message, a route change's outcome, a timer — and is then drained, in this
//! order, after every input:
//! 1. `poll_transmit` until `None`: control messages to send, each on the link it names;
//! 2. `poll_event` until `None`: effects for the driver (routes, closing links, dialling);
//! 3. `datapath` when `datapath_version` moved: the snapshot the packet loops read;
//! 4. `poll_timeout`: when to call `handle_timeout` next.
//!
//! Packets never queue here: [`datapath::Datapath`] decides each one on the spot, lock-free.

pub mod client;
pub mod connector;
pub mod datapath;
pub mod dial;
pub mod drops;
pub mod forwarder;
pub mod hub;
pub mod leases;
pub mod table;

#[cfg(test)]
mod forwarder_tests;
#[cfg(test)]
mod pair;
#[cfg(test)]
mod pair_tls;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use client::{Client, ClientConfig, ClientEvent};
pub use connector::{Connector, ConnectorConfig, ConnectorEvent};

use crate::core::control::Control;

/// How long a peer has to finish the hello exchange once its link is up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals kept for status: the newest ones.
pub const MAX_REFUSALS: usize = 20;

/// A link as the driver numbers it: unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// What carries a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// QUIC: packets in DATAGRAM frames, control and DNS on streams.
    Quic,
    /// The TLS-over-TCP fallback: everything as frames on one byte stream.
    Tcp,
}

impl LinkKind {
    pub const fn name(self) -> &'static str {
        match self {
            LinkKind::Quic => "quic",
            LinkKind::Tcp => "tcp",
        }
    }
}

/// A link whose TLS handshake succeeded: the peer's identity is its certificate's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub kind: LinkKind,
    pub remote: SocketAddr,
    pub identity: String,
    /// The largest IP packet one send carries now, if known.
    pub max_packet: Option<usize>,
    /// Where the packet path sends this peer's packets.
    pub sink: datapath::Sink,
}

/// A control message to send on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub link: LinkId,
    pub msg: Control,
}

/// A refused peer, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub identity: Option<String>,
    pub remote: SocketAddr,
    pub reason: String,
    pub at: Instant,
}

/// The newest [`MAX_REFUSALS`] refusals.
#[derive(Debug, Clone, Default)]
pub struct Refusals(std::collections::VecDeque<Refusal>);

impl Refusals {
    pub fn push(&mut self, r: Refusal) {
        if self.0.len() == MAX_REFUSALS {
            self.0.pop_front();
        }
        self.0.push_back(r);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Refusal> {
        self.0.iter()
    }
}

/// A peer's release and protocol as status shows them: `0.2.0 (protocol 1)`, or `protocol 1`
/// from a release that did not say (0.1.0).
pub fn peer_version(version: u32, software: Option<&str>) -> String {
    match software {
        Some(s) => format!("{} (protocol {version})", crate::core::text::clean(s, 32)),
        None => format!("protocol {version}"),
    }
}

/// "1.5 s", "5 s": durations as status and refusals print them.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// A small deterministic generator for jitter: seeded by the driver (randomly) or a test.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// xorshift64*: plenty for spreading reconnects apart and picking query IDs that an
    /// off-path attacker must guess (the driver seeds it from the OS's randomness).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..=max`.
    pub fn upto(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis() as u64;
        Duration::from_millis(self.next_u64() % (ms + 1))
    }
}

/// Seconds since the Unix epoch at `t`, given the wall clock's reading `unix_at_base` at
/// `base` (before or after `t`). A driver passes one fixed pair, so a time reads the same at
/// every status.
pub fn unix_at(base: Instant, unix_at_base: u64, t: Instant) -> u64 {
    match t.checked_duration_since(base) {
        Some(after) => unix_at_base.saturating_add(after.as_secs()),
        None => unix_at_base.saturating_sub(base.saturating_duration_since(t).as_secs()),
    }
}

/// One live peer as status shows it: what the node knows, and its path's live counters.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    pub link: LinkId,
    pub info: LinkInfo,
    pub reason: String,
    /// Its release and protocol version, as it said.
    pub version: String,
    pub addresses: (std::net::Ipv4Addr, std::net::Ipv6Addr),
    /// Connector: the client's accepted advertised prefixes.
    pub advertised: Vec<ipnet::IpNet>,
    pub rtt: Duration,
    /// Seconds since the Unix epoch.
    pub since: u64,
    pub path: std::sync::Arc<datapath::PeerPath>,
}

impl PeerSnapshot {
    /// The status line of this peer; `ping_ms` is the driver's to fill in.
    pub fn status(&self) -> crate::api::PeerStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.path.counters;
        crate::api::PeerStatus {
            identity: self.info.identity.clone(),
            version: self.version.clone(),
            remote: self.info.remote.to_string(),
            transport: self.info.kind.name().into(),
            transport_reason: self.reason.clone(),
            address_v4: self.addresses.0.to_string(),
            address_v6: self.addresses.1.to_string(),
            advertised: self.advertised.iter().map(|n| n.to_string()).collect(),
            rtt_ms: self.rtt.as_secs_f64() * 1000.0,
            connected_since: self.since,
            connection_id: self.link.0,
            max_datagram: self.path.max_packet().unwrap_or(0) as u64,
            tx_packets: c.tx_packets.load(Relaxed),
            tx_bytes: c.tx_bytes.load(Relaxed),
            rx_packets: c.rx_packets.load(Relaxed),
            rx_bytes: c.rx_bytes.load(Relaxed),
            policy_drops: c.policy_drops.load(Relaxed),
            ping_ms: None,
        }
    }
}

impl Refusal {
    pub fn to_api(&self, now: Instant, unix_now: u64) -> crate::api::Refusal {
        crate::api::Refusal {
            identity: self.identity.clone(),
            remote: self.remote.to_string(),
            reason: self.reason.clone(),
            at: unix_at(now, unix_now, self.at),
        }
    }
}
