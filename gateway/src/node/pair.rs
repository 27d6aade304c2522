//! A client node and a connector node joined by a simulated network, in the manner of
//! quinn-proto's `Pair`: a clock the test moves, links that can be blocked, cut, made lossy or
//! shrunk, real TLS certificates checked in memory, and a fake kernel route table. No sockets,
//! no threads, no sleeping: a minute of tunnel life runs in milliseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::datapath::FromTun;
use super::drops::{Drop, Drops};
pub use super::pair_tls::{Pki, tls_handshake};
use super::{
    Client, ClientConfig, ClientEvent, Connector, ConnectorConfig, ConnectorEvent, LinkId,
    LinkInfo, LinkKind,
};
use crate::config::{TlsPaths, Transport};
use crate::core::advertise::Grants;
use crate::core::control::Control;
use crate::core::policy::{Entry, Policy, Rule};

pub const CONNECTOR: &str = "lab-gw";
pub const VPC: &str = "10.128.0.0/16";

/// A policy: (identity glob, allow rules, advertise grants) per entry.
pub type PolicySpec = Vec<(&'static str, Vec<&'static str>, Vec<&'static str>)>;

pub fn policy(entries: &[(&'static str, &[&'static str], &[&'static str])]) -> PolicySpec {
    entries
        .iter()
        .map(|(i, a, g)| (*i, a.to_vec(), g.to_vec()))
        .collect()
}

pub fn connector_config(spec: PolicySpec) -> ConnectorConfig {
    let policy = Arc::new(Policy::from_entries(
        spec.iter()
            .map(|(id, allow, _)| Entry {
                identity: id.to_string(),
                rules: allow
                    .iter()
                    .map(|r| Rule::parse(r).expect("rule"))
                    .collect(),
                inbound: Vec::new(),
            })
            .collect(),
    ));
    let grants = Grants::new(spec.iter().map(|(id, _, adv)| {
        (
            id.to_string(),
            adv.iter().map(|a| a.parse().expect("net")).collect(),
        )
    }));
    ConnectorConfig {
        grants,
        overlay_v4: "100.64.0.0/24".parse().expect("net"),
        overlay_v6: "fd00:64::/64".parse().expect("net"),
        routes: vec![VPC.parse().expect("net")],
        zones: vec!["hoge-vpc.com".into()],
        policy,
        max_clients: 100,
    }
}

/// Something in flight on the simulated network.
#[derive(Debug)]
enum Wire {
    ToConnector(LinkId, Control),
    ToClient(LinkId, Control),
    Packet {
        link: LinkId,
        to_connector: bool,
        pkt: Vec<u8>,
    },
    /// A dial's handshake finishes (or fails) now.
    Handshake {
        attempt: u64,
        kind: LinkKind,
    },
    Down(LinkId),
}

/// The simulated network between one client and one connector.
pub struct Pair {
    pub now: Instant,
    pub client: Client,
    pub connector: Connector,
    pub client_tls: TlsPaths,
    pub connector_tls: TlsPaths,
    pub latency: Duration,
    /// Datagrams lost (one in `loss`, 0 for none) and reordered (every other delayed).
    pub loss: u32,
    pub reorder: bool,
    /// The path's MTU for QUIC datagrams and for TCP frames.
    pub quic_mtu: usize,
    pub tcp_mtu: usize,
    pub udp_blocked: bool,
    /// Nothing passes, in either direction.
    pub cut: bool,
    /// The connector's kernel routes: prefix → whose (the daemon's or "kernel").
    pub kernel_routes: BTreeMap<IpNet, String>,
    /// The client's routes into its TUN.
    pub client_routes: HashSet<IpNet>,
    /// Packets the connector wrote into its TUN (towards the VPC) and the client into its own.
    pub delivered_vpc: Vec<Vec<u8>>,
    pub delivered_client: Vec<Vec<u8>>,
    /// ICMP too-big answers written back into a TUN.
    pub answered: Vec<Vec<u8>>,
    pub client_events: Vec<ClientEvent>,
    pub connector_events: Vec<ConnectorEvent>,
    pub tun_mtu: u32,
    wire: Vec<(Instant, u64, Wire)>,
    seq: u64,
    next_link: u64,
    links: HashMap<LinkId, LinkKind>,
    cancelled: HashSet<u64>,
    rng: u64,
    pub client_drops: Arc<Drops>,
    pub connector_drops: Arc<Drops>,
}

impl Pair {
    pub fn new(client: &str, transport: Transport, policy: PolicySpec) -> Pair {
        Pair::with(client, false, transport, connector_config(policy), vec![])
    }

    pub fn with(
        client: &str,
        foreign: bool,
        transport: Transport,
        cfg: ConnectorConfig,
        advertise: Vec<IpNet>,
    ) -> Pair {
        let pki = Pki::get();
        let now = Instant::now();
        let client_drops = Arc::new(Drops::default());
        let connector_drops = Arc::new(Drops::default());
        let mut connector = Connector::new(
            cfg,
            connector_drops.clone(),
            Arc::new(super::drops::Limits::default()),
        );
        connector.set_local_nets(vec![
            "10.128.0.0/16".parse().expect("net"),
            "203.0.113.0/24".parse().expect("net"),
        ]);
        let mut kernel_routes = BTreeMap::new();
        kernel_routes.insert(VPC.parse().expect("net"), "kernel".to_string());
        Pair {
            now,
            client: Client::new(
                ClientConfig {
                    targets: vec!["gw.example:7844".into()],
                    server_name: CONNECTOR.into(),
                    transport,
                    quic_timeout: Duration::from_millis(1500),
                    advertise,
                },
                client_drops.clone(),
                now,
                7,
            ),
            connector,
            client_tls: pki.paths(client, foreign),
            connector_tls: pki.paths(CONNECTOR, false),
            latency: Duration::from_millis(10),
            loss: 0,
            reorder: false,
            quic_mtu: 1400,
            tcp_mtu: 1360,
            udp_blocked: false,
            cut: false,
            kernel_routes,
            client_routes: HashSet::new(),
            delivered_vpc: Vec::new(),
            delivered_client: Vec::new(),
            answered: Vec::new(),
            client_events: Vec::new(),
            connector_events: Vec::new(),
            tun_mtu: 0,
            wire: Vec::new(),
            seq: 0,
            next_link: 1,
            links: HashMap::new(),
            cancelled: HashSet::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            client_drops,
            connector_drops,
        }
    }

    fn send(&mut self, delay: Duration, w: Wire) {
        self.seq += 1;
        self.wire.push((self.now + delay, self.seq, w));
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Runs the simulation until `until` is reached.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.drain();
        loop {
            let next_wire = self.wire.iter().map(|(t, s, _)| (*t, *s)).min();
            let timers = [self.client.poll_timeout(), self.connector.poll_timeout()];
            let next_timer = timers.iter().flatten().min().copied();
            let next = match (next_wire, next_timer) {
                (Some((w, _)), Some(t)) => w.min(t),
                (Some((w, _)), None) => w,
                (None, Some(t)) => t,
                (None, None) => until,
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            if let Some((_, seq)) = next_wire.filter(|(w, _)| *w <= self.now) {
                let i = self
                    .wire
                    .iter()
                    .position(|(_, s, _)| *s == seq)
                    .expect("queued");
                let (_, _, w) = self.wire.swap_remove(i);
                self.deliver(w);
            } else {
                self.client.handle_timeout(self.now);
                self.connector.handle_timeout(self.now);
            }
            self.drain();
        }
    }

    fn deliver(&mut self, w: Wire) {
        let now = self.now;
        match w {
            Wire::ToConnector(link, msg) if self.links.contains_key(&link) => {
                self.connector.handle_control(now, link, msg)
            }
            Wire::ToClient(link, msg) if self.links.contains_key(&link) => {
                self.client.handle_control(now, link, msg)
            }
            Wire::Packet {
                link,
                to_connector,
                pkt,
            } if self.links.contains_key(&link) => {
                if to_connector {
                    let dp = self.connector.datapath();
                    if let Some(peer) = dp.peer_by_link(link)
                        && dp.from_peer(peer, &pkt).is_ok()
                    {
                        self.delivered_vpc.push(pkt);
                    }
                } else {
                    let dp = self.client.datapath();
                    if let Some(peer) = dp.peer_by_link(link)
                        && dp.from_peer(peer, &pkt).is_ok()
                    {
                        self.delivered_client.push(pkt);
                    }
                }
            }
            Wire::Handshake { attempt, kind } => self.handshake(attempt, kind),
            Wire::Down(link) if self.links.remove(&link).is_some() => {
                self.client
                    .handle_link_down(now, link, "the link closed".into());
                self.connector.handle_link_down(now, link);
            }
            _ => {}
        }
    }

    fn handshake(&mut self, attempt: u64, kind: LinkKind) {
        let now = self.now;
        if self.cancelled.contains(&attempt) {
            return;
        }
        let blocked = self.cut || (kind == LinkKind::Quic && self.udp_blocked);
        if blocked {
            // Nothing answers: the client's own deadline ends the attempt.
            return;
        }
        match tls_handshake(&self.client_tls, &self.connector_tls) {
            Ok((client_identity, connector_identity)) => {
                let link = LinkId(self.next_link);
                self.next_link += 1;
                self.links.insert(link, kind);
                let mtu = match kind {
                    LinkKind::Quic => self.quic_mtu,
                    LinkKind::Tcp => self.tcp_mtu,
                };
                let remote: SocketAddr = "203.0.113.10:7844".parse().expect("addr");
                let client_remote: SocketAddr = "198.51.100.10:7844".parse().expect("addr");
                self.connector.handle_link_up(
                    now,
                    link,
                    LinkInfo {
                        kind,
                        remote: client_remote,
                        identity: client_identity,
                        max_packet: Some(mtu),
                        sink: super::datapath::Sink::none(),
                    },
                );
                self.client.handle_link_up(
                    now,
                    attempt,
                    link,
                    LinkInfo {
                        kind,
                        remote,
                        identity: connector_identity,
                        max_packet: Some(mtu),
                        sink: super::datapath::Sink::none(),
                    },
                );
            }
            Err(e) => {
                self.connector.record_refusal(super::Refusal {
                    identity: None,
                    remote: "198.51.100.10:7844".parse().expect("addr"),
                    reason: format!("TLS handshake failed: {e}"),
                    at: now,
                });
                self.client.handle_dial_failed(now, attempt, e);
            }
        }
    }

    /// Carries out what both nodes asked, until neither asks for more.
    fn drain(&mut self) {
        loop {
            let mut busy = false;
            while let Some(t) = self.client.poll_transmit() {
                busy = true;
                if !self.cut {
                    let d = self.latency;
                    self.send(d, Wire::ToConnector(t.link, t.msg));
                }
            }
            while let Some(t) = self.connector.poll_transmit() {
                busy = true;
                if !self.cut {
                    let d = self.latency;
                    self.send(d, Wire::ToClient(t.link, t.msg));
                }
            }
            while let Some(e) = self.client.poll_event() {
                busy = true;
                self.client_event(e);
            }
            while let Some(e) = self.connector.poll_event() {
                busy = true;
                self.connector_event(e);
            }
            if !busy {
                return;
            }
        }
    }

    fn client_event(&mut self, e: ClientEvent) {
        self.client_events.push(e.clone());
        match e {
            ClientEvent::Dial { attempt, kind, .. } => {
                let d = self.latency * 2;
                self.send(d, Wire::Handshake { attempt, kind });
            }
            ClientEvent::CancelDial { attempt } => {
                self.cancelled.insert(attempt);
            }
            ClientEvent::CloseLink { link, .. } => {
                let d = self.latency;
                self.send(d, Wire::Down(link));
            }
            ClientEvent::TunnelUp { routes, .. } => {
                self.client_routes = routes.into_iter().collect();
            }
            ClientEvent::Offer { routes, .. } => {
                self.client_routes = routes.into_iter().collect();
            }
            ClientEvent::TunnelDown => {}
        }
    }

    fn connector_event(&mut self, e: ConnectorEvent) {
        self.connector_events.push(e.clone());
        match e {
            ConnectorEvent::AddRoutes { link, prefixes } => {
                let clash = prefixes
                    .iter()
                    .find(|p| self.kernel_routes.contains_key(p))
                    .copied();
                let result = match clash {
                    Some(p) => Err(format!("route {p} exists (not added by gatewayd)")),
                    None => {
                        for p in &prefixes {
                            self.kernel_routes.insert(*p, "gatewayd".into());
                        }
                        Ok(())
                    }
                };
                let (now, added) = (self.now, if result.is_ok() { prefixes } else { vec![] });
                self.connector
                    .handle_routes_added(now, link, &added, result);
            }
            ConnectorEvent::RemoveRoutes { prefixes } => {
                for p in prefixes {
                    if self.kernel_routes.get(&p).map(String::as_str) == Some("gatewayd") {
                        self.kernel_routes.remove(&p);
                    }
                }
            }
            ConnectorEvent::CloseLink { link, linger, .. } => {
                // Lingering lets the refusal sent just before arrive first.
                let d = if linger {
                    self.latency * 2
                } else {
                    self.latency
                };
                self.send(d, Wire::Down(link));
            }
            ConnectorEvent::SetTunMtu(m) => self.tun_mtu = m,
        }
    }

    /// The client host sends `pkt` into its TUN.
    pub fn client_sends(&mut self, mut pkt: Vec<u8>) -> Option<FromTunOutcome> {
        let dp = self.client.datapath();
        let mut reply = vec![0u8; 1500];
        let outcome = match dp.from_tun(&mut pkt, &mut reply) {
            FromTun::Send(peer) => {
                let link = peer.link;
                peer.counters.sent(pkt.len());
                self.transmit_packet(link, true, pkt);
                FromTunOutcome::Sent
            }
            FromTun::Reply(n) => {
                self.answered.push(reply[..n].to_vec());
                FromTunOutcome::Answered
            }
            FromTun::Dns(_) => FromTunOutcome::Dns,
            FromTun::Drop(d) => FromTunOutcome::Dropped(d),
        };
        self.drain();
        Some(outcome)
    }

    /// A VPC host's packet arrives in the connector's TUN.
    pub fn vpc_sends(&mut self, mut pkt: Vec<u8>) -> FromTunOutcome {
        let dp = self.connector.datapath();
        let mut reply = vec![0u8; 1500];
        match dp.from_tun(&mut pkt, &mut reply) {
            FromTun::Send(peer) => {
                peer.counters.sent(pkt.len());
                self.transmit_packet(peer.link, false, pkt);
                FromTunOutcome::Sent
            }
            FromTun::Reply(n) => {
                self.answered.push(reply[..n].to_vec());
                FromTunOutcome::Answered
            }
            FromTun::Dns(_) => FromTunOutcome::Dns,
            FromTun::Drop(d) => FromTunOutcome::Dropped(d),
        }
    }

    fn transmit_packet(&mut self, link: LinkId, to_connector: bool, pkt: Vec<u8>) {
        if self.cut {
            return;
        }
        let kind = self.links.get(&link).copied();
        if kind == Some(LinkKind::Quic) && self.udp_blocked {
            return;
        }
        if self.loss > 0 && self.random().is_multiple_of(u64::from(self.loss)) {
            return;
        }
        let extra = if self.reorder && self.random().is_multiple_of(2) {
            self.latency
        } else {
            Duration::ZERO
        };
        let d = self.latency + extra;
        self.send(
            d,
            Wire::Packet {
                link,
                to_connector,
                pkt,
            },
        );
    }

    pub fn client_is_up(&self) -> bool {
        self.client.status_line().starts_with("connected")
    }

    pub fn client_peer(&self) -> Option<crate::api::PeerStatus> {
        self.client
            .peers(self.now, 1_000_000)
            .first()
            .map(|p| p.status())
    }

    pub fn connector_peers(&self) -> Vec<crate::api::PeerStatus> {
        self.connector
            .peers(self.now, 1_000_000)
            .iter()
            .map(|p| p.status())
            .collect()
    }

    pub fn vpc_route_is_the_kernels(&self) -> bool {
        self.kernel_routes.get(&VPC.parse::<IpNet>().expect("net")) == Some(&"kernel".to_string())
    }

    pub fn overlay_v4(&self) -> Option<IpAddr> {
        self.client_peer().and_then(|p| p.address_v4.parse().ok())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FromTunOutcome {
    Sent,
    Answered,
    Dns,
    Dropped(Drop),
}
