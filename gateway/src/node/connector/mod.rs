//! The connector's sessions: a link's hello checked against the policy (identity, version,
//! advertised prefixes), an overlay lease, routes for what the client may advertise, the
//! welcome, keepalives, silence, reload and the per-peer path that decides the TUN's MTU.
//!
//! ```text
//!  link up ─▶ AwaitHello ─hello ok─▶ AwaitRoutes ─routes added─▶ Up ─silent/down─▶ gone
//!               │  └─hello ok, nothing to add──────────────────────▶ │
//!               └─timeout / not a hello / refused ─▶ gone          reload ─▶ re-checked
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::datapath::{Counters, Datapath, PeerPath};
use super::drops::{Drops, Limit, Limits};
use super::leases::{Lease, Leases};
use super::table::PrefixTable;
use super::{HANDSHAKE_TIMEOUT, LinkId, LinkInfo, LinkKind, Refusal, Refusals, Transmit};
use crate::core::advertise::{self, Grants, Registry, Taken};
use crate::core::control::{self, Control, PROTOCOL_VERSION};
use crate::core::policy::Policy;

mod reload;
mod view;

/// A client that sends no control message for this long is gone: a TCP link to a vanished
/// client would otherwise linger until TCP gives up, many minutes later.
pub const CLIENT_SILENCE: Duration = Duration::from_secs(10);
/// The keepalive interval the welcome announces.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Control messages a client may send per second once up (keepalives come every 2 s).
const CONTROL_PER_SECOND: u32 = 20;

/// What a connector is configured to offer and allow; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub overlay_v4: Ipv4Net,
    pub overlay_v6: Ipv6Net,
    /// Routes offered to clients.
    pub routes: Vec<IpNet>,
    /// DNS zones offered to clients.
    pub zones: Vec<String>,
    pub policy: Arc<Policy>,
    /// What each identity may advertise (`[[policy]] advertise`).
    pub grants: Grants,
    /// Identities leased at once; more are refused.
    pub max_clients: usize,
}

/// Effects the driver carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectorEvent {
    /// Route each prefix into the TUN, exclusively — a route that exists is a failure, never
    /// replaced — then call `handle_routes_added`. All or nothing: on a failure the driver
    /// removes those it added.
    AddRoutes { link: LinkId, prefixes: Vec<IpNet> },
    /// Remove routes this node added.
    RemoveRoutes { prefixes: Vec<IpNet> },
    /// Close the link; with `linger`, once the control messages sent before it have left.
    CloseLink {
        link: LinkId,
        code: u32,
        reason: String,
        linger: bool,
    },
    /// The largest packet any peer's path carries changed: the TUN's MTU follows it.
    SetTunMtu(u32),
}

#[derive(Debug)]
enum Phase {
    AwaitHello {
        deadline: Instant,
    },
    AwaitRoutes {
        lease: Lease,
        deadline: Instant,
        claim: advertise::Claim,
    },
    Up,
}

#[derive(Debug)]
struct Session {
    info: LinkInfo,
    phase: Phase,
    /// Why the client uses this transport, as it said (sanitised).
    reason: String,
    /// Its release and protocol, as it said (sanitised).
    version: String,
    /// Accepted advertised prefixes.
    prefixes: Vec<IpNet>,
    peer: Option<Arc<PeerPath>>,
    since: Instant,
    last_heard: Instant,
    rtt: Duration,
    /// Control messages in the current one-second window.
    window: (Instant, u32),
}

pub struct Connector {
    cfg: ConnectorConfig,
    leases: Leases,
    sessions: HashMap<LinkId, Session>,
    /// The Up session of each identity.
    current: HashMap<String, LinkId>,
    /// Which session owns which advertised prefix, and so the kernel route to it.
    registry: Registry,
    /// Subnets the connector's kernel routes itself, from the driver: never advertisable.
    local_nets: Vec<IpNet>,
    refusals: Refusals,
    out: VecDeque<Transmit>,
    events: VecDeque<ConnectorEvent>,
    drops: Arc<Drops>,
    limits: Arc<Limits>,
    datapath: Arc<Datapath>,
    version: u64,
    tun_mtu: u32,
}

impl Connector {
    pub fn new(cfg: ConnectorConfig, drops: Arc<Drops>, limits: Arc<Limits>) -> Connector {
        Connector {
            leases: Leases::new(cfg.overlay_v4, cfg.overlay_v6, cfg.max_clients),
            cfg,
            sessions: HashMap::new(),
            current: HashMap::new(),
            registry: Registry::default(),
            local_nets: Vec::new(),
            refusals: Refusals::default(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            datapath: Arc::new(Datapath::new(drops.clone())),
            drops,
            limits,
            version: 0,
            tun_mtu: 0,
        }
    }

    /// The connector's own overlay addresses.
    pub fn own_addresses(&self) -> Option<(std::net::Ipv4Addr, std::net::Ipv6Addr)> {
        self.leases.own()
    }

    /// The driver's view of the kernel's connected subnets, refreshed before hellos are handled.
    pub fn set_local_nets(&mut self, nets: Vec<IpNet>) {
        self.local_nets = nets;
    }

    pub fn handle_link_up(&mut self, now: Instant, link: LinkId, info: LinkInfo) {
        self.sessions.insert(
            link,
            Session {
                info,
                phase: Phase::AwaitHello {
                    deadline: now + HANDSHAKE_TIMEOUT,
                },
                reason: String::new(),
                version: String::new(),
                prefixes: Vec::new(),
                peer: None,
                since: now,
                last_heard: now,
                rtt: Duration::ZERO,
                window: (now, 0),
            },
        );
    }

    /// The link is gone (closed by either side or failed).
    pub fn handle_link_down(&mut self, _now: Instant, link: LinkId) {
        self.end_session(link);
    }

    /// Forgets `link`'s session; if it was its identity's live one, its routes and its place in
    /// the packet path go too. Routes still being added are taken out when they arrive.
    pub(super) fn end_session(&mut self, link: LinkId) {
        let Some(s) = self.sessions.remove(&link) else {
            return;
        };
        let identity = s.info.identity;
        let released = self.registry.release(link.0);
        if !released.is_empty() {
            self.events
                .push_back(ConnectorEvent::RemoveRoutes { prefixes: released });
        }
        if self.current.get(&identity) == Some(&link) {
            self.current.remove(&identity);
            self.publish();
        }
    }

    pub fn handle_control(&mut self, now: Instant, link: LinkId, msg: Control) {
        let Some(s) = self.sessions.get_mut(&link) else {
            return;
        };
        s.last_heard = now;
        if now.duration_since(s.window.0) >= Duration::from_secs(1) {
            s.window = (now, 0);
        }
        s.window.1 += 1;
        if s.window.1 > CONTROL_PER_SECOND {
            self.limits.count(Limit::ControlRate);
            self.close(link, 4, "control messages too fast".into(), false);
            return;
        }
        match (&s.phase, msg) {
            (
                Phase::AwaitHello { .. },
                Control::Hello {
                    version,
                    software,
                    advertise,
                    transport_reason,
                    ..
                },
            ) => {
                let version = (version, software);
                self.hello(now, link, version, advertise, transport_reason)
            }
            (Phase::AwaitHello { .. }, _) => {
                self.close(link, 1, "the first message was not a hello".into(), false)
            }
            (Phase::Up, Control::Keepalive { seq }) => self.out.push_back(Transmit {
                link,
                msg: Control::Keepalive { seq },
            }),
            // A newer client's messages, or one sent out of turn: skipped, not fatal.
            _ => {}
        }
    }

    pub(super) fn hello(
        &mut self,
        now: Instant,
        link: LinkId,
        (version, software): (u32, Option<String>),
        advertise: Vec<IpNet>,
        transport_reason: Option<String>,
    ) {
        let Some(s) = self.sessions.get(&link) else {
            return;
        };
        let identity = s.info.identity.clone();
        if !control::compatible(version) {
            let reason = format!(
                "protocol version {version}; this connector speaks {PROTOCOL_VERSION} and works \
                 with one version either side"
            );
            return self.refuse(now, link, reason);
        }
        if !self.cfg.policy.knows(&identity) {
            let reason = format!("no [[policy]] entry matches identity {identity:?}");
            return self.refuse(now, link, reason);
        }
        let prefixes = match self.check_advertise(&identity, &advertise) {
            Ok(p) => p,
            Err(reason) => {
                self.limits.count(Limit::AdvertiseRefused);
                return self.refuse(now, link, reason);
            }
        };
        let Some(lease) = self.leases.lease(&identity) else {
            return self.refuse(now, link, "overlay address pool exhausted".into());
        };
        let reason = match (s.info.kind, transport_reason) {
            (_, Some(r)) => format!("client: {}", crate::core::text::clean(&r, 160)),
            (LinkKind::Quic, None) => String::new(),
            (LinkKind::Tcp, None) => "client chose TCP".into(),
        };
        let claim = self.registry.claim(&identity, link.0, &prefixes);
        if let Some(s) = self.sessions.get_mut(&link) {
            s.reason = reason;
            s.version = super::peer_version(version, software.as_deref());
            s.prefixes = prefixes;
            if claim.add.is_empty() {
                self.welcome(now, link, lease);
            } else {
                s.phase = Phase::AwaitRoutes {
                    lease,
                    deadline: now + HANDSHAKE_TIMEOUT,
                    claim: claim.clone(),
                };
                self.events.push_back(ConnectorEvent::AddRoutes {
                    link,
                    prefixes: claim.add,
                });
            }
        }
    }

    /// The driver added (or failed to add) what `AddRoutes` asked for `link`.
    pub fn handle_routes_added(
        &mut self,
        now: Instant,
        link: LinkId,
        added: &[IpNet],
        result: Result<(), String>,
    ) {
        if !self.sessions.contains_key(&link) {
            // The link went while its routes were being added: take them out again.
            if result.is_ok() {
                self.events.push_back(ConnectorEvent::RemoveRoutes {
                    prefixes: added.to_vec(),
                });
            }
            return;
        }
        let Some(s) = self.sessions.get(&link) else {
            return;
        };
        let Phase::AwaitRoutes { lease, claim, .. } = &s.phase else {
            return;
        };
        let (lease, claim) = (*lease, claim.clone());
        match result {
            Ok(()) => self.welcome(now, link, lease),
            Err(e) => {
                self.limits.count(Limit::AdvertiseRefused);
                self.registry.abort(link.0, &claim);
                self.refuse(now, link, crate::core::text::clean(&e, 200))
            }
        }
    }

    pub(super) fn welcome(&mut self, now: Instant, link: LinkId, lease: Lease) {
        let Some(s) = self.sessions.get_mut(&link) else {
            return;
        };
        let identity = s.info.identity.clone();
        s.phase = Phase::Up;
        s.since = now;
        let rules = self.cfg.policy.resolve(&identity);
        let mut sources = PrefixTable::default();
        sources.insert(IpNet::from(IpAddr::V4(lease.v4)), ());
        sources.insert(IpNet::from(IpAddr::V6(lease.v6)), ());
        for p in &s.prefixes {
            sources.insert(*p, ());
        }
        let peer = Arc::new(PeerPath {
            link,
            sink: s.info.sink.clone(),
            identity: identity.as_str().into(),
            far_end: (lease.v4, lease.v6),
            sources,
            rules,
            max_packet: s.info.max_packet.unwrap_or(0).into(),
            counters: Arc::new(Counters::default()),
        });
        s.peer = Some(peer);
        self.out.push_back(Transmit {
            link,
            msg: Control::Welcome {
                version: PROTOCOL_VERSION,
                node: identity.clone(),
                software: control::software(),
                address_v4: lease.v4,
                address_v6: lease.v6,
                prefix_v4: self.cfg.overlay_v4.prefix_len(),
                prefix_v6: self.cfg.overlay_v6.prefix_len(),
                routes: self.cfg.routes.clone(),
                keepalive_secs: KEEPALIVE.as_secs(),
                zones: self.cfg.zones.clone(),
            },
        });
        // A client that reconnects, or moves between QUIC and TCP, replaces its old link; the
        // routes the old one had and the new one does not advertise go.
        if let Some(old) = self.current.insert(identity.clone(), link)
            && old != link
        {
            // What it owned and this one did not claim goes with it.
            self.end_session(old);
            self.events.push_back(ConnectorEvent::CloseLink {
                link: old,
                code: 3,
                reason: "replaced by a new connection".into(),
                linger: false,
            });
        }
        self.publish();
    }

    /// Tells the client why, records it for status, and closes the link once that has left.
    pub(super) fn refuse(&mut self, now: Instant, link: LinkId, reason: String) {
        let Some(s) = self.sessions.get(&link) else {
            return;
        };
        self.refusals.push(Refusal {
            identity: Some(s.info.identity.clone()),
            remote: s.info.remote,
            reason: reason.clone(),
            at: now,
        });
        self.out.push_back(Transmit {
            link,
            msg: Control::Refused { reason },
        });
        self.end_session(link);
        self.events.push_back(ConnectorEvent::CloseLink {
            link,
            code: 2,
            reason: "refused".into(),
            linger: true,
        });
    }

    pub(super) fn close(&mut self, link: LinkId, code: u32, reason: String, linger: bool) {
        self.end_session(link);
        self.events.push_back(ConnectorEvent::CloseLink {
            link,
            code,
            reason,
            linger,
        });
    }

    /// The prefixes of `advertise` this identity may have routed to it, or why not.
    pub(super) fn check_advertise(
        &self,
        identity: &str,
        advertise: &[IpNet],
    ) -> Result<Vec<IpNet>, String> {
        let taken = Taken {
            overlay: vec![
                IpNet::V4(self.cfg.overlay_v4),
                IpNet::V6(self.cfg.overlay_v6),
            ],
            offered: self.cfg.routes.clone(),
            local: self.local_nets.clone(),
        };
        advertise::check(
            identity,
            advertise,
            &self.cfg.grants,
            &taken,
            &self.registry,
        )
        .map_err(|r| r.to_string())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut late = Vec::new();
        for (link, s) in &self.sessions {
            match s.phase {
                Phase::AwaitHello { deadline } | Phase::AwaitRoutes { deadline, .. }
                    if now >= deadline =>
                {
                    late.push((*link, "no hello in time".to_string()))
                }
                Phase::Up if now.duration_since(s.last_heard) >= CLIENT_SILENCE => late.push((
                    *link,
                    format!(
                        "the client sent nothing for {}",
                        super::secs(CLIENT_SILENCE)
                    ),
                )),
                _ => {}
            }
        }
        for (link, reason) in late {
            self.close(link, 0, reason, false);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions
            .values()
            .map(|s| match s.phase {
                Phase::AwaitHello { deadline } | Phase::AwaitRoutes { deadline, .. } => deadline,
                Phase::Up => s.last_heard + CLIENT_SILENCE,
            })
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ConnectorEvent> {
        self.events.pop_front()
    }
}
