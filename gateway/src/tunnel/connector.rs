//! The connector's driver: accepting connections (QUIC and the TCP fallback) within bounded
//! handshake slots, handing each authenticated link to its link task and to the node's task,
//! and carrying out what `node::Connector` decides — control messages, kernel routes for
//! advertised prefixes, closing links, the TUN's MTU, the forward filter's session chains.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use quinn::{Endpoint, VarInt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::datapath::Path;
use super::dns::Forwarder;
use super::link::{ControlRx, ControlTx, Inbound, Link, Opened, PeerCertificates, Side, TcpLink};
use super::links::{self, LinkEvent, Outgoing, Packets};
use super::status::{LinkRecord, NodeView, Shared};
use super::{access_server, nat, net, tls};
use crate::core::limits::{HandshakeSlots, SlotRefused};
use crate::core::policy::Policy;
use crate::core::text::{PEER_NAME, clean, is_clean};
use crate::node::datapath::Datapath;
use crate::node::drops::{Failure, Limit};
use crate::node::{
    Connector, ConnectorConfig, ConnectorEvent, HANDSHAKE_TIMEOUT, LinkId, LinkInfo, LinkKind,
};

/// Connections between their first packet and the welcome (TLS, then the hello), at once: each
/// holds up to two descriptors and ~100 KiB of TLS state; 256 is ~30 MiB at most, and far more
/// than legitimate clients ever start in one handshake time.
pub const MAX_PENDING: usize = 256;
/// The same from one source (an IPv4 address, an IPv6 /64): a site's NAT starting all its
/// clients at once stays below it, a single host cannot take the whole budget.
const MAX_PENDING_PER_SOURCE: usize = 16;
/// Above this many pending handshakes, a QUIC client must prove its address (a Retry) first,
/// so spoofed sources cannot hold slots.
const RETRY_ABOVE: usize = MAX_PENDING / 4;
/// Descriptors kept free below RLIMIT_NOFILE: new TCP connections (and access streams) are
/// refused closer to it, so `gatewayctl status`, netlink and DNS retries always get one.
const FD_HEADROOM: u64 = 128;

/// A pending handshake's share of the bounds, given back when dropped (after the welcome or
/// the refusal, or when the connection fails first).
pub struct Slot {
    slots: Arc<Mutex<HandshakeSlots>>,
    ip: IpAddr,
}

impl Slot {
    fn busy(&self) -> bool {
        self.slots.lock().is_ok_and(|s| s.pending() > RETRY_ABOVE)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.release(self.ip);
        }
    }
}

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

/// What the accept loops need.
pub struct Accept {
    pub shared: Arc<Shared>,
    pub slots: Arc<Mutex<HandshakeSlots>>,
    pub nofile: u64,
    pub inbox: mpsc::Sender<Input>,
    pub events: mpsc::Sender<LinkEvent>,
    pub packets: Packets,
    pub forwarder: Option<Arc<Forwarder>>,
    pub access: Arc<access_server::AccessServer>,
}

impl Accept {
    pub fn new_slots() -> Arc<Mutex<HandshakeSlots>> {
        Arc::new(Mutex::new(HandshakeSlots::new(
            MAX_PENDING,
            MAX_PENDING_PER_SOURCE,
        )))
    }

    /// A pending-handshake slot for a connection from `remote`; `None` (counted, and logged at
    /// a bounded rate) when the connector or that source has as many as it may.
    fn slot(&self, remote: SocketAddr) -> Option<Slot> {
        let taken = self
            .slots
            .lock()
            .map_err(|_| SlotRefused::Global)
            .and_then(|mut s| s.take(remote.ip()));
        match taken {
            Ok(()) => Some(Slot {
                slots: self.slots.clone(),
                ip: remote.ip(),
            }),
            Err(why) => {
                let reason = match why {
                    SlotRefused::Global => format!("{MAX_PENDING} handshakes already pending"),
                    SlotRefused::Source => format!(
                        "{MAX_PENDING_PER_SOURCE} handshakes already pending from this source"
                    ),
                };
                self.shared
                    .handshake_failed(remote, Failure::of_slot(why), reason);
                None
            }
        }
    }

    /// Whether a descriptor just opened leaves FD_HEADROOM below the limit. The kernel hands
    /// out the lowest free number, so descriptor `n` means at least `n` are open.
    pub fn descriptors_left(&self, new: &impl AsRawFd) -> bool {
        let n = u64::try_from(new.as_raw_fd()).unwrap_or(u64::MAX);
        if n.saturating_add(FD_HEADROOM) < self.nofile {
            return true;
        }
        self.shared.limits.count(Limit::DescriptorsLow);
        false
    }

    /// A TLS handshake given HANDSHAKE_TIMEOUT; a failure is counted and listed apart.
    async fn handshake<T, E: std::fmt::Display>(
        &self,
        remote: SocketAddr,
        over: &str,
        handshake: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                let reason = format!("TLS handshake{over} failed: {e}");
                self.shared
                    .handshake_failed(remote, Failure::TlsFailed, reason);
                None
            }
            Err(_) => {
                let reason = format!("handshake{over} timed out");
                self.shared
                    .handshake_failed(remote, Failure::TimedOut, reason);
                None
            }
        }
    }

    /// The identity a verified certificate names, if it is a plain name that status and logs
    /// can show as it is.
    fn identity(&self, remote: SocketAddr, name: Option<String>) -> Option<String> {
        match name {
            Some(n) if is_clean(&n, PEER_NAME) => Some(n),
            Some(n) => {
                let reason = format!("certificate name {:?} is not a plain name", clean(&n, 64));
                self.shared
                    .handshake_failed(remote, Failure::BadName, reason);
                None
            }
            None => {
                let reason = "certificate carries no name".to_string();
                self.shared
                    .handshake_failed(remote, Failure::NoName, reason);
                None
            }
        }
    }

    pub async fn quic(self: Arc<Self>, ep: Endpoint) {
        let mut clients = JoinSet::new();
        while let Some(incoming) = ep.accept().await {
            let Some(slot) = self.slot(incoming.remote_address()) else {
                incoming.refuse();
                continue;
            };
            if slot.busy() && !incoming.remote_address_validated() && incoming.may_retry() {
                drop(slot);
                let _ = incoming.retry();
                continue;
            }
            let me = self.clone();
            clients.spawn(async move { me.serve_quic(incoming, slot).await });
            while clients.try_join_next().is_some() {}
        }
    }

    pub async fn tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let mut clients = JoinSet::new();
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP fallback connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !self.descriptors_left(&stream) {
                continue;
            }
            let Some(slot) = self.slot(remote) else {
                continue;
            };
            let me = self.clone();
            let acceptor = acceptor.clone();
            clients.spawn(async move { me.serve_tcp(stream, remote, acceptor, slot).await });
            // Reap finished handshakes so a long-lived connector does not accumulate them.
            while clients.try_join_next().is_some() {}
        }
    }

    async fn serve_quic(&self, incoming: quinn::Incoming, slot: Slot) {
        let remote = incoming.remote_address();
        let Some(conn) = self.handshake(remote, "", incoming.into_future()).await else {
            return;
        };
        let Some(identity) = self.identity(remote, tls::peer_identity(&conn)) else {
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        };
        if tls::negotiated_alpn(&conn).as_deref() == Some(tls::ALPN_ACCESS) {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => {
                    let chain = tls::peer_chain(&conn).unwrap_or_default();
                    self.access
                        .serve(&identity, remote, chain, recv, send, slot)
                        .await
                }
                _ => tracing::info!(%identity, %remote, "access connection opened no stream"),
            }
            // Closing at once could overtake a refusal still in flight: let the client close.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(VarInt::from_u32(0), b"done");
            return;
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok((send, recv))) => {
                let opened = Opened {
                    link: Link::Quic(conn.clone()),
                    control_tx: ControlTx::Quic(send),
                    control_rx: ControlRx::quic(recv, Side::Connector),
                    inbound: Inbound::Quic(conn.clone()),
                    dns_queries: None,
                };
                self.up(opened, identity, LinkKind::Quic, slot).await;
            }
            _ => {
                tracing::info!(%identity, %remote, "no control stream; connection dropped");
                conn.close(VarInt::from_u32(1), b"no control stream");
            }
        }
    }

    async fn serve_tcp(
        &self,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        slot: Slot,
    ) {
        let _ = stream.set_nodelay(true);
        let Some(tls) = self
            .handshake(remote, " (TCP)", acceptor.accept(stream))
            .await
        else {
            return;
        };
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(tls::identity_of_chain);
        let Some(identity) = self.identity(remote, name) else {
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_ACCESS) {
            let chain = PeerCertificates::peer_certificates(&tls);
            let (r, w) = tokio::io::split(tls);
            self.access
                .serve(&identity, remote, chain, r, w, slot)
                .await;
            return;
        }
        // Only an authenticated peer gets its socket duplicated (for TCP_INFO and shutdown).
        let socket = match tls.get_ref().0.as_fd().try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                self.shared.limits.count(Limit::DescriptorsLow);
                tracing::warn!(error = %e, "duplicating a TCP socket failed");
                return;
            }
        };
        let limits = self.shared.limits.clone();
        let opened = TcpLink::start(tls, socket, remote, Side::Connector, limits);
        self.up(opened, identity, LinkKind::Tcp, slot).await;
    }

    /// An authenticated link: its task starts, and the node hears of it.
    async fn up(&self, opened: Opened, identity: String, kind: LinkKind, slot: Slot) {
        let link = opened.link.clone();
        let id = LinkId(link.id());
        let info = LinkInfo {
            kind,
            remote: link.remote(),
            identity: identity.clone(),
            max_packet: link.max_packet(),
            sink: link.sink(),
        };
        if let Ok(mut l) = self.shared.links.lock() {
            l.insert(id, LinkRecord { identity, link });
        }
        let out = links::spawn(
            opened,
            id,
            self.events.clone(),
            self.packets.clone(),
            self.forwarder.clone(),
        );
        let _ = self
            .inbox
            .send(Input::LinkUp {
                id,
                info,
                out,
                slot,
            })
            .await;
    }
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
            tokio::select! {
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
    /// it), control messages, effects, then which links are up.
    async fn carry_out(&mut self) {
        let changed = self.node.datapath_version() != self.version;
        if changed {
            self.version = self.node.datapath_version();
            self.datapath.store(self.node.datapath());
        }
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
        self.publish_view();
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

/// The soft RLIMIT_NOFILE (what `LimitNOFILE=` sets under systemd).
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed, nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc == 0 { r.rlim_cur } else { 1024 }
}
