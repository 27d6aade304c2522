//! The client's driver: dialling what `node::Client` asks for (each attempt a task that can be
//! cancelled), handing each link to its link task, and carrying out the tunnel coming up or
//! changing — overlay addresses, routes (exclusive, except this daemon's own), the eBPF
//! steering, the DNS relay — and the TUN's MTU following the connector's path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::datapath::Path;
use super::dial::Dialer;
use super::link::{Link, Opened};
use super::links::{self, LinkEvent, Outgoing, Packets};
use super::net;
use super::peer_routes::Learned;
use super::status::{LinkRecord, NodeView, Shared};
use super::stub::Relays;
use super::tls;
use crate::core::text::{PEER_TEXT, clean};
use crate::node::datapath::Datapath;
use crate::node::drops::Limit;
use crate::node::{Client, ClientEvent, LinkId, LinkInfo};

/// What the dial tasks tell the node's task.
pub enum Input {
    Dialed {
        attempt: u64,
        result: Result<Opened, String>,
    },
}

pub struct Task {
    pub node: Client,
    pub shared: Arc<Shared>,
    pub datapath: Arc<ArcSwap<Datapath>>,
    pub dialer: Arc<Dialer>,
    pub learned: Learned,
    pub tun_index: u32,
    pub on_routes: super::RoutesHook,
    pub relays: Arc<Relays>,
    /// systemd-resolved's routing domains follow the zones, when that is on.
    pub resolved: Option<super::resolved::Zones>,
    pub current: watch::Sender<Option<Link>>,
    pub inbox: mpsc::Sender<Input>,
    pub events: mpsc::Sender<LinkEvent>,
    pub packets: Packets,
    pub outs: HashMap<LinkId, mpsc::Sender<Outgoing>>,
    pub dials: HashMap<u64, AbortHandle>,
    pub up: Option<LinkId>,
    pub version: u64,
    /// A fixed (monotonic, wall clock) pair that converts the node's times for status.
    pub epoch: (Instant, u64),
    pub mtu: usize,
}

impl Task {
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut events: mpsc::Receiver<LinkEvent>,
        mut paths: mpsc::Receiver<Path>,
    ) {
        loop {
            let wake = self.node.poll_timeout();
            tokio::select! {
                i = inputs.recv() => match i {
                    Some(Input::Dialed { attempt, result }) => self.dialed(attempt, result),
                    None => return,
                },
                Some(e) = events.recv() => self.link_event(e),
                Some(p) = paths.recv() => self.node.handle_path(p.link, p.max_packet, p.rtt),
                _ = sleep_until(wake) => self.node.handle_timeout(Instant::now()),
            }
            self.carry_out().await;
        }
    }

    fn dialed(&mut self, attempt: u64, result: Result<Opened, String>) {
        let now = Instant::now();
        self.dials.remove(&attempt);
        let opened = match result {
            Ok(o) => o,
            Err(e) => return self.node.handle_dial_failed(now, attempt, e),
        };
        let link = opened.link.clone();
        let id = LinkId(link.id());
        // The connector's certificate name; server_name may be the address it was dialled by.
        let identity = link
            .peer_chain()
            .and_then(|c| tls::identity_of_chain(&c))
            .unwrap_or_else(|| self.dialer.server_name.clone());
        let info = LinkInfo {
            kind: match (&link, opened.outer) {
                (_, Some(outer)) => outer,
                (Link::Quic(_), None) => crate::node::LinkKind::Quic,
                (Link::Tcp(_), None) => crate::node::LinkKind::Tcp,
            },
            remote: link.remote(),
            identity: clean(&identity, PEER_TEXT),
            max_packet: link.max_packet(),
            sink: link.sink(),
        };
        if let Ok(mut l) = self.shared.links.lock() {
            l.insert(
                id,
                LinkRecord {
                    identity: info.identity.clone(),
                    link,
                },
            );
        }
        let out = links::start(opened, id, self.events.clone(), self.packets.clone(), None);
        self.outs.insert(id, out);
        self.node.handle_link_up(now, attempt, id, info);
    }

    fn link_event(&mut self, e: LinkEvent) {
        let now = Instant::now();
        match e {
            LinkEvent::Control(link, msg) => self.node.handle_control(now, link, msg),
            LinkEvent::Down(link, reason) => {
                self.outs.remove(&link);
                if let Ok(mut l) = self.shared.links.lock() {
                    l.remove(&link);
                }
                self.node
                    .handle_link_down(now, link, clean(&reason, PEER_TEXT));
            }
        }
    }

    /// The node's outputs: the datapath and which link is up first (so routes and answers
    /// find the link), then control messages and effects.
    async fn carry_out(&mut self) {
        let changed = self.node.datapath_version() != self.version;
        let dp = self.node.datapath();
        let peer = dp.peers().first().cloned();
        if changed {
            self.version = self.node.datapath_version();
            self.datapath.store(dp.clone());
            let link = peer.as_ref().map(|p| p.link);
            if link != self.up {
                self.up = link;
                let current = link.and_then(|l| {
                    self.shared
                        .links
                        .lock()
                        .ok()
                        .and_then(|r| r.get(&l).map(|r| r.link.clone()))
                });
                if let Some(out) = link.and_then(|l| self.outs.get(&l)) {
                    let _ = out.try_send(Outgoing::Up);
                }
                self.current.send_replace(current);
            }
        }
        while let Some(t) = self.node.poll_transmit() {
            if let Some(out) = self.outs.get(&t.link) {
                let _ = out.try_send(Outgoing::Control(t.msg));
            }
        }
        while let Some(e) = self.node.poll_event() {
            self.event(e).await;
        }
        // The TUN carries what one send to the connector carries.
        if let Some(max) = peer.and_then(|p| p.max_packet())
            && max != self.mtu
        {
            self.mtu = max;
            let mtu = u32::try_from(max).unwrap_or(u32::MAX);
            self.shared.mtu.store(mtu, Ordering::Relaxed);
            match net::set_mtu(self.learned.netlink(), self.tun_index, mtu).await {
                Ok(()) => tracing::info!(mtu, "TUN MTU follows the tunnel's datagram size"),
                Err(e) => tracing::warn!(mtu, error = %e, "could not set TUN MTU"),
            }
        }
        self.publish_view();
    }

    async fn event(&mut self, e: ClientEvent) {
        match e {
            ClientEvent::Dial {
                attempt,
                target,
                kind,
                timeout,
            } => {
                let (dialer, inbox) = (self.dialer.clone(), self.inbox.clone());
                let task = tokio::spawn(async move {
                    let result = dialer
                        .open(&target, kind, timeout)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    let _ = inbox.send(Input::Dialed { attempt, result }).await;
                });
                self.dials.insert(attempt, task.abort_handle());
            }
            ClientEvent::CancelDial { attempt } => {
                if let Some(t) = self.dials.remove(&attempt) {
                    t.abort();
                }
            }
            ClientEvent::CloseLink { link, code, reason } => {
                let close = Outgoing::Close {
                    code,
                    reason: reason.clone(),
                    linger: false,
                };
                let sent = self
                    .outs
                    .get(&link)
                    .is_some_and(|o| o.try_send(close).is_ok());
                if !sent
                    && let Ok(l) = self.shared.links.lock()
                    && let Some(r) = l.get(&link)
                {
                    r.link.close(code, &reason);
                }
            }
            ClientEvent::TunnelUp {
                v4,
                v6,
                routes,
                zones,
            } => {
                tracing::info!(%v4, %v6, ?routes, ?zones, "tunnel up");
                let netlink = self.learned.netlink().clone();
                for (addr, len) in [
                    (IpAddr::V4(v4.addr()), v4.prefix_len()),
                    (IpAddr::V6(v6.addr()), v6.prefix_len()),
                ] {
                    if let Err(e) = net::add_address(&netlink, self.tun_index, addr, len).await {
                        tracing::error!(%addr, error = %e, "giving the TUN its overlay address failed");
                    }
                }
                self.apply(&routes, &zones).await;
            }
            ClientEvent::Offer { routes, zones } => {
                tracing::info!(
                    ?routes,
                    ?zones,
                    "the connector changed its routes and zones"
                );
                self.apply(&routes, &zones).await;
            }
            ClientEvent::TunnelDown => {
                self.current.send_replace(None);
            }
        }
    }

    /// Routes into the TUN (those that may be installed), the classifier, the DNS relay. A
    /// route not installed is counted and listed with the refusals, saying why.
    async fn apply(&mut self, routes: &[IpNet], zones: &[String]) {
        let connector = self.up.and_then(|l| {
            let links = self.shared.links.lock().ok()?;
            links.get(&l).map(|r| (r.identity.clone(), r.link.remote()))
        });
        let mut refused: Vec<(IpNet, String)> = self.node.rejected_routes().to_vec();
        let installed = match &connector {
            Some((_, remote)) => match self.learned.sync(routes, remote.ip()).await {
                Ok((installed, skipped)) => {
                    refused.extend(skipped.into_iter().map(|s| (s.route, s.why)));
                    installed
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "routing into the tunnel failed");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        if let Some((identity, remote)) = connector {
            for (route, why) in refused {
                self.shared.limits.count(Limit::LearnedRouteRefused);
                let reason = format!("learned route {route} refused: {why}");
                self.shared.refuse(Some(identity.clone()), remote, reason);
            }
        }
        let wires: Vec<Vec<u8>> = zones
            .iter()
            .filter_map(|d| crate::core::dns::wire_name(d).ok())
            .collect();
        if let Err(e) = (self.on_routes)(&installed, &wires, self.tun_index) {
            tracing::error!(error = %format!("{e:#}"), "loading routes into the classifier failed");
        }
        self.relays.set_zones(zones);
        if let Some(r) = &self.resolved {
            r.set(zones);
        }
    }

    fn publish_view(&self) {
        let (now, unix) = self.epoch;
        self.shared.set_view(NodeView {
            state: clean(self.node.status_line(), 2 * PEER_TEXT),
            peers: self.node.peers(now, unix),
            refusals: self.node.refusals().map(|r| r.to_api(now, unix)).collect(),
            zones: self.node.zones().to_vec(),
        });
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
