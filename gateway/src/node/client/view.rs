//! What the client shows of itself: the datapath snapshot it publishes, its state for status,
//! and the peer path it builds for the connector.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Client, ClientEvent, State};
use crate::node::datapath::{Counters, Datapath, PeerPath};
use crate::node::leases::{nth_v4, nth_v6};
use crate::node::table::PrefixTable;
use crate::node::{LinkId, LinkInfo, Refusal};

impl Client {
    pub fn datapath(&self) -> Arc<Datapath> {
        self.datapath.clone()
    }

    pub fn datapath_version(&self) -> u64 {
        self.version
    }

    /// One line for status: connecting, connected (how), or why it is reconnecting.
    pub fn status_line(&self) -> &str {
        &self.status_line
    }

    /// The connector, while the tunnel is up, as status lists it.
    pub fn peers(&self, now: Instant, unix_now: u64) -> Vec<crate::node::PeerSnapshot> {
        match &self.state {
            State::Up(up) => vec![crate::node::PeerSnapshot {
                link: up.link,
                info: up.info.clone(),
                reason: up.reason.clone(),
                version: up.version.clone(),
                addresses: (up.v4.addr(), up.v6.addr()),
                advertised: Vec::new(),
                rtt: up.rtt,
                since: crate::node::unix_at(now, unix_now, up.since),
                path: up.peer.clone(),
            }],
            _ => Vec::new(),
        }
    }

    pub fn refusals(&self) -> impl Iterator<Item = &Refusal> {
        self.refusals.iter()
    }

    /// Offered routes not installed, with why.
    pub fn rejected_routes(&self) -> &[(IpNet, String)] {
        &self.rejected
    }

    /// The learned zones (dotted).
    pub fn zones(&self) -> &[String] {
        &self.zones
    }

    pub(super) fn close(&mut self, link: LinkId, reason: &str) {
        self.events.push_back(ClientEvent::CloseLink {
            link,
            code: 0,
            reason: reason.into(),
        });
    }

    pub(super) fn peer_path(
        name: &str,
        link: LinkId,
        info: &LinkInfo,
        v4: Ipv4Net,
        v6: Ipv6Net,
        counters: Option<&Arc<Counters>>,
    ) -> Arc<PeerPath> {
        // The connector is host 1 of the overlay: ICMP too-big comes from there, as a router
        // on the path would send it (an address of this node would be dropped as a martian).
        let far_v4 = nth_v4(v4.trunc(), 1).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let far_v6 = nth_v6(v6.trunc(), 1).unwrap_or(Ipv6Addr::UNSPECIFIED);
        Arc::new(PeerPath {
            link,
            sink: info.sink.clone(),
            identity: name.into(),
            far_end: (far_v4, far_v6),
            sources: PrefixTable::default(),
            rules: None,
            max_packet: info.max_packet.unwrap_or(0).into(),
            counters: counters.cloned().unwrap_or_default(),
        })
    }

    /// Everything routed into a client's TUN goes to its connector, while there is one.
    pub(super) fn publish(&mut self, peer: Option<Arc<PeerPath>>) {
        let everything = [
            (IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), 0),
            (IpNet::from(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), 0),
        ]
        .map(|(n, i)| (IpNet::new(n.addr(), 0).unwrap_or(n), i));
        let zones = self
            .zones
            .iter()
            .filter_map(|z| crate::core::dns::wire_name(z).ok())
            .collect();
        self.datapath = Arc::new(match peer {
            Some(p) => Datapath::build(self.drops.clone(), vec![p], everything, zones, true),
            None => Datapath::build(self.drops.clone(), Vec::new(), [], Vec::new(), true),
        });
        self.version += 1;
    }
}
