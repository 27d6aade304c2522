//! The per-packet decisions, on an immutable snapshot the node publishes whenever its peers
//! change: the packet loops read it without a lock, and a decision allocates nothing.
//!
//! From the TUN: parse, drop multicast, (client) steer DNS for a learned zone, find the peer
//! owning the destination by longest prefix, answer too-big for that peer's path, clamp a
//! SYN's MSS, send. From a peer: parse, drop multicast, (connector) check the source belongs to
//! the peer and that its policy allows the packet, deliver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::LinkId;
use super::drops::{Drop, Drops};
use super::table::PrefixTable;
use crate::core::policy::{Decision, IdentityRules};
use crate::core::{dns, icmp, mss, packet};

/// A peer's traffic counters; they live as long as its session, across snapshots.
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub policy_drops: AtomicU64,
}

impl Counters {
    pub fn sent(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Why a link did not take a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Larger than one packet on this link: answered with ICMP "too big".
    TooBig,
    /// The link's queue has no room right now; nothing was queued or dropped. The packet path
    /// waits ([`PacketSink::send_packet_wait`]) rather than drop: a loss inside the tunnel
    /// costs the inner TCP a retransmit and halves its window, a wait only slows the TUN
    /// reader, and the kernel's queue in front of the TUN pushes back on local senders.
    Full,
    /// Link closed, or the wait for room ran out.
    Dropped,
}

/// A send that waits for room in the link's queue.
pub type SendWait<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SendError>> + Send + 'a>>;

/// Where a peer's packets go: the driver's link. The node only carries it to the packet path,
/// which hands it each packet.
pub trait PacketSink: Send + Sync {
    /// Queues `pkt` if there is room now; never waits and never drops another packet.
    fn send_packet(&self, pkt: &[u8]) -> Result<(), SendError>;

    /// Queues `pkt`, waiting for room: called only after [`send_packet`](Self::send_packet)
    /// said [`SendError::Full`], so the boxing is off the common path.
    fn send_packet_wait<'a>(&'a self, pkt: &'a [u8]) -> SendWait<'a> {
        Box::pin(async move { self.send_packet(pkt) })
    }

    /// The largest packet the link carries right now, when it can tell (QUIC's path MTU
    /// discovery moves it between the node's readings).
    fn max_packet(&self) -> Option<usize> {
        None
    }
}

/// A [`PacketSink`] as a plain value: cloned into every snapshot, equal when it is the same.
#[derive(Clone)]
pub struct Sink(pub Arc<dyn PacketSink>);

impl Sink {
    /// A sink that takes nothing (tests that look at decisions only).
    pub fn none() -> Sink {
        struct Nowhere;
        impl PacketSink for Nowhere {
            fn send_packet(&self, _: &[u8]) -> Result<(), SendError> {
                Err(SendError::Dropped)
            }
        }
        Sink(Arc::new(Nowhere))
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl PartialEq for Sink {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Sink {}

/// What the packet path needs of one peer. Shared by the node and every snapshot.
#[derive(Debug)]
pub struct PeerPath {
    pub link: LinkId,
    /// The link's packet sender.
    pub sink: Sink,
    pub identity: Arc<str>,
    /// Where ICMP too-big for packets towards this peer comes from: on a connector the
    /// client's overlay addresses (the far end of the tunnel, seen from the VPC), on a client
    /// the connector's.
    pub far_end: (Ipv4Addr, Ipv6Addr),
    /// Connector: the sources this peer may send from (its overlay addresses and accepted
    /// prefixes). Empty on a client, which does not police its connector.
    pub sources: PrefixTable<()>,
    /// Connector: the identity's rules; `None` on a client.
    pub rules: Option<IdentityRules>,
    /// The largest IP packet one send carries on this peer's current link; 0 while unknown.
    pub max_packet: AtomicUsize,
    pub counters: Arc<Counters>,
}

impl PeerPath {
    pub fn max_packet(&self) -> Option<usize> {
        match self.max_packet.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

/// One snapshot of the packet path's tables.
#[derive(Debug, Default)]
pub struct Datapath {
    /// Destination prefix → index into `peers`.
    routes: PrefixTable<usize>,
    peers: Vec<Arc<PeerPath>>,
    /// Client: learned DNS zones (wire names) whose queries are relayed, not routed.
    zones: Vec<Vec<u8>>,
    /// Client: no session yet, so an unrouted packet is "tunnel down", not "no peer".
    client: bool,
    pub drops: Arc<Drops>,
}

/// What to do with a packet read from the TUN. A `Drop` returned here was already counted.
#[derive(Debug)]
pub enum FromTun {
    /// Send it (already MSS-clamped) on this peer's link.
    Send(Arc<PeerPath>),
    /// Write `reply[..n]` (an ICMP too-big) back into the TUN; the packet is dropped.
    Reply(usize),
    /// A DNS query for a learned zone: relay it over the link of this peer.
    Dns(Arc<PeerPath>),
    Drop(Drop),
}

impl Datapath {
    pub fn new(drops: Arc<Drops>) -> Datapath {
        Datapath {
            drops,
            ..Datapath::default()
        }
    }

    pub(crate) fn build(
        drops: Arc<Drops>,
        peers: Vec<Arc<PeerPath>>,
        routes: impl IntoIterator<Item = (ipnet::IpNet, usize)>,
        zones: Vec<Vec<u8>>,
        client: bool,
    ) -> Datapath {
        let mut table = PrefixTable::default();
        for (net, i) in routes {
            if i < peers.len() {
                table.insert(net, i);
            }
        }
        Datapath {
            routes: table,
            peers,
            zones,
            client,
            drops,
        }
    }

    pub fn peers(&self) -> &[Arc<PeerPath>] {
        &self.peers
    }

    pub fn peer_by_link(&self, link: LinkId) -> Option<&Arc<PeerPath>> {
        self.peers.iter().find(|p| p.link == link)
    }

    /// The peer owning `dst`, by longest prefix.
    pub fn peer_for(&self, dst: IpAddr) -> Option<&Arc<PeerPath>> {
        self.routes.lookup(dst).and_then(|i| self.peers.get(*i))
    }

    pub fn zones(&self) -> &[Vec<u8>] {
        &self.zones
    }

    /// Decides a packet the kernel routed (or eBPF redirected) into the TUN. `reply` receives an
    /// ICMP too-big when one is due; 1280 bytes is always enough.
    pub fn from_tun(&self, pkt: &mut [u8], reply: &mut [u8]) -> FromTun {
        let meta = match packet::parse(pkt) {
            Ok(m) => m,
            Err(_) => return self.dropped(Drop::MalformedFromTun),
        };
        if meta.dst.is_multicast() {
            return self.dropped(Drop::Multicast);
        }
        // A steered query goes to whichever resolver the application asked, not into a
        // learned route: it is relayed to the connector, whatever its destination.
        if !self.zones.is_empty() && self.is_steered_query(pkt) {
            return match self.peers.first() {
                Some(p) => FromTun::Dns(p.clone()),
                None => self.dropped(Drop::TunnelDown),
            };
        }
        let Some(peer) = self.peer_for(meta.dst) else {
            return self.dropped(if self.client {
                Drop::TunnelDown
            } else {
                Drop::NoPeer
            });
        };
        let Some(max) = peer.max_packet() else {
            // QUIC has not agreed on datagrams yet: the send fails and is counted there.
            return FromTun::Send(peer.clone());
        };
        let mut max = max;
        if pkt.len() > max {
            // The path may have grown since the node last read it: ask the link before
            // answering "too big" (rare: only packets above the size last read).
            if let Some(live) = peer.sink.0.max_packet() {
                peer.max_packet.store(live, Ordering::Relaxed);
                max = live;
            }
        }
        if pkt.len() > max {
            return match self.too_big(peer, pkt, max, reply) {
                Some(n) => FromTun::Reply(n),
                None => FromTun::Drop(Drop::TooBigNoDf),
            };
        }
        mss::clamp(pkt, max);
        FromTun::Send(peer.clone())
    }

    /// Writes the ICMP too-big for `pkt` (larger than `mtu` on `peer`'s path) into `reply`,
    /// counting either outcome. Also called when a send finds the path shrank meanwhile.
    pub fn too_big(
        &self,
        peer: &PeerPath,
        pkt: &[u8],
        mtu: usize,
        reply: &mut [u8],
    ) -> Option<usize> {
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        let (v4, v6) = peer.far_end;
        match icmp::too_big(pkt, mtu, v4, v6, reply) {
            Some(n) => {
                self.drops.count(Drop::TooBigAnswered);
                Some(n)
            }
            None => {
                self.drops.count(Drop::TooBigNoDf);
                None
            }
        }
    }

    fn is_steered_query(&self, pkt: &[u8]) -> bool {
        dns::udp_query(pkt)
            .and_then(|(msg, _)| dns::parse_query(msg).ok())
            .is_some_and(|q| dns::matching_zone(&q.name, &self.zones).is_some())
    }

    /// Decides a packet `peer` sent. `Ok` means write it into the TUN; an `Err` was counted.
    pub fn from_peer(&self, peer: &PeerPath, pkt: &[u8]) -> Result<(), Drop> {
        peer.counters.received(pkt.len());
        let meta = packet::parse(pkt).map_err(|m| self.count(Drop::malformed(m)))?;
        if meta.dst.is_multicast() {
            return Err(self.count(Drop::Multicast));
        }
        let Some(rules) = &peer.rules else {
            return Ok(());
        };
        if peer.sources.lookup(meta.src).is_none() {
            return Err(self.count(Drop::SpoofedSource));
        }
        match rules.decide(&meta) {
            // An answer to an `inbound` connection: the forward filter checks it is one.
            Decision::Allow | Decision::AllowReply => Ok(()),
            Decision::DenyNoRule | Decision::DenyUnknownIdentity => {
                peer.counters.policy_drops.fetch_add(1, Ordering::Relaxed);
                Err(self.count(Drop::Policy))
            }
        }
    }

    fn count(&self, d: Drop) -> Drop {
        self.drops.count(d);
        d
    }

    fn dropped(&self, d: Drop) -> FromTun {
        self.drops.count(d);
        FromTun::Drop(d)
    }
}
