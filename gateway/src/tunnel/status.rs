//! What `gatewayctl status` reads of a running tunnel: the node's latest view (peers, state,
//! refusals), the counters the packet path bumps, and what the drivers record themselves
//! (failed handshakes, access streams, the firewall, pings). Peer text is escaped on its way in.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::link::Link;
use super::{dns, net};
use crate::api::{Refusal, TunnelStatus, ZoneStatus};
use crate::core::limits::LogLimit;
use crate::core::text::{PEER_NAME, PEER_TEXT, clean};
use crate::node::drops::{Drops, Failure, Failures, Limits};
use crate::node::{LinkId, PeerSnapshot};

/// Refusals of authenticated peers kept for status: they name who and why.
pub const MAX_REFUSALS: usize = 20;
/// Failed handshakes kept for status, apart: anyone can cause them, so they must not push the
/// refusals above out; their counts by reason are kept too.
const MAX_HANDSHAKE_FAILURES: usize = 5;
const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";

/// Which end this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Connector,
    Client,
    Hub,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Role::Connector => "connector",
            Role::Client => "client",
            Role::Hub => "hub",
        }
    }
}

/// What the node's task last published: replaced whole after each of its steps.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub state: String,
    pub peers: Vec<PeerSnapshot>,
    pub refusals: Vec<Refusal>,
    /// Client: the zones learned from the connector.
    pub zones: Vec<String>,
}

/// A live link, for what needs all of them: pings, revocation, stopping.
pub struct LinkRecord {
    pub identity: String,
    pub link: Link,
}

/// Shared by every task of the tunnel; read by the status socket and metrics.
pub struct Shared {
    pub role: Role,
    pub tun: String,
    pub mtu: AtomicU32,
    pub view: Mutex<NodeView>,
    pub links: Mutex<HashMap<LinkId, LinkRecord>>,
    refusals: Mutex<VecDeque<Refusal>>,
    failed_handshakes: Mutex<VecDeque<Refusal>>,
    pub failures: Failures,
    pub limits: Arc<Limits>,
    pub drops: Arc<Drops>,
    /// Warnings a peer can cause at will are logged at most this often.
    warn_limit: Mutex<LogLimit>,
    /// Connector: the DNS forwarder, for its zones' status.
    pub forwarder: Mutex<Option<Arc<dns::Forwarder>>>,
    /// Connector: the pinned egress range.
    pub egress_ports: Mutex<Option<(u16, u16)>>,
    pub access_active: AtomicU64,
    pub access_total: AtomicU64,
    /// The nftables table's name and what it was made to hold.
    pub firewall: Mutex<Option<(String, String)>>,
    /// ICMP echo round trip to each peer's public address.
    pub pings: Mutex<HashMap<LinkId, Duration>>,
    /// Hub: what it relays, asked when status is.
    pub hub: Mutex<Option<HubView>>,
    /// Client: its targets are hubs.
    pub through_hub: std::sync::atomic::AtomicBool,
    /// Connector behind hubs: the hubs it dials, in order; a relayed session's synthetic
    /// address is shown as the hub it came through.
    pub hubs: std::sync::OnceLock<Vec<String>>,
    /// Client: systemd-resolved's settings for the TUN, as `resolved` last made them.
    pub resolved: Mutex<Option<crate::api::ResolvedStatus>>,
}

/// The hub's tables as status shows them.
pub type HubView = Arc<dyn Fn() -> crate::api::HubStatus + Send + Sync>;

fn push_ring(ring: &Mutex<VecDeque<Refusal>>, max: usize, entry: Refusal) {
    if let Ok(mut r) = ring.lock() {
        while r.len() >= max {
            r.pop_front();
        }
        r.push_back(entry);
    }
}

impl Shared {
    /// A relayed session's synthetic address as the hub it came through.
    fn through_which_hub(&self, remote: SocketAddr) -> Option<String> {
        let (index, flow) = super::hub_wire::parse_synthetic(remote)?;
        let hub = self.hubs.get()?.get(usize::from(index).checked_sub(1)?)?;
        Some(format!("{hub} (hub, flow {flow})"))
    }

    pub fn new(role: Role, tun: &str, state: &str) -> Arc<Shared> {
        Arc::new(Shared {
            role,
            tun: tun.into(),
            mtu: AtomicU32::new(0),
            view: Mutex::new(NodeView {
                state: state.into(),
                ..NodeView::default()
            }),
            links: Mutex::new(HashMap::new()),
            refusals: Mutex::new(VecDeque::new()),
            failed_handshakes: Mutex::new(VecDeque::new()),
            failures: Failures::default(),
            limits: Arc::new(Limits::default()),
            drops: Arc::new(Drops::default()),
            warn_limit: Mutex::new(LogLimit::new(1, 5, Instant::now())),
            forwarder: Mutex::new(None),
            egress_ports: Mutex::new(None),
            access_active: AtomicU64::new(0),
            access_total: AtomicU64::new(0),
            firewall: Mutex::new(None),
            pings: Mutex::new(HashMap::new()),
            hub: Mutex::new(None),
            through_hub: std::sync::atomic::AtomicBool::new(false),
            hubs: std::sync::OnceLock::new(),
            resolved: Mutex::new(None),
        })
    }

    /// `Some(lines left out)` when a peer-caused warning may be logged now.
    pub fn may_warn(&self) -> Option<u64> {
        self.warn_limit
            .lock()
            .ok()
            .and_then(|mut l| l.allow(Instant::now()))
    }

    /// A peer refused by a driver (access, revocation); what it supplied is escaped here.
    pub fn refuse(&self, identity: Option<String>, remote: SocketAddr, reason: String) {
        let identity = identity.map(|i| clean(&i, PEER_NAME));
        let reason = clean(&reason, PEER_TEXT);
        if let Some(skipped) = self.may_warn() {
            tracing::warn!(?identity, %remote, %reason, skipped, "peer refused");
        }
        let entry = Refusal {
            identity,
            remote: remote.to_string(),
            reason,
            at: crate::sys::unix_now(),
        };
        push_ring(&self.refusals, MAX_REFUSALS, entry);
    }

    /// A connection that never authenticated: counted by why, the latest few kept apart.
    pub fn handshake_failed(&self, remote: SocketAddr, why: Failure, reason: String) {
        self.failures.count(why);
        let reason = clean(&reason, PEER_TEXT);
        if let Some(skipped) = self.may_warn() {
            tracing::warn!(%remote, %reason, skipped, "handshake failed");
        }
        let entry = Refusal {
            identity: None,
            remote: remote.to_string(),
            reason,
            at: crate::sys::unix_now(),
        };
        push_ring(&self.failed_handshakes, MAX_HANDSHAKE_FAILURES, entry);
    }

    pub fn set_view(&self, view: NodeView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }

    /// Replaces the state line alone (a TUN that failed, say).
    pub fn set_state(&self, s: impl Into<String>) {
        if let Ok(mut v) = self.view.lock() {
            // It quotes errors and refusal reasons from the far end.
            v.state = clean(&s.into(), 2 * PEER_TEXT);
        }
    }

    pub fn link_records(&self) -> Vec<(LinkId, String, Link)> {
        self.links
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(id, r)| (*id, r.identity.clone(), r.link.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn status(&self) -> TunnelStatus {
        let view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        let pings = self.pings.lock().map(|p| p.clone()).unwrap_or_default();
        let peers = view
            .peers
            .iter()
            .map(|p| {
                let mut s = p.status();
                s.ping_ms = pings.get(&p.link).map(|d| d.as_secs_f64() * 1000.0);
                if let Some(through) = self.through_which_hub(p.info.remote) {
                    s.remote = through;
                }
                s
            })
            .collect();
        let zones = match self.forwarder.lock().ok().and_then(|f| f.clone()) {
            Some(f) => f.status(),
            None => view
                .zones
                .iter()
                .map(|z| ZoneStatus {
                    // The connector's text: any byte may be in it.
                    domain: clean(z, PEER_NAME),
                    queries: 0,
                    answers: 0,
                    failovers: 0,
                    servfails: 0,
                    resolvers: vec![],
                })
                .collect(),
        };
        let (firewall, forward_filter) = match self.firewall.lock().ok().and_then(|f| f.clone()) {
            Some((table, holds)) => {
                let (line, filter) = super::nftdump::firewall_status(&table, &holds);
                (Some(line), filter)
            }
            None => (None, None),
        };
        let mut refusals = view.refusals.clone();
        for ring in [&self.refusals, &self.failed_handshakes] {
            if let Ok(r) = ring.lock() {
                refusals.extend(r.iter().cloned());
            }
        }
        refusals.sort_by_key(|r| r.at);
        let authenticated = refusals.iter().filter(|r| r.identity.is_some()).count();
        let mut skip = authenticated.saturating_sub(MAX_REFUSALS);
        refusals.retain(|r| {
            if r.identity.is_some() && skip > 0 {
                skip -= 1;
                false
            } else {
                true
            }
        });
        let hub = self.hub.lock().ok().and_then(|h| h.clone()).map(|f| f());
        let via_hub = match self.through_hub.load(Ordering::Relaxed) {
            true => view.peers.first().map(|p| p.status().remote),
            false => None,
        };
        TunnelStatus {
            hub,
            via_hub,
            role: self.role.name().into(),
            tun: self.tun.clone(),
            mtu: self.mtu.load(Ordering::Relaxed),
            state: view.state,
            peers,
            refusals,
            drops: self.drops.by_name(),
            zones,
            egress_ports: self.egress_ports(),
            firewall,
            forward_filter,
            access_streams_active: self.access_active.load(Ordering::Relaxed),
            access_streams_total: self.access_total.load(Ordering::Relaxed),
            limits: self.limits.by_name(),
            handshake_failures: self.failures.by_name(),
            resolved: self.resolved.lock().ok().and_then(|r| r.clone()),
        }
    }

    fn egress_ports(&self) -> Option<String> {
        let (lo, hi) = self.egress_ports.lock().ok().and_then(|p| *p)?;
        let reserved = net::sysctl_get(RESERVED_PORTS).unwrap_or_default();
        let range = format!("{lo}-{hi}");
        Some(if reserved.split(',').any(|r| r.trim() == range) {
            format!("{range} (NAT and DNS; reserved from ephemeral use in {RESERVED_PORTS})")
        } else {
            format!("{range} (NOT reserved in {RESERVED_PORTS}: ephemeral ports may collide)")
        })
    }
}

/// ICMP echo to each peer's public address, outside the tunnel: with the tunnel down, it tells
/// "host unreachable" from "tunnel port blocked". Skipped where echo sockets are not permitted.
pub async fn ping_peers(shared: Arc<Shared>) {
    const EVERY: Duration = Duration::from_secs(5);
    // A new peer is pinged within a second of joining, then every EVERY.
    let mut last: HashMap<LinkId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if super::probe::check_possible().is_err() {
            continue;
        }
        let links = shared.link_records();
        last.retain(|id, _| links.iter().any(|(l, _, _)| l == id));
        if let Ok(mut p) = shared.pings.lock() {
            p.retain(|id, _| links.iter().any(|(l, _, _)| l == id));
        }
        for (id, _, link) in links {
            // A session through a hub has a made-up address: nothing to ping there.
            if last.get(&id).is_some_and(|t| t.elapsed() < EVERY)
                || super::hub_wire::parse_synthetic(link.remote()).is_some()
            {
                continue;
            }
            last.insert(id, Instant::now());
            let rtt = super::probe::echo(link.remote().ip(), Duration::from_secs(1)).await;
            if let (Ok(rtt), Ok(mut p)) = (rtt, shared.pings.lock()) {
                p.insert(id, rtt);
            }
        }
    }
}
