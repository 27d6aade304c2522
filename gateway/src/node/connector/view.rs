//! What a connector shows of itself: the datapath snapshot it publishes (and the TUN MTU that
//! follows its largest peer path), and its sessions and refusals for status.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::{Connector, ConnectorEvent};
use crate::node::datapath::Datapath;
use crate::node::{LinkId, Refusal};

impl Connector {
    /// Builds the snapshot the packet path reads, and follows the largest path with the MTU.
    pub(super) fn publish(&mut self) {
        let mut peers = Vec::new();
        let mut routes = Vec::new();
        for link in self.current.values() {
            let Some(p) = self.sessions.get(link).and_then(|s| s.peer.clone()) else {
                continue;
            };
            let i = peers.len();
            routes.push((IpNet::from(IpAddr::V4(p.far_end.0)), i));
            routes.push((IpNet::from(IpAddr::V6(p.far_end.1)), i));
            if let Some(s) = self.sessions.get(link) {
                routes.extend(s.prefixes.iter().map(|n| (*n, i)));
            }
            peers.push(p);
        }
        self.datapath = Arc::new(Datapath::build(
            self.drops.clone(),
            peers,
            routes,
            Vec::new(),
            false,
        ));
        self.version += 1;
        self.follow_mtu();
    }

    /// The path of `link` changed (QUIC MTU discovery, RTT).
    pub fn handle_path(&mut self, link: LinkId, max_packet: Option<usize>, rtt: Duration) {
        let Some(s) = self.sessions.get_mut(&link) else {
            return;
        };
        s.rtt = rtt;
        s.info.max_packet = max_packet;
        if let Some(p) = &s.peer {
            p.max_packet
                .store(max_packet.unwrap_or(0), Ordering::Relaxed);
        }
        self.follow_mtu();
    }

    /// The TUN carries the largest packet any peer's path does; a peer with a smaller path is
    /// answered "too big" for itself alone.
    pub(super) fn follow_mtu(&mut self) {
        let largest = self
            .datapath
            .peers()
            .iter()
            .filter_map(|p| p.max_packet())
            .max()
            .and_then(|m| u32::try_from(m).ok());
        if let Some(mtu) = largest
            && mtu != self.tun_mtu
        {
            self.tun_mtu = mtu;
            self.events.push_back(ConnectorEvent::SetTunMtu(mtu));
        }
    }

    pub fn datapath(&self) -> Arc<Datapath> {
        self.datapath.clone()
    }

    /// Moves whenever [`datapath`](Self::datapath) is a new snapshot.
    pub fn datapath_version(&self) -> u64 {
        self.version
    }

    /// The live sessions, as status lists them.
    pub fn peers(&self, now: Instant, unix_now: u64) -> Vec<crate::node::PeerSnapshot> {
        let mut v: Vec<_> = self
            .current
            .values()
            .filter_map(|l| self.sessions.get(l).map(|s| (l, s)))
            .filter_map(|(l, s)| {
                let path = s.peer.clone()?;
                Some(crate::node::PeerSnapshot {
                    link: *l,
                    info: s.info.clone(),
                    reason: s.reason.clone(),
                    version: s.version.clone(),
                    addresses: path.far_end,
                    advertised: s.prefixes.clone(),
                    rtt: s.rtt,
                    since: crate::node::unix_at(now, unix_now, s.since),
                    path,
                })
            })
            .collect();
        v.sort_by_key(|p| p.link);
        v
    }

    pub fn refusals(&self) -> impl Iterator<Item = &Refusal> {
        self.refusals.iter()
    }

    /// Records a refusal decided outside the node (a TLS handshake the driver saw fail).
    pub fn record_refusal(&mut self, r: Refusal) {
        self.refusals.push(r);
    }
}
