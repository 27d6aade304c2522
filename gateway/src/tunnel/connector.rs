//! The connector's node task: every input in order (links up and down from `accept` and
//! `links`, control messages, route changes' outcomes, paths, reloads), then what
//! `node::Connector` decides — control messages, kernel routes for advertised prefixes, closing
//! links, the TUN's MTU, the forward filter's session chains, status.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::mpsc;

use super::datapath::Path;
use super::links::{LinkEvent, Outgoing};
use super::slots::Slot;
use super::status::{NodeView, Shared};
use super::{nat, net};
use crate::core::policy::Policy;
use crate::core::text::clean;
use crate::node::datapath::Datapath;
use crate::node::{Connector, ConnectorConfig, ConnectorEvent, LinkId, LinkInfo};

/// What the accept loops and the rest of the tunnel tell the node's task.
pub enum Input {
    LinkUp {
        id: LinkId,
        info: LinkInfo,
        out: mpsc::Sender<Outgoing>,
        slot: Slot,
    },
    RoutesAdded {
        link: LinkId,
        added: Vec<IpNet>,
        result: Result<(), String>,
    },
    Reload(ConnectorConfig),
}

/// The node's task: every input in order, then what the node asks, in the order `node` states.
pub struct Task {
    pub node: Connector,
    pub shared: Arc<Shared>,
    pub datapath: Arc<ArcSwap<Datapath>>,
    pub netlink: rtnetlink::Handle,
    pub tun_index: u32,
    pub filter: Option<nat::SessionFilter>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub inbox: mpsc::Sender<Input>,
    pub outs: HashMap<LinkId, mpsc::Sender<Outgoing>>,
    pub slots: HashMap<LinkId, Slot>,
    pub up: HashSet<LinkId>,
    pub version: u64,
    /// A fixed (monotonic, wall clock) pair that converts the node's times for status.
    pub epoch: (Instant, u64),
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
            // Inputs first: a link's LinkUp is queued before its task starts, so its first
            // control message can never be taken before it.
            tokio::select! {
                biased;
                i = inputs.recv() => match i {
                    Some(i) => self.input(i).await,
                    None => return,
                },
                Some(e) = events.recv() => self.link_event(e).await,
                Some(p) = paths.recv() => self.node.handle_path(p.link, p.max_packet, p.rtt),
                _ = sleep_until(wake) => self.node.handle_timeout(Instant::now()),
            }
            self.carry_out().await;
        }
    }

    async fn input(&mut self, i: Input) {
        let now = Instant::now();
        match i {
            Input::LinkUp {
                id,
                info,
                out,
                slot,
            } => {
                self.outs.insert(id, out);
                self.slots.insert(id, slot);
                self.node.handle_link_up(now, id, info);
            }
            Input::RoutesAdded {
                link,
                added,
                result,
            } => self.node.handle_routes_added(now, link, &added, result),
            Input::Reload(cfg) => self.node.reload(now, cfg),
        }
    }

    async fn link_event(&mut self, e: LinkEvent) {
        let now = Instant::now();
        match e {
            LinkEvent::Control(link, msg) => {
                if matches!(msg, super::control::Control::Hello { .. }) {
                    // What the kernel routes itself is never advertisable: asked at each hello.
                    match self.local_nets().await {
                        Ok(nets) => self.node.set_local_nets(nets),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot ask the kernel for its subnets")
                        }
                    }
                }
                self.node.handle_control(now, link, msg);
            }
            LinkEvent::Down(link, reason) => {
                self.outs.remove(&link);
                self.slots.remove(&link);
                self.up.remove(&link);
                if let Ok(mut l) = self.shared.links.lock() {
                    l.remove(&link);
                }
                tracing::info!(link = link.0, reason = %clean(&reason, 256), "client link ended");
                self.node.handle_link_down(now, link);
            }
        }
    }

    async fn local_nets(&self) -> anyhow::Result<Vec<IpNet>> {
        let mut local = net::address_subnets(&self.netlink, self.tun_index).await?;
        local.extend(net::routed_prefixes(&self.netlink, self.tun_index).await?);
        Ok(local)
    }

    /// The node's outputs, in its order: the datapath first (so a welcomed peer's packets find
    /// it), status (so a client told it is welcome finds itself there), control messages,
    /// effects, then which links are up.
    async fn carry_out(&mut self) {
        let changed = self.node.datapath_version() != self.version;
        if changed {
            self.version = self.node.datapath_version();
            self.datapath.store(self.node.datapath());
        }
        // Nothing below changes what the view shows; the effects await the kernel, and a
        // client could hear its welcome and ask before they end.
        self.publish_view();
        while let Some(t) = self.node.poll_transmit() {
            if let Some(out) = self.outs.get(&t.link)
                && out.try_send(Outgoing::Control(t.msg)).is_err()
            {
                // A client that does not read its control stream is not queued for.
                self.close(t.link, 5, "control queue full", false);
            }
        }
        while let Some(e) = self.node.poll_event() {
            self.event(e).await;
        }
        if changed {
            let dp = self.node.datapath();
            for p in dp.peers() {
                if self.up.insert(p.link) {
                    self.slots.remove(&p.link);
                    if let Some(out) = self.outs.get(&p.link) {
                        let _ = out.try_send(Outgoing::Up);
                    }
                }
            }
            self.sync_filter();
        }
    }

    async fn event(&mut self, e: ConnectorEvent) {
        match e {
            ConnectorEvent::AddRoutes { link, prefixes } => {
                let (netlink, index, inbox) =
                    (self.netlink.clone(), self.tun_index, self.inbox.clone());
                tokio::spawn(async move {
                    let result = add_routes(&netlink, index, &prefixes).await;
                    let added = if result.is_ok() { prefixes } else { Vec::new() };
                    let _ = inbox
                        .send(Input::RoutesAdded {
                            link,
                            added,
                            result,
                        })
                        .await;
                });
            }
            ConnectorEvent::RemoveRoutes { prefixes } => {
                for p in prefixes {
                    if let Err(e) = net::delete_route(&self.netlink, p, self.tun_index).await {
                        tracing::warn!(route = %p, error = %e, "removing a client's route failed");
                    }
                }
            }
            ConnectorEvent::CloseLink {
                link,
                code,
                reason,
                linger,
            } => self.close(link, code, &reason, linger),
            ConnectorEvent::SetTunMtu(mtu) => {
                self.shared
                    .mtu
                    .store(mtu, std::sync::atomic::Ordering::Relaxed);
                match net::set_mtu(&self.netlink, self.tun_index, mtu).await {
                    Ok(()) => tracing::info!(mtu, "TUN MTU follows the largest path of a peer"),
                    Err(e) => tracing::warn!(mtu, error = %e, "could not set TUN MTU"),
                }
            }
        }
    }

    fn close(&mut self, link: LinkId, code: u32, reason: &str, linger: bool) {
        let close = Outgoing::Close {
            code,
            reason: reason.to_string(),
            linger,
        };
        let sent = self
            .outs
            .get(&link)
            .is_some_and(|o| o.try_send(close).is_ok());
        if !sent
            && let Ok(l) = self.shared.links.lock()
            && let Some(r) = l.get(&link)
        {
            r.link.close(code, reason);
        }
    }

    /// The forward filter's session chains follow the peers and the policy.
    fn sync_filter(&self) {
        let Some(f) = &self.filter else {
            return;
        };
        let peers = || {
            self.node
                .peers(Instant::now(), 0)
                .into_iter()
                .map(|p| {
                    let mut owns = vec![
                        IpNet::from(IpAddr::V4(p.addresses.0)),
                        IpNet::from(IpAddr::V6(p.addresses.1)),
                    ];
                    owns.extend(p.advertised);
                    (p.info.identity, owns)
                })
                .collect()
        };
        if let Err(e) = f.sync(&self.policy.load(), peers) {
            tracing::error!(error = %e, "updating the forward filter failed");
        }
    }

    fn publish_view(&self) {
        let (now, unix) = self.epoch;
        let old = self
            .shared
            .view
            .lock()
            .map(|v| v.state.clone())
            .unwrap_or_default();
        self.shared.set_view(NodeView {
            state: old,
            peers: self.node.peers(now, unix),
            refusals: self.node.refusals().map(|r| r.to_api(now, unix)).collect(),
            zones: Vec::new(),
        });
    }
}

/// Routes each prefix into the TUN exclusively; on a failure, those added are taken out again
/// and the error names the prefix.
async fn add_routes(
    netlink: &rtnetlink::Handle,
    index: u32,
    prefixes: &[IpNet],
) -> Result<(), String> {
    for (i, p) in prefixes.iter().enumerate() {
        if let Err(e) = net::add_route(netlink, *p, index).await {
            for done in &prefixes[..i] {
                let _ = net::delete_route(netlink, *done, index).await;
            }
            return Err(format!("advertised prefix {p}: {e}"));
        }
    }
    Ok(())
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
